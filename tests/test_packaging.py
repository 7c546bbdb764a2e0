"""The distribution: what a wheel built from this checkout installs.

``kernels/`` sits at the top of the repository but installs as ``fastattn.kernels``: PyPI has
a package named ``kernels``, and two distributions must never write one top-level name.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_wheel_holds_fastattn_kernels_and_no_top_level_kernels(tmp_path):
    src = tmp_path / "src"  # a copy, so that the build leaves nothing in the checkout
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    skip = shutil.ignore_patterns("__pycache__", "*.py[cod]", "*.nbi", "*.nbc", "*.egg-info")
    for package in ("fastattn", "kernels", "dataset"):
        shutil.copytree(ROOT / package, src / package, ignore=skip)
    dist = tmp_path / "dist"
    run = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "--no-index", "-q", "-w", str(dist), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    (wheel,) = dist.glob("fastattn-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"fastattn", "dataset"}, sorted(top)
    kernels = {n for n in names if n.startswith("fastattn/kernels/")}
    for module in ("__init__", "loop", "vectorized", "numba_backend", "_flash", "_blas",
                   "_numba_math"):
        assert f"fastattn/kernels/{module}.py" in kernels
