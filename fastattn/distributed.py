"""Data-parallel training over MPI: every rank trains on its share of each global batch.

``mpiexec -n N fastattn train ...`` runs N copies (ranks) of the same training. Each step,
every rank takes its rows of the global batch (:func:`shard`), computes the loss and the
gradients of those rows, and one allreduce of one flat buffer sums the gradients, weighted by
the rows of each rank, into the gradient of the whole batch (:func:`allreduce_grads`). Every
rank then applies the same update, so the weights stay identical (:func:`check_identical`
compares a checksum of them at each epoch's end).

The same functions serve a book-style loop of one's own::

    from fastattn import distributed as dist

    for iters in range(max_iters):
        batch_x, batch_t = ...                      # the global batch, the same on every rank
        xb, tb = dist.shard(batch_x, batch_t)      # this rank's rows
        loss = model.forward(xb, tb)
        model.backward()
        loss = dist.allreduce_grads(model.grads, loss, count=len(xb))  # the global batch's
        optimizer.update(model.params, model.grads)
    dist.check_identical(model.params)
    if dist.is_root():
        save_model(model, "model.npz")

Without mpiexec (or with one rank) these are the identity and nothing of MPI is imported:
:func:`launched` reads the launcher's environment (``PMI_SIZE``, ``OMPI_COMM_WORLD_SIZE``, ...)
and only :func:`init` imports mpi4py (the ``mpi`` extra: ``pip install 'fastattn[mpi]'``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
import zlib
from collections.abc import Mapping

import numpy as np

from fastattn import _checks

__all__ = ["Comm", "MPIUnavailable", "allreduce_grads", "check_identical", "init", "is_root",
           "launched", "rank", "shard", "shard_bounds", "world_size"]

#: Environment variables in which MPI launchers give the world size, the rank and the number
#: of ranks on this node: MPICH's Hydra and Intel MPI (PMI_*), Open MPI, MVAPICH.
_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
_LOCAL_SIZE_VARS = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE",
                    "MV2_COMM_WORLD_LOCAL_SIZE")

#: Test-only fault injection: "raise:RANK:STEP" raises on rank RANK before its STEP-th
#: allreduce (1-based); "diverge:RANK" changes a weight on rank RANK before the checksum.
FAULT_VAR = "FASTATTN_TEST_FAULT"

#: Seconds an aborting rank waits after flushing its error, before MPI_Abort (see Comm.abort).
ABORT_GRACE = 1.0

_world = None  # the Comm of MPI_COMM_WORLD once init() has run


class MPIUnavailable(RuntimeError):
    """Launched by mpiexec, but mpi4py cannot be imported."""


def _env_int(names, default):
    for name in names:
        value = os.environ.get(name)
        if value:
            try:
                return int(value)
            except ValueError:
                continue
    return default


def env_world_size() -> int:
    """The number of ranks the launcher started, from the environment (1 without one)."""
    return max(_env_int(_SIZE_VARS, 1), 1)


def env_rank() -> int:
    """This process's rank, from the environment (0 without a launcher)."""
    return _env_int(_RANK_VARS, 0)


def env_local_size() -> int:
    """The number of ranks on this node, from the environment (the world size when the
    launcher does not say)."""
    return max(_env_int(_LOCAL_SIZE_VARS, env_world_size()), 1)


def launched() -> bool:
    """True when this process is one of 2+ ranks started by an MPI launcher (mpiexec).

    Reads the environment only: it imports nothing of MPI.
    """
    return env_world_size() > 1


def shard_bounds(n: int, size: int, rank: int) -> tuple[int, int]:
    """Rows ``[lo, hi)`` of ``n`` that rank ``rank`` of ``size`` takes: contiguous blocks in
    rank order, the first ``n % size`` ranks one row more (as ``numpy.array_split``).

    n >= 0, size >= 1 and 0 <= rank < size are ints; TypeError/ValueError naming the one that
    is not."""
    n = _checks.int_at_least(n, "n", 0)
    size = _checks.int_at_least(size, "size", 1)
    rank = _checks.int_at_least(rank, "rank", 0)
    if rank >= size:
        raise ValueError(f"rank must be < size {size}, got {rank}")
    q, r = divmod(n, size)
    lo = rank * q + min(rank, r)
    return lo, lo + q + (1 if rank < r else 0)


