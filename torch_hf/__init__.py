"""torch_hf: Hessian-free optimization for PyTorch (Martens & Sutskever, 2012)."""
from .curvature import GGN, ClosureError, Hessian, NonFiniteLossError
from . import losses, testing

__version__ = "0.1.0"
__all__ = ["GGN", "Hessian", "ClosureError", "NonFiniteLossError", "losses", "testing"]
