"""fit(blas_threads="auto"), the default: BLAS's thread count chosen from the steps' times
(fastattn._adaptive_blas). The policy runs on made-up step times; BLAS itself, the Trainer
and the command line on the real thing."""

from __future__ import annotations

import numpy as np
import pytest

from fastattn._adaptive_blas import AdaptiveBlas
from fastattn.commands.train import limit_threads
from fastattn.kernels import _blas
from fastattn.optim import Adam
from fastattn.trainer import Trainer
from fastattn.transformer import TransformerSeq2seq


class Machine:
    """Step times of a made-up 2-core machine, as the README's Xeon behaves: quiet, a step
    takes 1.0 on 2 BLAS threads and ``one`` on 1; with ``load`` (another process keeps a
    core busy) 2 threads take ``loaded``, one thread still ``one``. Records every count
    the policy sets."""

    def __init__(self, one=1.6, loaded=2.0):
        self.one, self.loaded, self.load, self.set = one, loaded, False, []

    def seconds(self, count):
        return self.one if count == 1 else self.loaded if self.load else 1.0

    def run(self, blas, steps):
        for _ in range(steps):
            blas.step(self.seconds(blas.running))


def test_a_quiet_machine_stays_on_every_core_and_probes_one_thread_ever_less_often():
    m = Machine()
    with AdaptiveBlas(probe=3, every=10, most=2, limits=m.set.append) as blas:
        m.run(blas, 300)
    # 3 steps to measure, 3 on one thread; then 20, 40, 80, 80 steps on 2 threads before
    # each probe of 3 (each probe lost: the wait, 10, doubles, up to 8 every)
    want = [2] * 3 + [1] * 3
    for wait in (20, 40, 80, 80):
        want += [2] * wait + [1] * 3
    assert blas.counts == (want + [2] * 300)[:300]
    assert m.set == [1, 2] * 5  # BLAS is set only when the count changes
    assert blas.current == 2


def test_a_loaded_machine_goes_to_one_thread_and_comes_back_when_the_load_ends():
    m = Machine()
    m.load = True
    with AdaptiveBlas(probe=3, every=10, most=2, limits=m.set.append) as blas:
        m.run(blas, 6)
        assert blas.counts == [2] * 3 + [1] * 3 and blas.current == 1
        m.run(blas, 13)  # on one thread, a probe of two threads after 10 steps: it stays
        assert blas.counts[6:] == [1] * 10 + [2] * 3 and blas.current == 1
        m.load = False
        m.run(blas, 23)  # the next probe (20 steps on: the last one lost) finds 2 faster
        assert blas.counts[19:] == [1] * 20 + [2] * 3 and blas.current == 2
        m.run(blas, 13)  # a probe that won: the wait is back at 10 steps
        assert blas.counts[42:] == [2] * 10 + [1] * 3 and blas.current == 2


def test_load_that_slows_the_steps_down_starts_a_probe_at_once():
    """The steps on the current count growing ``jump`` times slower than at the last choice
    start a probe before ``every`` steps have passed."""
    m = Machine()
    with AdaptiveBlas(probe=3, every=50, most=2, limits=m.set.append) as blas:
        m.run(blas, 10)  # chose 2 threads after the first probe
        assert blas.current == 2 and blas.counts[-1] == 2
        m.load = True  # 2 times slower on 2 threads: more than jump (1.5)
        m.run(blas, 5)  # 2 slow steps make the median of 3 slow; then the probe
        assert blas.counts[10:] == [2] * 2 + [1] * 3 and blas.current == 1


def test_a_probe_must_win_by_the_margin():
    m = Machine(one=0.98, loaded=1.0)  # one thread 2% faster: below the 5% margin
    with AdaptiveBlas(probe=3, every=10, most=2, limits=m.set.append) as blas:
        m.run(blas, 6)
    assert blas.current == 2 and m.set == [1, 2]


def test_one_count_only_changes_nothing():
    m = Machine()
    with AdaptiveBlas(most=1, limits=m.set.append) as blas:
        m.run(blas, 200)
    assert blas.counts == [1] * 200 and m.set == []


def test_own_limits_without_most_mean_one_thread_and_nothing_to_choose():
    """With ``limits`` of its own and no ``most``, the larger count is 1: every step runs on
    one thread and limits is never called."""
    m = Machine()
    with AdaptiveBlas(probe=1, every=1, limits=m.set.append) as blas:
        m.run(blas, 20)
    assert blas.choices == (1,) and blas.counts == [1] * 20 and m.set == []


def test_the_choice_carries_over_to_the_next_block():
    """One AdaptiveBlas over several epochs: each ``with`` sets BLAS to the choice so far."""
    m = Machine()
    m.load = True
    blas = AdaptiveBlas(probe=2, every=10, most=2, limits=m.set.append)
    with blas:
        m.run(blas, 4)
    assert blas.current == 1 and m.set == [1]
    with blas:  # BLAS is back at 2 between blocks (the real limits restore it on exit)
        assert m.set == [1, 1]
        m.run(blas, 2)
    assert blas.counts[4:] == [1, 1]


def test_a_probe_cut_by_the_end_of_a_block_goes_on_with_its_count_in_the_next():
    """A block (an epoch) that ends while a probe runs: the next ``with`` sets BLAS to the
    probe's count again (exit gave BLAS its own count back), so the probe's remaining steps
    run on the count they are recorded with."""
    m = Machine()
    blas = AdaptiveBlas(probe=3, every=10, most=2, limits=m.set.append)
    with blas:
        m.run(blas, 4)  # 3 steps on 2 threads, then the first step of a probe of one
    assert blas.counts == [2, 2, 2, 1] and blas.running == 1 and blas.current == 2
    assert m.set == [1]
    with blas:
        assert m.set == [1, 1]  # on one thread again
        m.run(blas, 2)  # the probe's last two steps: one thread is slower, back to 2
    assert blas.counts[4:] == [1, 1] and blas.running == 2 and m.set == [1, 1, 2]


