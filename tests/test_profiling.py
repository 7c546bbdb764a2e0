"""fastattn.profile: per-layer and per-kernel timing, and the ``fastattn profile`` command."""

import json

import numpy as np
import pytest

import fastattn
from fastattn import _backend
from fastattn.profiling import find_layers
from fastattn.transformer import TransformerSeq2seq


def _tiny_model(backend="vectorized"):
    return TransformerSeq2seq(7, d_model=8, n_heads=2, n_layers=1, d_ff=16, max_len=6,
                              backend=backend, seed=0)


def _batch(rng):
    xs = rng.integers(0, 7, (3, 5))
    ts = rng.integers(0, 7, (3, 4))
    return xs, ts


def test_profile_times_every_layer_forward_and_backward_and_the_kernels():
    model = _tiny_model()
    xs, ts = _batch(np.random.default_rng(0))
    with fastattn.profile(model) as prof:
        model.forward(xs, ts)
        model.backward()
    layers = {(e.name.split(" ")[0], e.phase) for e in prof.rows("layer")}
    for path in ("model.encoder[0].attn", "model.decoder[0].cross_attn", "model.out"):
        assert (path, "forward") in layers
        assert (path, "backward") in layers
    kernels = {e.name for e in prof.rows("kernel")}
    assert "vectorized:attention_forward" in kernels
    assert "vectorized:attention_backward" in kernels
    for e in prof.rows():
        assert e.calls >= 1
        assert 0.0 <= e.self_time <= e.total + 1e-9
    # the model is the outermost layer: its total covers everything timed inside it
    top = [e for e in prof.rows("layer") if e.name.startswith("model (")]
    assert sum(e.total for e in top) <= prof.wall + 1e-9


def test_profile_leaves_the_model_and_kernels_unpatched():
    model = _tiny_model()
    before = {path: dict(vars(layer)) for path, layer in find_layers(model)}
    with fastattn.profile(model):
        assert "forward" in vars(model)  # patched inside the block
    for path, layer in find_layers(model):
        assert set(vars(layer)) == set(before[path]), path
    assert _backend._profiler is None
    fn = _backend.kernel("softmax_forward", "vectorized")
    assert not hasattr(fn, "__wrapped__")


def test_profiled_results_equal_unprofiled_results():
    rng = np.random.default_rng(1)
    xs, ts = _batch(rng)
    a, b = _tiny_model(), _tiny_model()
    loss_a = a.forward(xs, ts)
    a.backward()
    with fastattn.profile(b):
        loss_b = b.forward(xs, ts)
        b.backward()
    assert loss_a == loss_b
    for ga, gb in zip(a.grads, b.grads, strict=True):
        np.testing.assert_array_equal(ga, gb)


def test_profile_command_prints_tables_and_writes_files(tmp_path, capsys):
    from fastattn.cli import main

    prof_file = tmp_path / "step.prof"
    json_file = tmp_path / "step.json"
    code = main(["profile", "--steps", "1", "--batch-size", "4", "--backend", "vectorized",
                 "--cprofile", str(prof_file), "--json", str(json_file)])
    assert code == 0
    out = capsys.readouterr().out
    assert "MultiHeadAttention" in out and "attention_backward" in out
    host = [line for line in out.splitlines() if line.startswith("host while profiling: ")]
    assert len(host) == 1, out
    from fastattn import _hostload

    if _hostload.cpu_ticks() is not None:
        assert "% of the CPUs' time stolen by the hypervisor, " in host[0]
    import pstats

    stats = pstats.Stats(str(prof_file))
    assert stats.total_calls > 0
    data = json.loads(json_file.read_text())
    assert data["steps"] == 1 and data["entries"]
    assert data["host_load"] == host[0].removeprefix("host while profiling: ")


@pytest.mark.parametrize("bad", [["--steps", "0"], ["--sort", "nope"]])
def test_profile_command_rejects_bad_flags(bad):
    from fastattn.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["profile", *bad])
    assert exc.value.code == 2


