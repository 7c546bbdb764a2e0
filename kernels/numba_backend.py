"""TEMPORARY placeholder until the Numba kernels land: re-exports the vectorized kernels."""
from kernels.vectorized import *  # noqa: F401,F403
