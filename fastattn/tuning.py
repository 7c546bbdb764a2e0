"""``fastattn.tune()``: measure the fused kernels' choices on this machine and store the winners.

The choices and where they are kept are described in :mod:`fastattn.kernels._tuning`. Tuning
times forward+backward of the fused attention (numba backend, float32, d = 64) at a few shapes
like those of the benchmark suite: first whose tile products (BLAS or the kernels' own
micro-kernel), then each candidate block size with and without transposed key/value tiles
(the own products always transpose), then the causal tiles, then (at head dims 16 and 32,
short sequences) up to which head dim the backward transposes its tiles; each stage keeps
the candidate with the lowest geometric mean of its time relative to the stage's starting
point. Work stops when the time budget is spent; what was measured by then decides.
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from fastattn import _checks
from fastattn.kernels import _flash, _thread_choice, _tuning

# (B, T) at d = 64: short, middle and long sequences (smaller B than the benchmarks, same tiles)
PLAIN_SHAPES = ((64, 128), (8, 512), (2, 2048))
CAUSAL_SHAPES = ((64, 128), (8, 512))
PLAIN_BLOCKS = ((64, 64), (128, 64), (64, 128), (128, 128), (256, 128), (128, 256), (256, 256))
CAUSAL_BLOCKS = (32, 64, 128)
# (B, T, d): the default model's heads (d = 16) and twice that, where kt_dim decides
SMALL_HEAD_SHAPES = ((512, 29, 16), (256, 64, 32))
KT_DIMS = (0, 16, 32)
# whose tile products (BLAS or the kernels' own): short and long sequences, small heads
PRODUCT_SHAPES = ((64, 128), (2, 2048), (256, 64, 32), (512, 29, 16))
OWN_DIMS = (0, 16, 32, 1024)  # own products never, for small heads, for all
NEVER = _tuning.NEVER  # kt_rows that never transposes


def _time_step(shape, causal, setting, reps, rng):
    B, T, d = (*shape, 64)[:3]
    q, k, v, dout = (rng.standard_normal((B, T, d)).astype(np.float32) for _ in range(4))
    scale = 1 / np.sqrt(d)
    _tuning.use(setting, "being tuned")
    times = []
    with _thread_choice.fixed():  # every candidate on all the threads, none re-choosing them
        for _ in range(reps + 1):  # the first run warms up and is not counted
            t0 = time.perf_counter()
            out, lse = _flash.attention_forward(q, k, v, scale, causal, None)
            _flash.attention_backward(dout, q, k, v, out, lse, scale, causal, None)
            times.append(time.perf_counter() - t0)
    return min(times[1:])


def _score(candidates, shapes, causal, base, deadline, reps, rng, measured, label):
    """The candidate with the lowest geometric mean of time / base time over ``shapes``. Each
    candidate is timed in turns with the base at every shape, so that a drift of the machine's
    speed (clock, other load) moves both sides of a ratio alike."""
    best, best_score = base, 1.0
    for cand in candidates:  # at least one, then as many as the budget allows
        logs = []
        for s in shapes:
            t_base = _time_step(s, causal, base, reps, rng)
            t_cand = _time_step(s, causal, cand, reps, rng)
            t_base = min(t_base, _time_step(s, causal, base, reps, rng))
            logs.append(math.log(t_cand / t_base))
        score = math.exp(sum(logs) / len(logs))
        measured[f"{label} {_describe(cand, causal)}"] = round(score, 4)
        if score < best_score:
            best, best_score = cand, score
        if time.perf_counter() > deadline:
            break
    return best


def _describe(st, causal):
    if causal:
        return f"causal {st.causal_block_small}/{st.causal_block}"
    kt = "kT" if st.kt_rows < NEVER else "no kT"
    own = f", own products to d {st.own_dim}" if st.own_dim else ", BLAS products"
    return f"{st.block_q}x{st.block_k} {kt}, kt_dim {st.kt_dim}{own}"


def tune(seconds: float = 60.0, *, reps: int = 3, write: bool = True, seed: int = 0) -> dict:
    """Measure the choices on this machine for about ``seconds`` and put the winner in force
    (and, with ``write``, store it in the per-user tuning file). Returns what was measured:
    ``{"setting", "file", "key", "measured"}``, ``measured`` mapping each candidate to its time
    relative to the defaults (below 1: faster). ``seconds`` a finite real number > 0 and
    ``reps`` an int >= 1: TypeError/ValueError naming them otherwise, before anything runs."""
    seconds = _checks.finite_real(seconds, "seconds", positive=True)
    reps = _checks.int_at_least(reps, "reps", 1)
    key = _tuning.machine_key()
    base = _tuning.defaults(key)[0]
    rng = np.random.default_rng(seed)
    _time_step((1, 64), True, base, 1, rng)  # compiles or loads the kernels: not in the budget
    deadline = time.perf_counter() + seconds
    measured: dict = {}
    try:
        other = [dataclasses.replace(base, own_dim=od) for od in OWN_DIMS if od != base.own_dim]
        best = _score(other, PRODUCT_SHAPES, False, base, deadline, reps, rng, measured,
                      "products")
        kts = (best.kt_rows,) if best.own_dim >= 64 else (64, NEVER)  # own: kT never used
        plain = [dataclasses.replace(best, block_q=bq, block_k=bk, kt_rows=kt)
                 for bq, bk in PLAIN_BLOCKS for kt in kts]
        best = _score(plain, PLAIN_SHAPES, False, best, deadline, reps, rng, measured, "plain")
        causal = [dataclasses.replace(best, causal_block_small=small, causal_block=large)
                  for small in CAUSAL_BLOCKS for large in CAUSAL_BLOCKS if large >= small]
        best = _score(causal, CAUSAL_SHAPES, True, best, deadline, reps, rng, measured,
                      "causal")
        small = [dataclasses.replace(best, kt_dim=kd) for kd in KT_DIMS
                 if kd != best.kt_dim and best.own_dim < 32]  # own: tiles always transposed
        best = _score(small, SMALL_HEAD_SHAPES, False, best, deadline, reps, rng, measured,
                      "small heads")
    finally:
        _tuning.use(None)
    path = _tuning.tuning_file()
    if write:
        _tuning.write_file(path, key, best, measured)
        _tuning.use(None)  # read it back: the file is now what is in force
    else:
        _tuning.use(best, "tuned in this process (not stored)")
    return {"setting": dataclasses.asdict(best), "file": path if write else None, "key": key,
            "measured": measured}


def describe() -> dict:
    """The setting in force and where it comes from, with what the kernels run on."""
    setting, source = _tuning.current()
    return {"source": source, "setting": dataclasses.asdict(setting), **_tuning.target()}