class Comm:
    """A communicator (normally MPI_COMM_WORLD) with what data-parallel training needs.

    ``size``, ``rank``; ``allreduce_seconds`` and ``allreduce_calls`` count the time spent in
    :meth:`allreduce_grads`'s collective (waiting for the slowest rank included).
    """

    def __init__(self, mpi_comm):
        from mpi4py import MPI

        self._MPI = MPI
        self._comm = mpi_comm
        self.size = mpi_comm.Get_size()
        self.rank = mpi_comm.Get_rank()
        self.allreduce_seconds = 0.0
        self.allreduce_calls = 0
        self._buffer = None
        self._fault = _parse_fault(os.environ.get(FAULT_VAR, ""))

    def shard(self, *arrays, strict: bool = True):
        """This rank's rows of ``arrays`` (which have the same length): one array, or a tuple.

        strict: a batch with fewer rows than ranks raises ValueError (a rank would have no
        rows to train on); with ``strict=False`` such a rank gets empty arrays.
        """
        return _shard(arrays, self.size, self.rank, strict)

    def allreduce_grads(self, grads, loss=None, count=1):
        """Replace each gradient by the ``count``-weighted mean of it over the ranks, in place,
        with one allreduce of one flat buffer; return the same mean of ``loss`` (None if None).

        ``count`` is the number of examples (rows) this rank's gradient and loss are the mean
        of, so that the result is the mean over the global batch, as one process computes it
        on the whole batch. Every rank gets the same numbers.
        """
        grads = list(grads)
        loss = _loss(loss)
        count = _checks.finite_real(count, "count")
        self._inject_raise()
        sizes = [g.size for g in grads]
        dtype = np.result_type(*grads) if grads else np.dtype(np.float64)
        n = sum(sizes)
        if self._buffer is None or self._buffer.size != n + 2 or self._buffer.dtype != dtype:
            self._buffer = np.empty(n + 2, dtype)
        buf = self._buffer
        c = dtype.type(count)
        o = 0
        for g, k in zip(grads, sizes, strict=True):
            np.multiply(np.asarray(g).reshape(-1), c, out=buf[o:o + k])
            o += k
        buf[n] = 0.0 if loss is None else float(loss) * float(count)
        buf[n + 1] = float(count)
        t0 = time.perf_counter()
        self._comm.Allreduce(self._MPI.IN_PLACE, buf, op=self._MPI.SUM)
        self.allreduce_seconds += time.perf_counter() - t0
        self.allreduce_calls += 1
        total = buf[n + 1]
        if total <= 0:
            raise ValueError(f"count must be positive on some rank, got a total of {total}")
        buf /= total
        o = 0
        for g, k in zip(grads, sizes, strict=True):
            g[...] = buf[o:o + k].reshape(g.shape)
            o += k
        return None if loss is None else float(buf[n])

    def sum(self, value):
        """The sum of a number (or an array, element-wise) over the ranks, on every rank."""
        arr = np.array(value, dtype=np.float64, ndmin=1)
        self._comm.Allreduce(self._MPI.IN_PLACE, arr, op=self._MPI.SUM)
        return float(arr[0]) if np.ndim(value) == 0 else arr.reshape(np.shape(value))

    def bcast(self, array):
        """Rank 0's ``array`` on every rank (same shape and dtype on all ranks), returned."""
        arr = np.ascontiguousarray(array)
        self._comm.Bcast(arr, root=0)
        return arr

    def check_identical(self, params, what: str = "weights") -> int:
        """Raise RuntimeError unless ``params`` are bit-identical on every rank (compared by a
        CRC-32 checksum of their bytes); return the checksum."""
        params = _param_arrays(params)
        if self._fault[:2] == ("diverge", self.rank) and params:
            params[0].reshape(-1)[0] += 1  # test-only: see FAULT_VAR
        crc = checksum(params)
        sums = self._comm.allgather(crc)
        if len(set(sums)) > 1:
            listing = ", ".join(f"rank {r}: {s:08x}" for r, s in enumerate(sums))
            raise RuntimeError(f"the {what} differ between ranks ({listing}); every rank must "
                               f"apply the same update to the same weights")
        return crc

    def abort(self, code: int = 1):
        """End every rank (MPI_Abort), with exit status ``code``, after ``ABORT_GRACE`` seconds.

        The pause lets the launcher forward what this rank just wrote: MPICH's launcher can
        handle the abort before it has read the rank's standard error, and then the message
        that says why is lost (the launcher's own "MPI_Abort" line with it)."""
        sys.stdout.flush()
        sys.stderr.flush()
        time.sleep(ABORT_GRACE)
        self._comm.Abort(int(code))

    def _inject_raise(self):
        if self._fault[:2] == ("raise", self.rank):
            if self.allreduce_calls + 1 >= self._fault[2]:
                raise RuntimeError(f"fault injected by {FAULT_VAR} on rank {self.rank}")


