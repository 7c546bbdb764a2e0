"""TEMPORARY placeholder until the Numba flash-attention kernels land."""
from kernels.vectorized import attention_backward, attention_forward  # noqa: F401
