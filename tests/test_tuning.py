"""The fused kernels' tuning: defaults per instruction set, the tuning file and ``fastattn tune``.

The file must never make the kernels fail or compute with a setting meant for another machine:
a corrupt or foreign file is ignored with a warning, ``FASTATTN_TUNE=off`` ignores any file, and
two processes writing it at once leave a whole file behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import threading

import numpy as np
import pytest
from helpers import assert_attention_close

import fastattn
from fastattn import cli, tuning
from fastattn.kernels import _blas_workers, _flash, _thread_choice, _tuning, loop


@pytest.fixture(autouse=True)
def tune_file(tmp_path, monkeypatch):
    """Each test has its own tuning file and reads the setting afresh."""
    path = tmp_path / "tuning.json"
    monkeypatch.setenv("FASTATTN_TUNE_FILE", str(path))
    monkeypatch.delenv("FASTATTN_TUNE", raising=False)
    _tuning.use(None)
    yield path
    _tuning.use(None)


def _small_setting():
    return dataclasses.replace(_tuning.DEFAULTS["avx512"], block_q=16, block_k=8)


def test_isa_follows_the_cpu_name_and_its_features():
    assert _tuning._isa_of("haswell", set()) == "avx2"
    assert _tuning._isa_of("znver3", set()) == "avx2"
    assert _tuning._isa_of("znver4", set()) == "avx512"
    assert _tuning._isa_of("skylake-avx512", set()) == "avx512"
    assert _tuning._isa_of("generic", {"avx512f", "avx2"}) == "avx512"
    assert _tuning._isa_of("generic", {"avx2", "fma"}) == "avx2"
    assert _tuning._isa_of("generic", {"sse4.2"}) == "other"


@pytest.mark.parametrize("features", [None, "+avx2,+fma"], ids=["host", "avx2"])
def test_the_isa_is_that_of_the_code_numba_makes_for_a_named_cpu(features):
    """With NUMBA_CPU_NAME=haswell, Numba compiles with NUMBA_CPU_FEATURES, else with the
    host's features (on an AVX-512 host: AVX-512 code). The instruction set that target()
    reports is "avx512" exactly when the machine code of a vectorised loop uses 512-bit
    registers (the haswell CPU does not prefer 256-bit ones)."""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "FASTATTN_TUNE": "off"}
    env.pop("NUMBA_CPU_FEATURES", None)
    if features:
        env["NUMBA_CPU_FEATURES"] = features
    code = textwrap.dedent("""
        import json
        import numpy as np
        from numba import njit
        from fastattn.kernels import _tuning

        @njit
        def axpy(x, y):
            for i in range(x.size):
                y[i] += 2.5 * x[i]

        x = np.ones(1000, np.float32)
        axpy(x, x.copy())
        asm = axpy.inspect_asm(axpy.signatures[0])
        print(json.dumps([_tuning.target()["isa"], "zmm" in asm]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    isa, zmm = json.loads(out.stdout.strip().splitlines()[-1])
    assert (isa == "avx512") == zmm, (isa, zmm)
    if features:
        assert isa == "avx2" and not zmm


def test_forced_avx2_setting_selects_the_avx2_defaults():
    """NUMBA_CPU_NAME=haswell with NUMBA_CPU_FEATURES=+avx2,+fma makes Numba compile AVX2
    code: the AVX2 defaults follow."""
    env = {**os.environ, "NUMBA_CPU_NAME": "haswell", "NUMBA_CPU_FEATURES": "+avx2,+fma",
           "OPENBLAS_CORETYPE": "Haswell"}
    env.pop("FASTATTN_TUNE_FILE", None)
    env["FASTATTN_TUNE"] = "off"
    code = ("from fastattn.kernels import _tuning; import json; s, src = _tuning.current(); "
            "print(json.dumps([_tuning.target(), src]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=120)
    target, source = json.loads(out.stdout.strip().splitlines()[-1])
    assert target["cpu"] == "haswell" and target["isa"] == "avx2"
    assert target["blas_kernel"].lower() == "haswell"
    assert source.startswith("defaults for avx2")


@pytest.mark.parametrize("kernel", ["Haswell", "Zen", "Sandybridge", "SkylakeX", "Cooperlake",
                                    "SapphireRapids"])
def test_avx512_kernels_send_every_tile_product_to_the_own_micro_kernel_when_blas_is_narrower(
        kernel):
    """AVX-512 kernels with OpenBLAS on one of its AVX2-or-narrower kernels: the AVX-512
    defaults with every head (up to the largest own_dim a setting may hold) by the own
    micro-kernel, and a source that says why; with an AVX-512 OpenBLAS kernel, another BLAS or
    AVX2 kernels, the instruction set's defaults unchanged."""
    narrower = kernel not in ("SkylakeX", "Cooperlake", "SapphireRapids")
    base = _tuning.DEFAULTS["avx512"]
    t = {"isa": "avx512", "blas": "openblas", "blas_kernel": kernel}
    got, source = _tuning.defaults(t)
    if narrower:
        assert got == dataclasses.replace(base, own_dim=got.own_dim), got
        with pytest.raises(ValueError, match="own_dim"):  # no setting covers wider heads
            dataclasses.replace(got, own_dim=got.own_dim + 1).check()
        assert source.startswith("defaults for avx512") and kernel in source, source
    else:
        assert (got, source) == (base, "defaults for avx512")
        assert got.own_dim < 64  # the suite's 64-wide heads go to BLAS
    for other in ({**t, "blas": "mkl"}, {**t, "blas": "unknown", "blas_kernel": "unknown"}):
        assert _tuning.defaults(other) == (base, "defaults for avx512")
    assert _tuning.defaults({**t, "isa": "avx2"}) == (_tuning.DEFAULTS["avx2"],
                                                      "defaults for avx2")


@pytest.mark.parametrize("coretype", ["Haswell", "SkylakeX"])
def test_openblas_coretype_decides_the_avx512_products_in_a_process(coretype):
    """On an AVX-512 host, a process whose OpenBLAS runs its Haswell kernels
    (OPENBLAS_CORETYPE=Haswell) puts 64-wide heads' tile products on the own micro-kernel;
    with its SkylakeX kernels, on BLAS (the plain forward's own flag, seen by a spy)."""
    if _tuning.compiled_isa() != "avx512":  # the child inherits this environment
        pytest.skip("the kernels are not AVX-512 code here")
    env = {**os.environ, "OPENBLAS_CORETYPE": coretype, "FASTATTN_TUNE": "off"}
    code = textwrap.dedent("""
        import json
        import numpy as np
        import fastattn
        from fastattn.kernels import _flash, _tuning

        seen = []
        run = _flash._in_parallel

        def spy(fn, n_units, flops, serial_flops, *args):
            seen.append(bool(args[-1]))
            return run(fn, n_units, flops, serial_flops, *args)

        _flash._in_parallel = spy
        q = np.ones((2, 5, 64), np.float32)
        fastattn.attention_forward(q, q, q, backend="numba")
        print(json.dumps([_tuning.target()["blas_kernel"], _tuning.current()[1], seen]))
    """)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True, timeout=300)
    kernel, source, seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert kernel.lower() == coretype.lower(), kernel
    assert seen == [coretype == "Haswell"], (seen, source)
    assert (coretype in source) == (coretype == "Haswell"), source


def test_a_matching_file_is_in_force(tune_file):
    st = _small_setting()
    _tuning.write_file(str(tune_file), _tuning.machine_key(), st)
    got, source = _tuning.current()
    assert got == st and source.startswith("tuned")


def test_fastattn_tune_off_ignores_the_file(tune_file, monkeypatch):
    _tuning.write_file(str(tune_file), _tuning.machine_key(), _small_setting())
    monkeypatch.setenv("FASTATTN_TUNE", "off")
    got, source = _tuning.current()
    assert got == _tuning.defaults(_tuning.target())[0]
    assert "FASTATTN_TUNE=off" in source


@pytest.mark.parametrize("field", ["cpu", "isa", "blas", "blas_kernel", "blas_version",
                                   "numba", "numpy"])
def test_a_file_tuned_for_another_machine_is_ignored_with_a_warning(tune_file, field):
    """Every field of the machine key counts: a file tuned on another CPU, or with another BLAS
    kernel or version, or another numba or numpy, is another machine's."""
    key = _tuning.machine_key()
    assert set(key) == {"cpu", "isa", "blas", "blas_kernel", "blas_version", "numba", "numpy"}
    _tuning.write_file(str(tune_file), {**key, field: f"not-{key[field]}"}, _small_setting())
    with pytest.warns(UserWarning, match="tuned for"):
        got, source = _tuning.current()
    assert got == _tuning.defaults(_tuning.target())[0] != _small_setting()
    assert source.startswith("defaults")


def _valid_data():
    return {"format": _tuning.FORMAT, "key": _tuning.machine_key(),
            "setting": dataclasses.asdict(_small_setting())}


@pytest.mark.parametrize("corrupt", [
    lambda d: b"\x00\xff not json",
    lambda d: b'{"format": 1, "key": ',  # truncated
    lambda d: json.dumps([1, 2]).encode(),
    lambda d: json.dumps({**d, "format": 99}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "block_q": 0}}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "block_k": 10**9}}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "kt_rows": 64.5}}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "extra": 1}}).encode(),
    lambda d: json.dumps({k: v for k, v in d.items() if k != "setting"}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "kt_dim": -1}}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "own_dim": 2000}}).encode(),
    lambda d: json.dumps({**d, "setting": {**d["setting"], "own_dim": True}}).encode(),
    # a file of format 1, which had no kt_dim
    lambda d: json.dumps({**d, "format": 1, "setting": {
        k: v for k, v in d["setting"].items() if k != "kt_dim"}}).encode(),
], ids=["binary", "truncated", "not-a-dict", "format", "zero-block", "huge-block",
        "float", "extra-field", "no-setting", "negative-kt-dim", "huge-own-dim", "bool-own-dim",
        "format-1"])
