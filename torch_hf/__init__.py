"""torch_hf: Hessian-free optimization for PyTorch (Martens & Sutskever, 2012).

Modules, bottom up: :mod:`~torch_hf.curvature` (GGN and Hessian products, §5–7),
:mod:`~torch_hf.losses` (matching losses, §6.2), :mod:`~torch_hf.cg` (Alg. 2, §4, §8.6–8.7),
:mod:`~torch_hf.damping` (§8), :mod:`~torch_hf.preconditioners` (§11),
:mod:`~torch_hf.optimizer` (Alg. 3), :mod:`~torch_hf.testing` (§7.2),
:mod:`~torch_hf.distributed` (data parallelism), :mod:`~torch_hf.nn` (memory tools, §7.1),
:mod:`~torch_hf.lanczos` (extreme Hessian eigenvalues: a minimum or a saddle),
:mod:`~torch_hf.residuals` (least-squares and PINN closures with the right scaling),
:mod:`~torch_hf.regime` (deterministic or stochastic, measured) and :mod:`~torch_hf.dense`
(the exact solve for small models).
"""
from . import cg, damping, dense, distributed, lanczos, losses, nn, preconditioners, regime, residuals, testing
from .curvature import GGN, ClosureError, Hessian, NonFiniteLossError
from .optimizer import HessianFree, StepDiagnostics

__version__ = "0.1.0"
__all__ = ["GGN", "Hessian", "HessianFree", "StepDiagnostics", "ClosureError", "NonFiniteLossError",
           "cg", "damping", "dense", "distributed", "lanczos", "losses", "residuals", "nn", "preconditioners",
           "regime", "testing"]