def _parse_fault(text):
    parts = text.split(":") if text else []
    try:
        if parts[:1] == ["raise"]:
            return ("raise", int(parts[1]), int(parts[2]) if len(parts) > 2 else 1)
        if parts[:1] == ["diverge"]:
            return ("diverge", int(parts[1]), 0)
    except (IndexError, ValueError):
        pass
    return (None, None, 0)


def _rows(a, i: int) -> int:
    """The number of rows of ``arrays[i]``: an array (of at least one dimension) or a sequence
    that slices (a list, a tuple); TypeError naming it otherwise (None, a number, a string)."""
    try:
        if isinstance(a, (str, bytes, Mapping)) or not hasattr(a, "__getitem__"):
            raise TypeError
        return len(a)
    except TypeError:  # also len() of a 0-d array
        got = "a 0-d array" if isinstance(a, np.ndarray) else type(a).__name__
        raise TypeError(f"arrays[{i}] must be an array or a sequence of rows, got {got}"
                        ) from None


def _shard(arrays, size, rank, strict):
    if not arrays:
        raise TypeError("shard needs at least one array")
    n = _rows(arrays[0], 0)
    for i, a in enumerate(arrays[1:], 1):
        if _rows(a, i) != n:
            raise ValueError(f"arrays[{i}] has {len(a)} rows, arrays[0] has {n}")
    if strict and n < size:
        raise ValueError(f"a batch of {n} rows cannot be shared by {size} ranks: the global "
                         f"batch must have at least one row per rank")
    lo, hi = shard_bounds(n, size, rank)
    out = tuple(a[lo:hi] for a in arrays)
    return out[0] if len(out) == 1 else out


def _param_arrays(params) -> list:
    """``params`` as a list of arrays that have bytes to compare; TypeError/ValueError naming
    ``params`` or ``params[i]`` otherwise (an object array holds references, not values)."""
    if isinstance(params, (str, bytes, np.ndarray)) or not hasattr(params, "__iter__"):
        raise TypeError(f"params must be a sequence of arrays, got {type(params).__name__}")
    out = []
    for i, p in enumerate(params):
        a = _checks.as_array(p, f"params[{i}]")
        if a.dtype.hasobject:
            raise TypeError(f"params[{i}] must be a numeric array, got dtype {a.dtype}")
        out.append(a)
    return out


def _loss(loss):
    """None, or ``loss`` as a float: a real number (a NumPy scalar or 0-d array too), else
    TypeError naming ``loss``."""
    if loss is None:
        return None
    x = _checks.scalar(loss)
    if not _checks.is_real(x):
        raise TypeError(f"loss must be a real number or None, got {type(loss).__name__}")
    try:
        return float(x)
    except OverflowError:  # an int beyond float's range
        raise ValueError(f"loss must be within float's range, got {loss!r:.80}") from None


def checksum(params) -> int:
    """CRC-32 of the bytes of ``params`` (arrays), in order."""
    crc = 0
    for a in _param_arrays(params):
        crc = zlib.crc32(np.ascontiguousarray(a).view(np.uint8).reshape(-1), crc)
    return crc


def init() -> Comm:
    """Import mpi4py, initialise MPI and return the world :class:`Comm` (the same each call).

    Raises MPIUnavailable (naming the extra to install) when mpi4py cannot be imported.
    """
    global _world
    if _world is None:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise MPIUnavailable(
                f"running under mpiexec ({env_world_size()} ranks) needs mpi4py and an MPI: "
                f"pip install 'fastattn[mpi]' ({exc})") from None
        _world = Comm(MPI.COMM_WORLD)
    return _world


def active() -> Comm | None:
    """The world :class:`Comm` when launched by mpiexec with 2+ ranks (initialising MPI),
    else None."""
    return init() if launched() else None


def world_size() -> int:
    """The number of ranks (1 without mpiexec)."""
    return init().size if launched() else 1


def rank() -> int:
    """This process's rank, 0..world_size()-1 (0 without mpiexec)."""
    return init().rank if launched() else 0


def is_root() -> bool:
    """True on rank 0, the rank that prints and writes files (True without mpiexec)."""
    return rank() == 0