def test_a_corrupt_file_is_ignored_with_a_warning(tune_file, corrupt):
    tune_file.write_bytes(corrupt(_valid_data()))
    with pytest.warns(UserWarning, match="ignoring the tuning file"):
        got, _ = _tuning.current()
    assert got == _tuning.defaults(_tuning.target())[0]


def test_a_file_of_the_previous_format_is_ignored_and_said_to_be_old(tune_file):
    """A format-2 file (before own_dim) is not called corrupt: the warning says to tune
    again."""
    d = _valid_data()
    d = {**d, "format": 2, "setting": {k: v for k, v in d["setting"].items() if k != "own_dim"}}
    tune_file.write_text(json.dumps(d))
    with pytest.warns(UserWarning, match="written in format 2.*run 'fastattn tune' again"):
        got, _ = _tuning.current()
    assert got == _tuning.defaults(_tuning.target())[0]


def test_the_valid_data_of_the_corrupt_cases_is_accepted(tune_file):
    """The corrupt cases above differ from a valid file only in what they break."""
    tune_file.write_text(json.dumps(_valid_data()))
    assert _tuning.current()[0] == _small_setting()


def test_setting_values_are_checked_before_writing(tune_file):
    bad = dataclasses.replace(_small_setting(), min_units=0)
    with pytest.raises(ValueError, match="min_units"):
        _tuning.write_file(str(tune_file), _tuning.machine_key(), bad)
    assert not tune_file.exists()