@pytest.mark.parametrize("kw", [dict(probe=0), dict(every=0), dict(jump=1.0),
                                dict(margin=1.0), dict(margin=-0.1)])
def test_bad_settings_raise(kw):
    with pytest.raises(ValueError):
        AdaptiveBlas(**kw)


def _blas_threads():
    return [lib.num_threads for lib in _blas.every_blas().lib_controllers]


def test_it_sets_every_blas_and_gives_the_count_back():
    """With the real BLAS: a probe runs every BLAS on one thread, and the counts come back
    on exit."""
    with limit_threads(2, 0):
        if max(_blas_threads()) < 2:
            pytest.skip("BLAS runs one thread here: nothing to choose")
        before = _blas_threads()
        held = getattr(_blas._ownership(), "count", 0)  # limit_threads's
        with AdaptiveBlas(probe=1, every=100) as blas:
            assert blas.choices == (max(before), 1)
            blas.step(1.0)  # the first probe starts: one thread
            assert blas.running == 1 and _blas_threads() == [1] * len(before)
            # and it holds no control of BLAS between steps (threadpoolctl: the limits that
            # the kernels set from other threads would silently do nothing)
            assert getattr(_blas._ownership(), "count", 0) == held
            blas.step(2.0)  # slower: back to every core
            assert blas.running == max(before) == max(_blas_threads())
            blas.step(2.0)  # twice as slow as at that choice: a probe at once
            assert blas.running == 1
            assert _blas_threads() == [1] * len(before)
        assert _blas_threads() == before


class FakeBlas:
    """A threadpoolctl library controller of a BLAS ``api`` ("openblas", "mkl") on
    ``threads`` threads that records the counts it is set to."""

    def __init__(self, api, threads=2):
        self.internal_api, self.num_threads, self.set = api, threads, []

    def set_num_threads(self, n):
        self.set.append(n)
        self.num_threads = n


@pytest.mark.parametrize("api", ["openblas", "mkl", "blis"])
def test_only_openblas_counts_are_chosen(monkeypatch, api):
    """With a BLAS other than OpenBLAS loaded (its products may split sums between threads,
    so the bits could depend on the count), "auto" keeps BLAS's own count; with OpenBLAS
    only, the first probe sets one thread."""
    libs = [FakeBlas("openblas"), FakeBlas(api)]
    monkeypatch.setattr(_blas, "every_blas",
                        lambda: type("Controller", (), {"lib_controllers": libs})())
    with AdaptiveBlas(probe=1, every=1) as blas:
        for _ in range(6):
            blas.step(1.0)
    if api == "openblas":
        assert blas.choices == (2, 1) and 1 in blas.counts
        assert all(lib.set[0] == 1 and lib.num_threads == 2 for lib in libs)
    else:
        assert blas.choices == (2,) and blas.counts == [2] * 6
        assert all(lib.set == [2] and lib.num_threads == 2 for lib in libs)  # exit only


class OneRank:
    """A Trainer ``comm`` of one rank (what fastattn.distributed.Comm does on one)."""

    rank, size = 0, 1

    def bcast(self, x):
        return x

    def shard(self, *arrays):
        return arrays

    def allreduce_grads(self, grads, loss=None, count=1):
        self.calls = getattr(self, "calls", 0) + 1
        return loss

    def check_identical(self, params):
        pass


_DEFAULT = object()


def _fit(blas_threads=_DEFAULT, comm=None):
    rng = np.random.default_rng(0)
    x, t = rng.integers(0, 9, (48, 6)), rng.integers(0, 9, (48, 5))
    model = TransformerSeq2seq(9, d_model=16, n_heads=2, d_ff=32, max_len=6, seed=0,
                               backend="numba")
    trainer = Trainer(model, Adam(lr=1e-2), seed=1, comm=comm)
    kw = {} if blas_threads is _DEFAULT else {"blas_threads": blas_threads}
    trainer.fit(x, t, max_epoch=2, batch_size=8, progress=False, **kw)
    return trainer, model


def test_fit_auto_trains_as_a_fixed_count_does():
    """The count changes the speed only: the same losses and weights as without "auto" (with
    these BLAS products, the same bits on one thread or two), and one count per step."""
    with limit_threads(2, 1):
        auto, m_auto = _fit("auto")
        fixed, m_fixed = _fit(None)
    assert len(auto.blas_counts) == 12 and fixed.blas_counts == []
    assert set(auto.blas_counts) <= {1, max(_blas_threads())}
    assert auto.loss_list == fixed.loss_list
    for a, b in zip(m_auto.params, m_fixed.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_chooses_by_default_but_not_with_comm():
    """Trainer.fit's default is "auto" (a count per step), except with ``comm``, whose ranks
    wait for each other (no counts; the same losses and weights)."""
    with limit_threads(2, 1):
        default, m_default = _fit()
        comm = OneRank()
        ranks, m_ranks = _fit(comm=comm)
    assert len(default.blas_counts) == 12 and ranks.blas_counts == []
    assert comm.calls == 12  # the steps went through comm
    assert default.loss_list == ranks.loss_list
    for a, b in zip(m_default.params, m_ranks.params, strict=True):
        np.testing.assert_array_equal(a, b)


def test_fit_rejects_other_blas_threads():
    with pytest.raises(ValueError, match="blas_threads"):
        _fit(2)
