"""The hot loops of attention, of the training step's glue and of the book's recurrent layers,
each in three versions with one signature.

Each family of kernels (:data:`FAMILIES`) has three modules, one per backend: a readable
reference in plain loops (``kernels.loop``, ``kernels.glue_loop``, ``kernels.recurrent_loop``:
the source of truth, which documents the arguments), a NumPy version (``kernels.vectorized``,
``kernels.glue_vectorized``, ``kernels.recurrent_vectorized``) and a Numba version
(``kernels.numba_backend``, ``kernels._glue_numba``, ``kernels._recurrent_numba``). The three
modules of a family define every name of it with the same arguments and results; :func:`get`
finds any kernel.

Kernels trust their inputs: arrays are float32 or float64 (all one dtype), 3-D (the
recurrent kernels' weights and states 1-D or 2-D) and C-contiguous, indices are in range.
The public functions and layers of ``fastattn`` check inputs before calling a kernel. (One
addition, the numba backend's alone: its fused attention kernels also take (B, H, T, d) heads
as strided views of a (B, T, H d) array, which MultiHeadAttention passes to avoid copying
them; ``kernels._flash.attention_forward`` says how.)

>>> from fastattn import kernels
>>> f = kernels.get("softmax_forward", "vectorized")

Threads of the Numba kernels (the one place that says why there are two ways):

* The attention kernels run on ``numba.get_num_threads()`` threads (so
  ``numba.set_num_threads`` and ``NUMBA_NUM_THREADS`` govern both kinds), run small work on
  the calling thread alone (starting threads costs more than it saves there, and on a busy
  machine a parallel region can wait a whole scheduler time slice for a thread), and hold BLAS
  at one thread while their own threads call it (``kernels._blas``). Each kind of call runs
  on all those threads or on the calling one alone, whichever has measured faster for it
  (``kernels._thread_choice``: a helper thread that shares its core with a busy one slows a
  call down; ``FASTATTN_THREAD_CHOICE=off`` always takes all).
  The training step's glue kernels (``_glue_numba``) always run on the calling thread (their
  docstring says why).
* The unfused kernels (``numba_backend``) are one parallel loop over batch entries, or over
  ranges of token ids, of equal cost each: Numba's ``prange`` hands each thread its share,
  which is all such a loop needs, at the lowest start-up cost.
* The fused kernels (``_flash``) have work units of unequal cost (a causal row of tiles grows
  along the diagonal; the backward splits key blocks into shares) and long runs in which
  another process may take a core. Their threads take units from a shared atomic counter,
  one at a time (or, with heads, a batch entry's at a time: ``_flash._chunk``), so a slowed
  thread simply takes fewer, which ``prange``'s fixed shares cannot do. They are ``nogil``
  kernels run by the calling thread and helpers: NumPy's OpenBLAS worker threads where they
  can be had (``kernels._blas_workers``: after a product they spin on the other cores
  anyway, so a thread of our own would only share a core with one), else a small
  ``ThreadPoolExecutor``, which is shut down at interpreter exit.
* Every output element is written by one thread in a fixed order, so results repeat bitwise
  from call to call (whether they also hold for another thread count: each module says).

Reference counts: Numba counts the references to an array (and to every view taken of it: a
row, a tile, an argument passed to a helper) with atomic instructions, which cost far more on
some CPUs than on others (a third of the fused forward's time on an Intel Xeon of the Emerald
Rapids generation; far less, by the kernels' times, on an AMD EPYC Zen 4). The kernels that
take views per row or per tile (the fused attention, the recurrences, the unfused softmax and
products) first ``borrow`` their arrays (``_numba_math.borrow``): the same arrays, uncounted,
valid while the caller holds them.
"""

from __future__ import annotations

import importlib

BACKENDS = ("loop", "vectorized", "numba")

ATTENTION_NAMES = (  # in every backend module
    "softmax_forward",
    "softmax_backward",
    "weighted_sum_forward",
    "weighted_sum_backward",
    "scores_forward",
    "scores_backward",
    "attention_forward",
    "attention_backward",
    "embedding_backward",
)
GLUE_NAMES = (  # the training step's glue (kernels/glue_loop.py documents them)
    "layernorm_forward",
    "layernorm_backward",
    "bias_add",
    "bias_relu_forward",
    "bias_relu_backward",
    "softmax_xent_forward",
    "softmax_xent_backward",
    "adam_update",
)
RECURRENT_NAMES = (  # the book's recurrent layers (kernels/recurrent_loop.py documents them)
    "rnn_forward",
    "rnn_backward",
    "lstm_forward",
    "lstm_backward",
    "gru_forward",
    "gru_backward",
)
KERNEL_NAMES = ATTENTION_NAMES + GLUE_NAMES + RECURRENT_NAMES

#: family -> (its kernel names, the module of each backend)
FAMILIES = {
    "attention": (ATTENTION_NAMES,
                  {"loop": ".loop", "vectorized": ".vectorized", "numba": ".numba_backend"}),
    "glue": (GLUE_NAMES, {"loop": ".glue_loop", "vectorized": ".glue_vectorized",
                          "numba": "._glue_numba"}),
    "recurrent": (RECURRENT_NAMES, {"loop": ".recurrent_loop",
                                    "vectorized": ".recurrent_vectorized",
                                    "numba": "._recurrent_numba"}),
}
_FAMILY_OF = {name: family for family, (names, _) in FAMILIES.items() for name in names}


def check_backend(name) -> str:
    """Return ``name`` if it is a backend name, else raise ValueError listing the valid ones."""
    if name not in BACKENDS:
        raise ValueError(
            f"unknown backend {name!r}; valid backends are: {', '.join(map(repr, BACKENDS))}"
        )
    return name


_MODULES: dict = {}  # (backend, family) -> module, once imported (a lookup per kernel call)


def module(backend: str, family: str = "attention"):
    """The module that implements ``backend``'s kernels of ``family`` (imported on first use)."""
    mod = _MODULES.get((backend, family))
    if mod is not None:
        return mod
    if family not in FAMILIES:
        raise ValueError(f"unknown kernel family {family!r}; valid: {', '.join(FAMILIES)}")
    mod = importlib.import_module(FAMILIES[family][1][check_backend(backend)], __name__)
    _MODULES[(backend, family)] = mod
    return mod


def family_of(kernel_name: str) -> str:
    """The family of the kernel ``kernel_name``; ValueError for an unknown name."""
    try:
        family = _FAMILY_OF.get(kernel_name)
    except TypeError:  # unhashable
        family = None
    if family is None:
        raise ValueError(
            f"unknown kernel {kernel_name!r}; valid kernels are: {', '.join(KERNEL_NAMES)}"
        )
    return family


def get(kernel_name: str, backend: str):
    """Return the kernel ``kernel_name`` of ``backend``.

    Raises ValueError for an unknown kernel or backend name, ImportError when the backend's
    dependency (numba) cannot be imported.
    """
    return getattr(module(backend, family_of(kernel_name)), kernel_name)
