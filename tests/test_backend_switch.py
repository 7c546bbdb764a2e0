"""The backend switch: names, precedence, and what happens when numba cannot be imported.

Precedence, most specific first: a function's ``backend=`` argument, the innermost
``with use_backend(...)``, ``set_backend(...)``, the environment variable FASTATTN_BACKEND,
the default ("numba"; "vectorized" with a RuntimeWarning when numba cannot be imported).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

import fastattn
from fastattn import _backend, kernels

VALID = r"valid backends are: 'loop', 'vectorized', 'numba'"


@pytest.fixture(autouse=True)
def _clean_switch(monkeypatch):
    """Every test starts with no set_backend and no FASTATTN_BACKEND, and leaves none."""
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    previous = _backend._global_backend
    _backend.set_backend(None)
    yield
    _backend._global_backend = previous


def _tiny():
    x = np.random.default_rng(0).standard_normal((1, 3, 2))
    return x, x, x


# ---------------------------------------------------------------------------- unknown names


@pytest.mark.parametrize("bad", ["bogus", "Numba", " numba", "", None, 3])
def test_unknown_backend_argument_raises_listing_the_valid_names(bad):
    if bad is None:  # backend=None means "the current backend": not an error
        fastattn.attention_forward(*_tiny(), backend=bad)
        return
    with pytest.raises(ValueError, match=VALID):
        fastattn.attention_forward(*_tiny(), backend=bad)
    with pytest.raises(ValueError, match=VALID):
        fastattn.softmax(np.zeros(3), backend=bad)
    with pytest.raises(ValueError, match=VALID):
        kernels.get("softmax_forward", bad)


def test_set_backend_unknown_raises_and_keeps_the_previous_choice():
    fastattn.set_backend("loop")
    with pytest.raises(ValueError, match=rf"unknown backend 'bogus'; {VALID}"):
        fastattn.set_backend("bogus")
    assert fastattn.get_backend() == "loop"


def test_use_backend_unknown_raises_and_changes_nothing():
    fastattn.set_backend("vectorized")
    with pytest.raises(ValueError, match=rf"unknown backend 'bogus'; {VALID}"):
        with fastattn.use_backend("bogus"):
            pytest.fail("the block must not run")
    assert fastattn.get_backend() == "vectorized"


def test_unknown_kernel_name_raises_listing_the_kernels():
    with pytest.raises(ValueError, match="unknown kernel 'softmax'; valid kernels are: "
                                         "softmax_forward"):
        kernels.get("softmax", "loop")


def test_a_kernel_lookup_checks_each_pair_once_and_finds_a_replaced_kernel(monkeypatch):
    """_backend.kernel keeps the (name, backend) pairs it has checked: the second lookup
    skips kernels.get, the backend in force still decides, a kernel replaced in its module
    is found, and bad names still raise."""
    looked = []
    real_get = kernels.get
    monkeypatch.setattr(kernels, "get", lambda n, b: looked.append((n, b)) or real_get(n, b))
    monkeypatch.setattr(_backend, "_checked", {})
    fn = _backend.kernel("softmax_forward", "loop")
    assert _backend.kernel("softmax_forward", "loop") is fn
    assert looked == [("softmax_forward", "loop")]
    with fastattn.use_backend("vectorized"):
        assert _backend.kernel("softmax_forward") is real_get("softmax_forward", "vectorized")
        assert _backend.kernel("softmax_forward") is real_get("softmax_forward", "vectorized")
    assert _backend.kernel("softmax_forward") is real_get("softmax_forward",
                                                          _backend.get_backend())
    assert looked.count(("softmax_forward", "vectorized")) == 1

    def spy(x):
        return x

    module = kernels.module("loop", kernels.family_of("softmax_forward"))
    monkeypatch.setattr(module, "softmax_forward", spy)
    assert _backend.kernel("softmax_forward", "loop") is spy
    for bad in ("bogus", " loop", 3, ["loop"]):
        with pytest.raises(ValueError, match=VALID):
            _backend.kernel("softmax_forward", bad)
    for bad in ("softmax", ["softmax_forward"]):
        with pytest.raises(ValueError, match="unknown kernel"):
            _backend.kernel(bad, "loop")


def test_bogus_environment_variable_raises_listing_the_valid_names(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(ValueError, match=rf"FASTATTN_BACKEND='cuda' names no backend; {VALID}"):
        fastattn.get_backend()
    with pytest.raises(ValueError, match="FASTATTN_BACKEND"):
        fastattn.attention_forward(*_tiny())
    # anything more specific than the environment still works
    fastattn.attention_forward(*_tiny(), backend="loop")
    with fastattn.use_backend("vectorized"):
        assert fastattn.get_backend() == "vectorized"
    fastattn.set_backend("loop")
    assert fastattn.get_backend() == "loop"


def test_bogus_environment_variable_does_not_break_import():
    """In a fresh interpreter: `import fastattn` succeeds, the first use names the problem."""
    code = ("import fastattn\n"
            "try:\n"
            "    fastattn.get_backend()\n"
            "except ValueError as e:\n"
            "    print('ValueError:', e)\n")
    env = {**os.environ, _backend.ENV_VAR: "gpu"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "ValueError: environment variable FASTATTN_BACKEND='gpu' names no backend" in proc.stdout
    assert "'loop', 'vectorized', 'numba'" in proc.stdout


def test_environment_variable_ignores_surrounding_whitespace_and_empty_means_unset(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, " loop\n")
    assert fastattn.get_backend() == "loop"
    monkeypatch.setenv(_backend.ENV_VAR, "")
    assert fastattn.get_backend() == _backend._default_backend()


# ---------------------------------------------------------------------------- precedence


def test_precedence_argument_over_use_backend_over_set_backend_over_env_over_default(
        monkeypatch, looked_up):
    q, k, v = _tiny()

    def used(**kw):
        looked_up.clear()
        fastattn.attention_forward(q, k, v, **kw)
        return looked_up[-1]

    default = "numba" if _backend.numba_available() else "vectorized"
    assert used() == default == fastattn.get_backend()
    monkeypatch.setenv(_backend.ENV_VAR, "vectorized")
    assert used() == "vectorized" == fastattn.get_backend()
    fastattn.set_backend("loop")
    assert used() == "loop" == fastattn.get_backend()
    with fastattn.use_backend("numba"):
        assert used() == "numba" == fastattn.get_backend()
        assert used(backend="vectorized") == "vectorized"
        with fastattn.use_backend("vectorized"):  # the innermost block wins
            assert used() == "vectorized"
        assert used() == "numba"
    assert used() == "loop"
    fastattn.set_backend(None)  # back to the environment
    assert used() == "vectorized"
    monkeypatch.delenv(_backend.ENV_VAR)
    assert used() == default


def test_use_backend_restores_the_previous_backend_after_an_exception():
    fastattn.set_backend("vectorized")
    with pytest.raises(RuntimeError), fastattn.use_backend("loop"):
        assert fastattn.get_backend() == "loop"
        raise RuntimeError("inside the block")
    assert fastattn.get_backend() == "vectorized"


def test_use_backend_stays_in_its_thread():
    """use_backend is per context (thread); set_backend is process-wide."""
    seen = {}

    def worker():
        seen["before"] = fastattn.get_backend()
        with fastattn.use_backend("numba"):
            seen["inside"] = fastattn.get_backend()
            barrier.wait(timeout=30)  # main thread looks while this block is open
            barrier.wait(timeout=30)

    fastattn.set_backend("loop")
    barrier = threading.Barrier(2)
    t = threading.Thread(target=worker)
    with fastattn.use_backend("vectorized"):
        t.start()
        barrier.wait(timeout=30)
        assert fastattn.get_backend() == "vectorized"  # not the worker's "numba"
        barrier.wait(timeout=30)
    t.join(timeout=30)
    assert seen == {"before": "loop", "inside": "numba"}  # not the main thread's block
    assert fastattn.get_backend() == "loop"


# ---------------------------------------------------------------------------- without numba

_NO_NUMBA = """
import json, sys, warnings
sys.modules["numba"] = None  # `import numba` now raises ImportError
import numpy as np
import fastattn
out = {"imported": True}
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    out["backend"] = fastattn.get_backend()
    q = np.random.default_rng(0).standard_normal((2, 3, 4))
    o, lse = fastattn.attention_forward(q, q, q)
    want, _ = fastattn.attention_forward(q, q, q, backend="vectorized")
    out["same_as_vectorized"] = bool((o == want).all())
    fastattn.get_backend()