def test_profile_of_generate_batch_on_two_threads_adds_up(monkeypatch, threads):
    """generate_batch's chunks on 2 threads: each thread keeps its own open calls, so every
    self time is >= 0 and a parent's total is at least its children's."""
    from fastattn import transformer

    monkeypatch.setattr(transformer, "_GENERATE_ROWS", 16)
    model = TransformerSeq2seq(30, d_model=32, n_heads=4, n_layers=2, d_ff=64, max_len=10,
                               backend="numba", seed=0)
    xs = np.random.default_rng(0).integers(0, 30, (256, 8))
    threads(2)
    with fastattn.profile(model) as prof:
        model.generate_batch(xs, 1, 8)
    rows = {(e.name, e.phase): e for e in prof.rows()}
    assert all(e.self_time >= 0 for e in rows.values()), [
        (e.name, e.self_time) for e in rows.values() if e.self_time < 0]
    assert rows["model.encoder[0].ln1 (LayerNorm)", "infer"].calls == 16  # one per chunk
    # and each block's decoding steps, made by its stepper
    assert rows["model.decoder[0] (DecoderBlock)", "step"].calls == 16 * 8
    assert rows["model.decoder[1] (DecoderBlock)", "step"].calls == 16 * 8
    # their kernels are timed inside them: the steps' self time leaves theirs out
    step = rows["model.decoder[0] (DecoderBlock)", "step"]
    assert 0 <= step.self_time < step.total
    assert not any(phase == "forward" for _, phase in rows), "generation keeps no caches"
    block = rows["model.encoder[0] (EncoderBlock)", "infer"]
    inner = sum(rows[f"model.encoder[0].{n}", "infer"].total for n in (
        "ln1 (LayerNorm)", "attn (MultiHeadAttention)", "ln2 (LayerNorm)",
        "ffn (FeedForward)"))
    assert block.total >= inner


def test_profile_wraps_only_methods_and_fits_every_phase_in_its_column():
    """A layer attribute named like a generation method but not callable (a step counter) is
    left alone; the table's phase column is as wide as its longest phase ("project_kv")."""
    model = TransformerSeq2seq(11, d_model=8, n_heads=2, n_layers=1, d_ff=12, max_len=6,
                               backend="vectorized", seed=0)
    layer = model.encoder[0].ln1
    layer.step = 0
    xs = np.random.default_rng(0).integers(0, 11, (3, 5))
    with fastattn.profile(model) as prof:
        layer.step += 1
        model.generate_batch(xs, 1, 4)
    assert layer.step == 1
    table = prof.table().split("\n\n")
    layers = next(part for part in table if "project_kv" in part).strip().splitlines()
    assert len({len(line) for line in layers}) == 1, layers  # every column lines up


class _Clock:
    """A perf_counter that moves only when a layer says it worked: times known exactly."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class _Nest:
    """A layer whose forward works ``own`` seconds and calls ``inner``'s forward in between."""

    def __init__(self, clock, own, inner=None):
        self.clock, self.own, self.inner = clock, own, inner

    def forward(self):
        self.clock.now += self.own / 2
        if self.inner is not None:
            self.inner.forward()
        self.clock.now += self.own / 2

    def backward(self):
        pass


def test_self_time_leaves_out_every_layer_called_inside_and_no_more(monkeypatch):
    """Three nested layers working 1, 2 and 4 s of their own: the outer one's total is 7 s
    and its self time its own 1 s, whatever the depth below its direct child."""
    clock = _Clock()
    monkeypatch.setattr("fastattn.profiling.time", clock)
    outer = _Nest(clock, 1.0, _Nest(clock, 2.0, _Nest(clock, 4.0)))
    with fastattn.profile(outer) as prof:
        outer.forward()
    got = {e.name.split(" ")[0]: (e.total, e.self_time) for e in prof.rows("layer")
           if e.phase == "forward"}
    assert got == {"model": (7.0, 1.0), "model.inner": (6.0, 2.0),
                   "model.inner.inner": (4.0, 4.0)}


def test_profile_command_times_the_asked_steps_only(tmp_path, capsys):
    """--steps 2: the model's forward and backward each ran twice in the profile (the
    warm-up step that compiles the kernels runs before it)."""
    from fastattn.cli import main

    json_file = tmp_path / "step.json"
    assert main(["profile", "--steps", "2", "--batch-size", "4", "--backend", "vectorized",
                 "--json", str(json_file)]) == 0
    capsys.readouterr()
    entries = json.loads(json_file.read_text())["entries"]
    top = {e["phase"]: e["calls"] for e in entries
           if e["kind"] == "layer" and e["name"].startswith("model (")}
    assert top == {"forward": 2, "backward": 2}