def shard(*arrays, strict: bool = True):
    """This rank's rows of ``arrays``: see :meth:`Comm.shard` (the arrays as given without
    mpiexec)."""
    if not launched():
        _shard(arrays, 1, 0, strict)  # the same checks
        return arrays[0] if len(arrays) == 1 else arrays
    return init().shard(*arrays, strict=strict)


def allreduce_grads(grads, loss=None, count=1):
    """The gradients (in place) and the loss averaged over the ranks, weighted by ``count``:
    see :meth:`Comm.allreduce_grads` (nothing changes without mpiexec; returns ``loss``)."""
    if not launched():
        _checks.finite_real(count, "count")
        return _loss(loss)
    return init().allreduce_grads(grads, loss, count)


def check_identical(params, what: str = "weights") -> int:
    """Raise unless ``params`` are identical on every rank: see :meth:`Comm.check_identical`."""
    if not launched():
        return checksum(params)
    return init().check_identical(params, what)


def metrics(comm: Comm | None, steps: int, train_seconds: float) -> dict:
    """What ``metrics.json`` records about the ranks and the cost of the allreduce."""
    if comm is None:
        return {"world_size": 1}
    per_step = comm.allreduce_seconds / max(comm.allreduce_calls, 1)
    return {"world_size": comm.size,
            "allreduce_seconds": comm.allreduce_seconds,
            "allreduce_ms_per_step": 1000.0 * per_step,
            "allreduce_share": comm.allreduce_seconds / train_seconds if train_seconds else 0.0}


def threads_per_rank(threads: int) -> int:
    """The BLAS threads of a rank: ``threads`` when given (> 0), else the cores of this node
    shared among its ranks (so that N ranks on a node do not each start a thread per core)."""
    if threads > 0:
        return threads
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(cores // env_local_size(), 1)


@contextlib.contextmanager
def _quiet_stdout(quiet: bool):
    if not quiet:
        yield
        return
    with open(os.devnull, "w", encoding="utf-8") as devnull, \
            contextlib.redirect_stdout(devnull):
        yield


def run_on_all_ranks(func, *args, prog: str = "fastattn"):
    """Run ``func(*args) -> exit status`` on every rank of an mpiexec launch and return 0.

    Initialises MPI first (mpi4py missing: a one-line error on rank 0, status 2). Only rank 0
    keeps its standard output. An exception, or a non-zero status, on any rank ends every rank
    with MPI_Abort (after printing the error and the rank), so that no rank waits forever in a
    collective for one that is gone.
    """
    try:
        comm = init()
    except MPIUnavailable as exc:
        if env_rank() == 0:
            print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    status = 1
    with _quiet_stdout(comm.rank != 0):
        try:
            status = func(*args)
        except SystemExit as exc:  # argparse's parser.error, sys.exit
            status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if isinstance(exc.code, str):
                print(exc.code, file=sys.stderr)
        except BaseException as exc:  # every error, KeyboardInterrupt too, must end every rank
            print(f"{prog}: error on rank {comm.rank} of {comm.size}: "
                  f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}", file=sys.stderr)
            status = 130 if isinstance(exc, KeyboardInterrupt) else 1
    if status:
        comm.abort(status)
    return 0


def run_train(args, run) -> int:
    """``fastattn train`` under mpiexec: check that the global batch can be shared, give each
    rank its share of the cores, then ``run(args)`` on every rank (:func:`run_on_all_ranks`)."""
    size = env_world_size()
    if args.batch_size < size:
        msg = (f"--batch-size {args.batch_size} is smaller than the number of MPI ranks "
               f"({size}): the global batch must have at least one example per rank")
        parser = getattr(args, "_train_parser", None)
        if env_rank() != 0:
            return 2  # rank 0 alone reports it
        if parser is not None:
            parser.error(msg)  # the usage line, exit status 2
        print(f"fastattn train: error: {msg}", file=sys.stderr)
        return 2
    from fastattn.commands.train import start_threads

    args.threads = threads_per_rank(start_threads(args.threads))
    return run_on_all_ranks(_announce_and_run, run, args, prog="fastattn train")


def _announce_and_run(run, args):
    comm = init()
    from mpi4py import MPI

    library = MPI.Get_library_version().splitlines()[0].strip()
    most = -(-args.batch_size // comm.size)
    least = args.batch_size // comm.size
    share = f"{most}" if most == least else f"{least} or {most}"
    print(f"fastattn train: data-parallel on {comm.size} MPI ranks ({library}); global batch "
          f"{args.batch_size}, {share} examples per rank; {args.threads} BLAS thread(s) per "
          f"rank", flush=True)
    return run(args)
