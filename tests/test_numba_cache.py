"""Numba's on-disk cache (``cache=True``) must never stop the package from working.

Numba looks for a writable cache directory in this order: ``NUMBA_CACHE_DIR``, the
``__pycache__`` beside the source file, the user's cache directory under ``HOME``. If none is
writable, ``@njit(cache=True)`` raises RuntimeError ("no locator available") when the module
is imported. These tests run a fresh interpreter on a copy of the packages with those places
made unwritable. The tests run as root, which ignores directory permissions, so "unwritable"
means a path under a regular *file*, which nobody can create directories in.

Each subprocess compiles only small kernels (softmax_forward on a tiny float64 array, and a
one-line probe function), so the tests take seconds.
"""

from __future__ import annotations

import json
import os
import pkgutil
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import fastattn
from fastattn import kernels

# The script every subprocess runs. It imports every module of the copied `fastattn.kernels`
# (so every @njit decorator runs), compiles a probe and the numba softmax kernel, and reports.
_SCRIPT = textwrap.dedent("""
    import hashlib, importlib, json, os, pkgutil, sys, time
    import numpy as np
    out = {}
    try:
        import probe  # a one-line @njit(cache=True) function beside the copied packages
        out["probe"] = int(probe.twice(np.arange(4.0)))
        out["probe_hits"] = sum(probe.twice.stats.cache_hits.values())
    except RuntimeError as e:
        out["probe"] = "RuntimeError: " + str(e)
    import fastattn
    from fastattn import kernels
    out["kernels_file"] = kernels.__file__
    failed = {}
    for m in pkgutil.iter_modules(kernels.__path__):
        try:
            importlib.import_module("fastattn.kernels." + m.name)
        except Exception as e:
            failed[m.name] = type(e).__name__ + ": " + str(e)
    out["import_failures"] = failed
    go = os.environ.get("GO_FILE")
    if go:  # start compiling together with the other process
        deadline = time.time() + 120
        while not os.path.exists(go) and time.time() < deadline:
            time.sleep(0.01)
    x = np.random.default_rng(0).standard_normal((2, 3, 5))
    y = kernels.get("softmax_forward", "numba")(x)
    want = kernels.get("softmax_forward", "loop")(x)
    out["softmax_ok"] = bool(np.allclose(y, want, rtol=1e-12, atol=1e-15))
    out["softmax_sha"] = hashlib.sha256(y.tobytes()).hexdigest()
    q = x[:, :, :4]
    o, lse = fastattn.attention_forward(q, q, q, backend="vectorized")
    out["attention_ok"] = bool(np.isfinite(o).all())
    from numba.core.dispatcher import Dispatcher
    hits = 0
    for name, mod in list(sys.modules.items()):
        if name == "fastattn.kernels" or name.startswith("fastattn.kernels."):
            for obj in vars(mod).values():
                if isinstance(obj, Dispatcher):
                    hits += sum(obj.stats.cache_hits.values())
    out["kernel_cache_hits"] = hits
    print(json.dumps(out))
""")

_PROBE = textwrap.dedent("""
    from numba import njit

    @njit(cache=True)
    def twice(x):
        return x.sum() * 2
""")


def _copy_packages(root: Path) -> Path:
    """Copy the `fastattn` package with `fastattn.kernels` inside it, as installed (sources
    only), and the probe under root."""
    site = root / "site"
    skip = shutil.ignore_patterns("__pycache__")
    shutil.copytree(Path(fastattn.__file__).parent, site / "fastattn", ignore=skip)
    shutil.copytree(Path(kernels.__file__).parent, site / "fastattn" / "kernels", ignore=skip)
    (site / "probe.py").write_text(_PROBE)
    return site


def _unwritable(root: Path) -> Path:
    """A path nobody (root included) can create: it lies under a regular file."""
    blocker = root / "blocker"
    blocker.write_text("a file, not a directory\n")
    return blocker