def test_the_tuning_file_is_synced_whole_before_it_is_renamed(tune_file, monkeypatch):
    """The file is written to a temporary, synced to disk at its full size, then renamed:
    a crash of the machine leaves the old file or the whole new one."""
    from helpers import record_syncs_and_renames

    events = record_syncs_and_renames(monkeypatch)
    _tuning.write_file(str(tune_file), _tuning.machine_key(), _small_setting())
    size = tune_file.stat().st_size
    assert [e[0] for e in events] == ["fsync", "replace"], events
    assert events[0] == ("fsync", size)
    assert events[1][1].startswith(".tmp-") and events[1][2:] == ("tuning.json", size)
    assert _tuning.current()[0] == _small_setting()


def test_two_processes_writing_at_once_leave_a_whole_file(tune_file):
    """Two writers replace the file 200 times each while this process reads it: every read
    sees a whole file (one writer's or the other's), never a torn or empty one."""
    script = textwrap.dedent(f"""
        import dataclasses, sys
        from fastattn.kernels import _tuning
        st = dataclasses.replace(_tuning.DEFAULTS["avx512"], block_q=int(sys.argv[1]))
        key = {{"writer": sys.argv[1]}}
        for _ in range(200):
            _tuning.write_file({str(tune_file)!r}, key, st)
    """)
    writers = [subprocess.Popen([sys.executable, "-c", script, str(bq)]) for bq in (16, 32)]
    seen = set()
    while any(w.poll() is None for w in writers):
        try:
            data = json.loads(tune_file.read_text())
        except FileNotFoundError:
            continue
        seen.add(data["setting"]["block_q"])
        assert data["key"] == {"writer": str(data["setting"]["block_q"])}
    assert all(w.wait(timeout=120) == 0 for w in writers)
    final = json.loads(tune_file.read_text())
    assert final["setting"]["block_q"] in (16, 32)
    assert not list(tune_file.parent.glob(".tmp-*")), "no temporary file is left behind"