def _table_rows(text):
    """The layers table's rows of ``Profile.table``'s text, split on blanks."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("layers"))
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return rows


def test_table_lists_layers_slowest_first_in_milliseconds_with_their_share(monkeypatch):
    """Three nested layers working 1, 2 and 4 s of their own, then 3 s outside the model, on
    a fake clock: a wall time of 10 s, 3 s of it outside; by self time the innermost layer
    comes first (4000 ms, 40% of the wall time), by total the outermost (7000 ms); --limit
    keeps the first rows."""
    clock = _Clock()
    monkeypatch.setattr("fastattn.profiling.time", clock)
    outer = _Nest(clock, 1.0, _Nest(clock, 2.0, _Nest(clock, 4.0)))
    with fastattn.profile(outer) as prof:
        outer.forward()
        clock.now += 3.0
    text = prof.table()
    assert text.splitlines()[:2] == [
        "wall time inside the profile: 10000.0 ms",
        "outside the model's forward/backward (optimizer, data, glue): 3000.0 ms"]
    # name, class, phase, calls, total ms, self ms, self %
    assert _table_rows(text) == [
        ["model.inner.inner", "(_Nest)", "forward", "1", "4000.00", "4000.00", "40.0"],
        ["model.inner", "(_Nest)", "forward", "1", "6000.00", "2000.00", "20.0"],
        ["model", "(_Nest)", "forward", "1", "7000.00", "1000.00", "10.0"]]
    by_total = [row[0] for row in _table_rows(prof.table(sort="total"))]
    assert by_total == ["model", "model.inner", "model.inner.inner"]
    assert [row[0] for row in _table_rows(prof.table(sort="total", limit=2))] == [
        "model", "model.inner"]


def test_profile_command_hands_its_flags_on_and_reports_ms_per_step(tmp_path, capsys,
                                                                  monkeypatch, threads):
    """--sort total --limit 2 reach the table; --threads 2 --numba-threads 1 hold BLAS at
    two threads and Numba at one while profiling (in a process that runs one and two); the
    printed time per step is the profile's wall time over --steps, and the JSON names the
    steps, the batch size and the backend."""
    import numba
    from helpers import blas_thread_count
    from threadpoolctl import threadpool_limits

    from fastattn import profiling
    from fastattn.cli import main
    from fastattn.kernels import _blas

    _blas.available()  # SciPy's BLAS, which the kernels call, loaded: limited too
    threads(2)
    with threadpool_limits(limits=2, user_api="blas"):
        if blas_thread_count() != 2:
            pytest.skip("BLAS does not run 2 threads here")
    seen = {}
    real_profile, real_table = profiling.profile, profiling.Profile.table

    def profile(*models, **kw):
        seen["threads"] = (blas_thread_count(), numba.get_num_threads())
        return real_profile(*models, **kw)

    def table(self, **kw):
        seen["table"] = kw
        return real_table(self, **kw)

    monkeypatch.setattr(profiling, "profile", profile)
    monkeypatch.setattr(profiling.Profile, "table", table)
    json_file = tmp_path / "step.json"
    with threadpool_limits(limits=1, user_api="blas"):
        assert main(["profile", "--steps", "2", "--batch-size", "4", "--backend",
                     "vectorized", "--sort", "total", "--limit", "2", "--threads", "2",
                     "--numba-threads", "1", "--json", str(json_file)]) == 0
        assert (blas_thread_count(), numba.get_num_threads()) == (1, 2)
    out = capsys.readouterr().out
    assert seen["table"] == {"sort": "total", "limit": 2}
    assert seen["threads"] == (2, 1)
    data = json.loads(json_file.read_text())
    assert (data["steps"], data["batch_size"], data["backend"]) == (2, 4, "vectorized")
    per_step = float(out.split(" ms per step")[0].rsplit(" ", 1)[-1])
    assert per_step == pytest.approx(1e3 * data["wall_seconds"] / 2, abs=0.051)