def _run(site: Path, env_extra: dict, *, wait: bool = True):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("NUMBA_CACHE_DIR", "FASTATTN_", "PYTHONDONTWRITEBYTECODE"))}
    env.update(env_extra)
    env["PYTHONPATH"] = str(site)
    env["NUMBA_NUM_THREADS"] = "1"  # these processes compile; they need no worker threads
    proc = subprocess.Popen([sys.executable, "-B", "-c", _SCRIPT], cwd=site, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return _result(proc) if wait else proc


def _result(proc) -> dict:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    return json.loads(stdout.strip().splitlines()[-1])


def _assert_package_works(got: dict, site: Path):
    assert got["kernels_file"].startswith(str(site)), "the copy must be the package under test"
    assert got["import_failures"] == {}, got["import_failures"]
    assert got["softmax_ok"] and got["attention_ok"]


def test_every_numba_kernel_is_compiled_with_cache():
    """Every Numba dispatcher in the kernels package has cache=True (else the cache tests below
    would not cover it, and every process would compile it again)."""
    from numba.core.caching import NullCache
    from numba.core.dispatcher import Dispatcher

    found = []
    for m in pkgutil.iter_modules(kernels.__path__):
        mod = __import__(f"fastattn.kernels.{m.name}", fromlist=["_"])
        for name, obj in vars(mod).items():
            if isinstance(obj, Dispatcher) and obj.__module__ == mod.__name__:
                found.append(f"{mod.__name__}.{name}")
                assert not isinstance(obj._cache, NullCache), f"{mod.__name__}.{name}: no cache"
    if not found:
        pytest.skip("no Numba kernels in the kernels package yet")


def test_works_when_numba_cache_dir_and_home_are_unwritable(tmp_path):
    """NUMBA_CACHE_DIR and HOME point at unwritable places; the source tree is writable, so
    Numba falls back to the __pycache__ beside the sources."""
    site = _copy_packages(tmp_path)
    blocker = _unwritable(tmp_path)
    got = _run(site, {"NUMBA_CACHE_DIR": str(blocker / "numba-cache"),
                      "HOME": str(blocker / "home"), "XDG_CACHE_HOME": str(blocker / "xdg")})
    assert got["probe"] == 12
    _assert_package_works(got, site)
    assert list((site / "__pycache__").glob("probe.twice-*.nbi")), "fell back to the tree"


def test_works_when_no_cache_location_is_writable(tmp_path):
    """A read-only install with a read-only HOME: NUMBA_CACHE_DIR, HOME and every package's
    __pycache__ are unwritable. Numba itself then refuses cache=True (the probe shows it), and
    the package must still import and compute (the kernels are decorated with
    ``kernels._numba_math.njit_cached``, which falls back to no cache there)."""
    site = _copy_packages(tmp_path)
    blocker = _unwritable(tmp_path)
    for d in [site, *[p for p in site.rglob("*") if (p / "__init__.py").is_file()]]:
        (d / "__pycache__").write_text("a file where Numba would put its cache\n")
    got = _run(site, {"NUMBA_CACHE_DIR": str(blocker / "numba-cache"),
                      "HOME": str(blocker / "home"), "XDG_CACHE_HOME": str(blocker / "xdg")})
    assert got["probe"].startswith("RuntimeError: cannot cache function"), "setup not effective"
    _assert_package_works(got, site)


def test_two_processes_compiling_into_one_fresh_cache_both_succeed_and_agree(tmp_path):
    """Two interpreters start compiling at the same moment into the same empty NUMBA_CACHE_DIR;
    both succeed with bitwise-equal results, and a third one then loads from that cache."""
    site = _copy_packages(tmp_path)
    cache = tmp_path / "numba-cache"
    go = tmp_path / "go"
    env = {"NUMBA_CACHE_DIR": str(cache), "GO_FILE": str(go)}
    procs = [_run(site, env, wait=False) for _ in range(2)]
    go.write_text("go\n")
    first, second = (_result(p) for p in procs)
    for got in (first, second):
        assert got["probe"] == 12
        _assert_package_works(got, site)
    assert first["softmax_sha"] == second["softmax_sha"]
    assert list(cache.rglob("probe.twice-*.nbi")), "the probe was cached in NUMBA_CACHE_DIR"
    third = _run(site, {"NUMBA_CACHE_DIR": str(cache)})
    assert third["probe"] == 12 and third["probe_hits"] == 1, "the third run loads the cache"
    _assert_package_works(third, site)
    assert third["softmax_sha"] == first["softmax_sha"]
    numba_kernels = list(cache.rglob("*.nbi"))
    if any(not p.name.startswith("probe.") for p in numba_kernels):  # real Numba kernels
        assert third["kernel_cache_hits"] >= 1, "the package's kernels load from the cache"


def test_a_changed_helper_module_makes_every_kernel_compile_again(tmp_path):
    """Numba compares a cached kernel only with its own source file, but the kernels inline
    helpers from the package's other modules. After a change to one module (a line added to
    _numba_math.py, where vexp lives; the softmax kernel's own file is unchanged), no kernel
    may load its old machine code; a run after that loads the new one."""
    site = _copy_packages(tmp_path)
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    first = _run(site, env)
    assert _run(site, env)["kernel_cache_hits"] >= 1, "the cache works (else this proves nothing)"
    helper = site / "fastattn" / "kernels" / "_numba_math.py"
    helper.write_text(helper.read_text() + "\n# a change in a helper module\n")
    third = _run(site, env)
    _assert_package_works(third, site)
    assert third["kernel_cache_hits"] == 0, "a kernel loaded machine code from before the change"
    assert third["softmax_sha"] == first["softmax_sha"]
    assert _run(site, env)["kernel_cache_hits"] >= 1, "the new machine code is cached"


# ---- the test session's own cache: never stale --------------------------------------------

def test_the_session_compiles_into_a_folder_keyed_by_every_kernel_source():
    """tests/conftest.py points NUMBA_CACHE_DIR at <base>/<hash of kernels/*.py> before any
    kernel is imported: the kernels imported here cache there, under the key of their own
    sources."""
    from helpers import numba_cache

    from fastattn.kernels import _flash

    cache = Path(os.environ["NUMBA_CACHE_DIR"])
    assert cache.name == numba_cache.source_key(Path(kernels.__file__).parent)
    assert Path(_flash._forward_units._cache.cache_path).is_relative_to(cache)


def test_the_cache_key_changes_with_an_edit_to_an_inlined_helper(tmp_path):
    """Numba's own check looks at a kernel's file only; the key covers the helpers it inlines
    (kernels/_numba_math.py), so editing one gives a fresh cache folder."""
    from helpers import numba_cache

    src = Path(kernels.__file__).parent
    copy = tmp_path / "kernels"
    shutil.copytree(src, copy, ignore=shutil.ignore_patterns("__pycache__"))
    key = numba_cache.source_key(copy)
    assert key == numba_cache.source_key(src)
    helper = copy / "_numba_math.py"
    helper.write_text(helper.read_text().replace("def vexp(", "def vexp(  ", 1))
    assert numba_cache.source_key(copy) != key


def test_the_kernels_imported_under_another_name_do_not_poison_the_cache(tmp_path):
    """The same kernel files imported as a top-level ``kernels`` (from the repository's root)
    and as ``fastattn.kernels`` (installed in editable mode) share cache files. Machine code
    cached under one name must not be loaded under the other: its environment imports the
    module by the name it was compiled under, which the other process may not have."""
    site = _copy_packages(tmp_path)
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba-cache")}
    first_env = {k: v for k, v in os.environ.items() if not k.startswith("FASTATTN_")}
    first_env.update(env, PYTHONPATH=os.pathsep.join([str(site / "fastattn"), str(site)]),
                     NUMBA_NUM_THREADS="1")
    script = ("import numpy as np, kernels; x = np.ones((2, 3, 4));"
              "print(kernels.__file__, kernels.get('softmax_forward', 'numba')(x).sum())")
    proc = subprocess.run([sys.executable, "-B", "-c", script], cwd=tmp_path, env=first_env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith(str(site / "fastattn" / "kernels")), "not the copy's files"
    assert float(proc.stdout.split()[-1]) == pytest.approx(6.0)
    assert list((tmp_path / "numba-cache").rglob("*softmax*.nbi")), "nothing was cached"
    got = _run(site, env)  # fastattn.kernels, the same files
    _assert_package_works(got, site)