def test_a_setting_put_in_force_while_another_thread_reads_the_file_stays(monkeypatch):
    """use() on one thread while another thread's first current() is still reading the file:
    the setting put in force wins, and the read does not overwrite it afterwards."""
    reading, release = threading.Event(), threading.Event()
    loaded = (_tuning.DEFAULTS["avx512"], "read from the file")

    def slow_load():
        reading.set()
        assert release.wait(timeout=30)
        return loaded

    monkeypatch.setattr(_tuning, "_load", slow_load)
    chosen = _small_setting()
    reader = threading.Thread(target=_tuning.current)
    reader.start()
    assert reading.wait(timeout=30)
    setter = threading.Thread(target=_tuning.use, args=(chosen, "set by a test"))
    setter.start()
    setter.join(timeout=0.2)  # long enough for an unguarded use() to be over
    release.set()
    reader.join(timeout=30)
    setter.join(timeout=30)
    assert not reader.is_alive() and not setter.is_alive()
    assert _tuning.current() == (chosen, "set by a test")


def test_the_setting_in_force_decides_the_kernels_blocks(rng):
    """With a tuned setting the kernels compute exactly what explicit tiles of that size
    compute (and the defaults, with other tiles, round differently: the check can fail)."""
    q, k, v = (rng.standard_normal((2, 40, 8)).astype(np.float32) for _ in range(3))
    default_out, _ = _flash.attention_forward(q, k, v, 0.3, False, None)
    _tuning.use(_small_setting())
    tuned_out, tuned_lse = _flash.attention_forward(q, k, v, 0.3, False, None)
    explicit_out, _ = _flash.attention_forward(q, k, v, 0.3, False, None, tiles=(16, 8))
    assert np.array_equal(tuned_out, explicit_out)
    assert not np.array_equal(tuned_out, default_out), "tiles must change the rounding here"
    ref, ref_lse = loop.attention_forward(*(a.astype(np.float64) for a in (q, k, v)), 0.3,
                                          False, None)
    # |out| <= max |v| and each entry sums 40 terms: a few dozen float32 epsilons
    bound = 40 * 4 * np.finfo(np.float32).eps * np.abs(v).max()
    assert np.abs(tuned_out - ref).max() <= bound
    assert np.abs(tuned_lse - ref_lse).max() <= bound


