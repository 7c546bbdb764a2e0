"""The test session's Numba cache: a folder keyed by a hash of every kernel source.

Numba's ``cache=True`` checks the timestamp of a kernel's own source file only: a change to a
helper that the kernel inlines from another module (``kernels/_numba_math.py``) leaves the
cached machine code in use, stale. Tests must never run on stale code, so ``configure()``
(called by ``tests/conftest.py`` and ``bench/conftest.py`` before Numba is imported) points
``NUMBA_CACHE_DIR`` at ``<base>/<key>``, where key hashes the names and contents of all of
``kernels/*.py``: any edit there gives a fresh folder, and an unchanged tree reuses the warm
one. base is the ``NUMBA_CACHE_DIR`` the session was started with, or else
``.pytest_cache/numba`` in the repository, where folders of other keys are removed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KERNELS = REPO / "kernels"
DEFAULT_BASE = REPO / ".pytest_cache" / "numba"
_configured = {}


def source_key(folder=KERNELS):
    """16 hex digits of a SHA-256 over the names and bytes of ``folder``'s ``*.py`` files."""
    h = hashlib.sha256()
    for path in sorted(Path(folder).glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def configure():
    """Set NUMBA_CACHE_DIR for this process (and the processes it starts) to the keyed folder;
    returns it. Idempotent. Fails loudly if the kernels were imported already (they would
    have bound their cache elsewhere)."""
    if "dir" in _configured:
        return _configured["dir"]
    if "fastattn.kernels.numba_backend" in sys.modules or "fastattn.kernels._flash" in sys.modules:
        raise RuntimeError("the Numba kernels were imported before the test cache was set")
    key = source_key()
    user = os.environ.get("NUMBA_CACHE_DIR")
    base = Path(user) if user else DEFAULT_BASE
    path = base / key
    if not user and base.is_dir():
        for old in base.iterdir():
            if old.name != key and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    path.mkdir(parents=True, exist_ok=True)
    os.environ["NUMBA_CACHE_DIR"] = str(path)
    if "numba" in sys.modules:  # imported early (a plugin): it read the variable already
        import numba

        numba.config.CACHE_DIR = str(path)
    _configured["dir"] = str(path)
    return str(path)