out["warnings"] = [(w.category.__name__, str(w.message)) for w in caught]
try:
    fastattn.attention_forward(q, q, q, backend="numba")
    out["explicit"] = None
except Exception as e:
    out["explicit"] = [type(e).__name__, str(e)]
with fastattn.use_backend("numba"):
    try:
        fastattn.softmax(q)
        out["use_backend"] = None
    except Exception as e:
        out["use_backend"] = type(e).__name__
print(json.dumps(out))
"""


def test_without_numba_the_package_imports_and_falls_back_to_vectorized_with_a_warning():
    proc = subprocess.run([sys.executable, "-c", _NO_NUMBA], capture_output=True, text=True,
                          timeout=120, env={k: v for k, v in os.environ.items()
                                            if k != _backend.ENV_VAR})
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["imported"]
    assert got["backend"] == "vectorized"
    assert got["same_as_vectorized"]
    # one RuntimeWarning (not one per call) that names numba, the reason and the fallback
    assert len(got["warnings"]) == 1, got["warnings"]
    category, message = got["warnings"][0]
    assert category == "RuntimeWarning"
    assert "numba cannot be imported" in message and "import of numba halted" in message
    assert "'vectorized'" in message
    # asking for numba explicitly is a clear ImportError, not an AttributeError deep inside
    assert got["explicit"][0] == "ImportError"
    assert "'numba' backend needs numba" in got["explicit"][1]
    assert got["use_backend"] == "ImportError"


def test_generate_batch_runs_on_the_backend_in_force_or_its_own(monkeypatch, looked_up):
    """generate_batch resolves the backend once per call: every kernel it looks up is the
    model's own backend, else the one in force when it is called (the environment here)."""
    from fastattn.transformer import TransformerSeq2seq

    xs = np.arange(12).reshape(3, 4) % 7
    free = TransformerSeq2seq(7, d_model=8, n_heads=2, max_len=6, seed=0)
    for env in ("vectorized", "loop"):
        monkeypatch.setenv(_backend.ENV_VAR, env)
        looked_up.clear()
        free.generate_batch(xs, 1, 3)
        assert looked_up and set(looked_up) == {env}, looked_up
    with fastattn.use_backend("numba"):
        looked_up.clear()
        TransformerSeq2seq(7, d_model=8, n_heads=2, max_len=6, seed=0,
                           backend="vectorized").generate_batch(xs, 1, 3)
        assert looked_up and set(looked_up) == {"vectorized"}, looked_up
        assert fastattn.get_backend() == "numba"  # as it was before the call