@pytest.mark.parametrize("kt_dim", [0, 16])
def test_kt_dim_decides_whether_the_backward_transposes_small_heads(kt_dim, monkeypatch, rng):
    """Query tiles of fewer rows than kt_rows: the backward transposes its key and value tiles
    exactly when the head dim is at most kt_dim, in both fused kernels (plain and features),
    and either way matches the loop reference (float64, to 1e-10)."""
    from fastattn.kernels import _flash_features as ff
    from fastattn.kernels import _flash_tiles as tiles

    _tuning.use(dataclasses.replace(_tuning.DEFAULTS["avx512"], kt_rows=64, kt_dim=kt_dim,
                                    own_dim=0))  # BLAS products: kt_dim decides
    seen = []
    run = _flash._in_parallel

    def spy(fn, n_units, flops, serial_flops, *args):
        if fn is _flash._backward_units:
            seen.append(("plain", bool(args[-3])))  # use_kT, then chunk and own
        elif fn is ff._backward_units:
            seen.append(("features", bool(args[15][tiles._USE_KT])))  # cfg
        return run(fn, n_units, flops, serial_flops, *args)

    monkeypatch.setattr(_flash, "_in_parallel", spy)
    monkeypatch.setattr(ff, "_in_parallel", spy)
    for d in (16, 24):
        q, k, v, dout = (rng.standard_normal((3, 9, d)) for _ in range(4))
        for kw in ({}, {"window": (4, 0)}):  # plain, then the features kernel
            seen.clear()
            out, lse = fastattn.attention_forward(q, k, v, causal=True, backend="numba", **kw)
            got = (out, lse) + fastattn.attention_backward(dout, q, k, v, out, lse,
                                                           causal=True, backend="numba", **kw)
            assert seen == [("features" if kw else "plain", d <= kt_dim)], seen
            want = fastattn.attention_forward(q, k, v, causal=True, backend="loop", **kw)
            want = want + fastattn.attention_backward(dout, q, k, v, *want, causal=True,
                                                      backend="loop", **kw)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_keys_hold_k_transposed_in_rows_apart_from_the_cache_sets(dtype, rng):
    """The forward's transposed keys: the first Tk columns are exactly k^T, the array is
    C-contiguous (one kernel specialisation, whatever Tk), and rows are never a multiple of
    1 KiB apart (rows that are fall into a few L1 cache sets), at most a cache line longer
    than Tk items."""
    for Tk in (1, 7, 64, 128, 200, 256, 512, 1024):
        k = rng.standard_normal((2, 3, Tk, 8)).astype(dtype)
        kT = _flash.transposed_keys(k)
        assert kT.flags.c_contiguous and kT.shape[:3] == (2, 3, 8)
        assert np.array_equal(kT[..., :Tk], np.swapaxes(k, -1, -2))
        assert kT.strides[-2] % 1024 != 0, (Tk, kT.strides)
        assert Tk <= kT.shape[-1] <= Tk + 64 // kT.itemsize
        kT3 = _flash.transposed_keys(k[0])  # the features kernel's (B, Tk, d)
        assert kT3.shape == kT.shape[1:] and np.array_equal(kT3[..., :Tk], kT[0, ..., :Tk])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_transposed_keys_on_the_kernels_threads_from_heads_in_place(dtype, monkeypatch, rng,
                                                                    threads):
    """With the forward's flops above serial_flops, the transposed keys are copied on the
    kernels' threads (NumPy's BLAS worker runs, or a pool worker is asked for, and every
    (batch entry, head) is a unit), from heads that are strided views of a (B, T, H, d)
    array, at key lengths on both sides of _LONG_KEYS (the two loop orders): exactly k^T
    either way."""
    asked, units = [], []
    real_pool, run = _flash.pool, _flash._in_parallel
    monkeypatch.setattr(_flash, "pool", lambda n, **kw: asked.append(n) or real_pool(n, **kw))

    def spy(fn, n_units, *args):
        if fn is _flash._transpose_units:
            units.append(n_units)
        return run(fn, n_units, *args)

    monkeypatch.setattr(_flash, "_in_parallel", spy)
    threads(2)
    # one kind of call three times over (the same units and flops): all the threads each time,
    # not the one-thread turns of _thread_choice
    with _thread_choice.fixed():
        for Tk in (_flash._LONG_KEYS - 1, _flash._LONG_KEYS, 512):
            asked.clear()
            base = rng.standard_normal((3, Tk, 4, 16)).astype(dtype)  # (B, T, H, d)
            k = base.transpose(0, 2, 1, 3)  # (B, H, T, d) heads, not contiguous
            before = _blas_workers.calls[0]
            kT = _flash.transposed_keys(k, flops=2, serial_flops=1)
            # a helper thread: NumPy's BLAS worker, else one of the kernels' pool
            by_workers = _blas_workers.calls[0] - before
            assert asked == [1] * (1 - by_workers) and units[-1] == 12, (asked, units)
            assert np.array_equal(kT[..., :Tk], np.swapaxes(k, -1, -2)), Tk
            asked.clear()
            before = _blas_workers.calls[0]
            kT1 = _flash.transposed_keys(k, flops=1, serial_flops=2)  # small: this thread
            assert asked == [] and _blas_workers.calls[0] == before
            assert np.array_equal(kT1[..., :Tk], kT[..., :Tk])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_forward_with_transposed_keys_matches_the_loop_at_padded_rows(dtype, monkeypatch,
                                                                         rng):
    """With the key tiles transposed (kt_rows 1, BLAS products), at key lengths whose rows
    take a whole number of KiB (the transposed keys then have an extra, unset cache line per
    row) and at one that does not: both fused forwards read the transposed keys (seen by a
    spy) and match the loop reference within the computation's error bound."""
    from fastattn.kernels import _flash_features as ff

    _tuning.use(dataclasses.replace(_tuning.DEFAULTS["avx512"], kt_rows=1, own_dim=0))
    seen = []
    run = _flash._in_parallel

    def spy(fn, n_units, flops, serial_flops, *args):
        if fn in (_flash._forward_units, ff._forward_units):
            seen.append(args[2].shape[-1])  # kT's row length (the stand-in's 1 without it)
        return run(fn, n_units, flops, serial_flops, *args)

    monkeypatch.setattr(_flash, "_in_parallel", spy)
    monkeypatch.setattr(ff, "_in_parallel", spy)
    padded = 256 if dtype == np.float32 else 128  # rows of 1 KiB
    for Tk in (padded, 40):
        q, k, v = (rng.standard_normal((2, n, 24)).astype(dtype) for n in (20, Tk, Tk))
        for kw in ({}, {"window": (Tk, Tk)}):  # plain, then the features kernel
            seen.clear()
            got = fastattn.attention_forward(q, k, v, backend="numba", **kw)
            assert seen == [Tk + (64 // q.itemsize if Tk == padded else 0)], seen
            want = fastattn.attention_forward(*(a.astype(np.float64) for a in (q, k, v)),
                                              backend="loop", **kw)
            assert_attention_close(got, want, q, k, v, err_msg=f"Tk {Tk} {kw}", **kw)


def test_own_dim_decides_which_heads_take_the_own_products(monkeypatch, rng):
    """The tile products go to the kernels' own micro-kernel exactly for heads up to own_dim
    wide, in both fused kernels (plain and features) and both directions, and either way
    match the loop reference (float64, to 1e-10)."""
    from fastattn.kernels import _flash_features as ff
    from fastattn.kernels._flash_tiles import _OWN

    _tuning.use(dataclasses.replace(_tuning.DEFAULTS["avx512"], own_dim=16))
    seen = []
    run = _flash._in_parallel

    def spy(fn, n_units, flops, serial_flops, *args):
        if fn in (_flash._forward_units, _flash._backward_units):
            seen.append(("plain", bool(args[-1])))
        elif fn in (ff._forward_units, ff._backward_units):
            seen.append(("features", bool(args[8 if fn is ff._forward_units else 15][_OWN])))
        return run(fn, n_units, flops, serial_flops, *args)

    monkeypatch.setattr(_flash, "_in_parallel", spy)
    monkeypatch.setattr(ff, "_in_parallel", spy)
    for d in (16, 24):
        q, k, v, dout = (rng.standard_normal((3, 9, d)) for _ in range(4))
        for kw in ({}, {"window": (4, 0)}):
            seen.clear()
            out, lse = fastattn.attention_forward(q, k, v, causal=True, backend="numba", **kw)
            got = (out, lse) + fastattn.attention_backward(dout, q, k, v, out, lse,
                                                           causal=True, backend="numba", **kw)
            assert seen == [("features" if kw else "plain", d <= 16)] * 2, seen
            want = fastattn.attention_forward(q, k, v, causal=True, backend="loop", **kw)
            want = want + fastattn.attention_backward(dout, q, k, v, *want, causal=True,
                                                      backend="loop", **kw)
            for g, w in zip(got, want, strict=True):
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.fixture
def blas_holds(monkeypatch):
    """A list that receives, per hold of BLAS at one thread by the kernels
    (``_flash._OneBlasThread``), the thread counts of the BLAS pools inside the hold."""
    from fastattn.kernels import _blas

    held = []

    class Spy(_blas.OneThread):
        def __enter__(self):
            super().__enter__()
            held.append({lib.num_threads for lib in _blas.pools()})
            return self

    monkeypatch.setattr(_flash, "_OneBlasThread", Spy)
    return held


def test_blas_is_held_at_one_thread_exactly_when_the_plain_kernels_call_it(blas_holds, rng):
    """The plain fused kernels hold BLAS at one thread around their units when their tile
    products go to BLAS (heads wider than own_dim), and skip that hold (some microseconds a
    call) when the own micro-kernel takes every product; either way the results match the
    loop reference (float64, to 1e-10)."""
    from fastattn.kernels import _blas

    _tuning.use(dataclasses.replace(_tuning.DEFAULTS["avx512"], own_dim=16))
    held = blas_holds
    for d in (16, 24):
        q, k, v, dout = (rng.standard_normal((3, 9, d)) for _ in range(4))
        held.clear()
        out, lse = fastattn.attention_forward(q, k, v, causal=True, backend="numba")
        got = (out, lse) + fastattn.attention_backward(dout, q, k, v, out, lse, causal=True,
                                                       backend="numba")
        assert held == ([] if d <= 16 else [{1}, {1}] if _blas.pools() else [set()] * 2), held
        want = fastattn.attention_forward(q, k, v, causal=True, backend="loop")
        want = want + fastattn.attention_backward(dout, q, k, v, *want, causal=True,
                                                  backend="loop")
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


def test_unfused_products_follow_own_dim_and_hold_blas_only_when_they_call_it(
        monkeypatch, threads, blas_holds, rng):
    """The unfused product kernels (weighted_sum_*, scores_*) take the own micro-kernel
    exactly for heads up to own_dim wide, as the fused kernels do, in their serial and their
    parallel paths; in parallel they hold BLAS at one thread only when they call it. Either
    way they match the loop reference (float64, to 1e-10)."""
    from fastattn.kernels import _blas, numba_backend

    _tuning.use(dataclasses.replace(_tuning.DEFAULTS["avx512"], own_dim=16))
    monkeypatch.setattr(numba_backend, "_PARALLEL_MIN_MACS", 0)
    threads(2)
    seen, held = [], blas_holds
    run_products = numba_backend._run_products

    def products(args, parallel, own):
        seen.append((parallel, own))
        return run_products(args, parallel, own)

    monkeypatch.setattr(numba_backend, "_run_products", products)
    one_thread = [{1}] if _blas.pools() else [set()]
    for d in (16, 24):
        for B in (1, 4):  # one batch entry: on this thread; four: in parallel
            s, ds = rng.random((B, 5, 7)), rng.standard_normal((B, 5, 7))
            q, k, dz = (rng.standard_normal((B, T, d)) for T in (5, 7, 5))
            calls = {"weighted_sum_forward": (s, k), "weighted_sum_backward": (dz, s, k),
                     "scores_forward": (q, k, 0.3), "scores_backward": (ds, q, k, 0.3)}
            for name, args in calls.items():
                seen.clear()
                held.clear()
                got = getattr(numba_backend, name)(*args)
                assert seen == [(B > 1, d <= 16)], (name, d, B, seen)
                assert held == (one_thread if B > 1 and d > 16 else []), (name, d, B, held)
                want = getattr(loop, name)(*args)
                for g, w in zip(got if isinstance(got, tuple) else (got,),
                                want if isinstance(want, tuple) else (want,), strict=True):
                    np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kw, err, msg", [
    (dict(seconds="60"), TypeError, "^seconds must be a real number"),  # was '>' not supported
    (dict(seconds=float("inf")), ValueError, "^seconds must be a finite positive"),  # ran on
    (dict(seconds=0), ValueError, "^seconds must be a finite positive"),
    (dict(seconds=float("nan")), ValueError, "^seconds must be a finite positive"),
    (dict(seconds=np.array(-1.0)), ValueError, "^seconds must be a finite positive"),  # a number
    (dict(reps=True), TypeError, "^reps must be an int"),  # was taken as 1
    (dict(reps=0), ValueError, "^reps must be >= 1"),
], ids=["seconds-str", "seconds-inf", "seconds-0", "seconds-nan", "seconds-0d", "reps-bool",
        "reps-0"])
