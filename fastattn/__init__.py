"""fastattn: fast, checked attention for hand-written NumPy networks.

Book-style layers (``params``/``grads`` lists, explicit ``forward``/``backward``) whose hot
loops run as Numba kernels, with a looped reference and a NumPy version of every kernel.
"""

from fastattn._backend import get_backend, set_backend, use_backend
from fastattn.functional import attention_backward, attention_forward, softmax

__version__ = "0.1.0"

__all__ = [
    "__version__",
    "attention_backward",
    "attention_forward",
    "get_backend",
    "set_backend",
    "softmax",
    "use_backend",
]