def test_tune_checks_its_budget_naming_it_before_measuring(kw, err, msg, monkeypatch):
    def measured(*args):
        raise AssertionError("tune measured before checking its arguments")

    monkeypatch.setattr(tuning, "_time_step", measured)
    with pytest.raises(err, match=msg):
        fastattn.tune(**kw, write=False)


def test_tune_measures_stores_and_puts_the_winner_in_force(tune_file):
    result = fastattn.tune(0.2, reps=1)
    assert result["file"] == str(tune_file)
    assert result["measured"], "at least one candidate is measured whatever the budget"
    assert all(r > 0 for r in result["measured"].values())
    stored = json.loads(tune_file.read_text())
    assert stored["key"] == _tuning.machine_key()
    assert stored["setting"] == result["setting"]
    got, source = _tuning.current()
    assert dataclasses.asdict(got) == result["setting"] and source.startswith("tuned")


def _fake_times(monkeypatch, fastest):
    """Replace the measurement of a step by a time that depends on the setting only: 0.5 s
    for each field where it has ``fastest``'s value, else 1.5 s, multiplied together (no
    kernel runs, so every candidate is measured within any budget)."""
    def time_step(shape, causal, setting, reps, rng):
        t = 1.0
        for name, value in fastest.items():
            t *= 0.5 if getattr(setting, name) == value else 1.5
        return t

    monkeypatch.setattr(tuning, "_time_step", time_step)


def test_tune_keeps_the_candidate_that_takes_the_least_time(monkeypatch, tune_file):
    """Steps timed by a stand-in that is fastest with BLAS products, 64x128 tiles without
    transposed keys, causal tiles 32/128 and kt_dim 16 (each a candidate of its stage): tune
    finds that setting and, without writing, puts it in force in this process."""
    fastest = dict(own_dim=0, block_q=64, block_k=128, kt_rows=tuning.NEVER,
                   causal_block_small=32, causal_block=128, kt_dim=16)
    _fake_times(monkeypatch, fastest)
    result = tuning.tune(1000.0, reps=1, write=False)
    chosen = {k: result["setting"][k] for k in fastest}
    assert chosen == fastest, result["measured"]
    assert result["file"] is None and not tune_file.exists()
    got, source = _tuning.current()
    assert {k: getattr(got, k) for k in fastest} == fastest
    assert source == "tuned in this process (not stored)"


def test_tune_command_hands_its_budget_and_dry_run_to_tune(monkeypatch, capsys, tune_file):
    """--seconds 7.5 and --dry-run reach fastattn.tune (seconds=7.5, write=False); without
    --dry-run it writes."""
    seen = []
    real = tuning.tune

    def tune(seconds, **kw):
        seen.append((seconds, kw.get("write", True)))
        return real(seconds, **kw)

    _fake_times(monkeypatch, dict(block_q=64))
    monkeypatch.setattr(tuning, "tune", tune)
    assert cli.main(["tune", "--seconds", "7.5", "--dry-run"]) == 0
    assert cli.main(["tune", "--seconds", "2"]) == 0
    out = capsys.readouterr().out
    assert seen == [(7.5, False), (2.0, True)]
    assert "not stored (--dry-run)" in out and f"stored in {tune_file}" in out
    assert tune_file.exists()


def test_the_tuning_file_lives_in_the_users_cache_folder(monkeypatch, tmp_path):
    """Without FASTATTN_TUNE_FILE: $XDG_CACHE_HOME/fastattn/tuning.json, else
    ~/.cache/fastattn/tuning.json; the folder is made when the file is first written."""
    monkeypatch.delenv("FASTATTN_TUNE_FILE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = tmp_path / "cache" / "fastattn" / "tuning.json"
    assert _tuning.tuning_file() == str(path)
    _tuning.write_file(_tuning.tuning_file(), _tuning.machine_key(), _small_setting())
    assert _tuning.current() == (_small_setting(), f"tuned ({path})")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert _tuning.tuning_file() == str(tmp_path / "home" / ".cache" / "fastattn" /
                                        "tuning.json")


def test_tune_rejects_a_bad_budget():
    with pytest.raises(ValueError, match="seconds"):
        tuning.tune(0)
    with pytest.raises(ValueError, match="reps"):
        tuning.tune(1, reps=0)


def test_tune_command_dry_run_writes_nothing(tune_file, capsys):
    assert cli.main(["tune", "--seconds", "0.1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "not stored" in out and "chosen: blocks" in out
    assert not tune_file.exists()


def test_tune_command_rejects_a_bad_budget(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["tune", "--seconds", "-1"])
    assert exc.value.code == 2
    assert "--seconds" in capsys.readouterr().err


def test_info_names_the_isa_the_blas_kernel_and_the_setting(capsys, tune_file):
    _tuning.write_file(str(tune_file), _tuning.machine_key(), _small_setting())
    assert cli.main(["info"]) == 0
    text = capsys.readouterr().out
    isa = _tuning.target()["isa"]
    assert f"({isa})" in text and "blas kernel:" in text
    assert f"tuned ({tune_file})" in text and "16x8" in text


def test_tune_times_each_candidate_with_the_thread_count_fixed(monkeypatch, tune_file, rng):
    """The kernels' per-call choice of their thread count (``_thread_choice``) is off while
    tune times a candidate, and on again afterwards."""
    seen, real = [], _flash.attention_forward

    def forward(*args, **kw):
        seen.append(_thread_choice.active())
        return real(*args, **kw)

    monkeypatch.setattr(_thread_choice, "ENABLED", True)
    monkeypatch.setattr(_flash, "attention_forward", forward)
    assert tuning._time_step((2, 16), False, _small_setting(), 2, rng) > 0
    assert seen == [False] * 3
    assert _thread_choice.active()
