"""The exact solve of the damped Gauss-Newton system for small models (ENGD's regime):
δ = −(B + λD + ηI)⁻¹ ∇f by a Cholesky factorisation of the dense matrix, in place of
truncated CG (Alg. 2).

CG needs up to n products to solve an n-parameter system and stops early; the dense
matrix costs about 0.5 products per column (:meth:`torch_hf.GGN.dense`: the columns of
J by forward products, then Jᵀ L'' J as one matrix product) plus n³/3 flops, and solves
exactly. :class:`~torch_hf.HessianFree` switches to it by itself (``solver="auto"``) on a
deterministic full-batch objective (:mod:`torch_hf.regime`) with at most
``dense_max_params`` parameters once CG is spending more products than the dense
matrix costs; everything else of the step (ρ, the Levenberg-Marquardt rule, the line
search) is unchanged.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .cg import CGResult

__all__ = ["DENSE_PRODUCTS_PER_COLUMN", "dense_matrix", "dense_solve"]

# What one column of the dense GGN costs, in curvature-vector products on the same batch
# (benchmarks/dense_solve.py: 0.49 on a 2-64-1 PINN, 1,020 residuals, CPU).
DENSE_PRODUCTS_PER_COLUMN = 0.5


def dense_matrix(curvature: Any, reducer: Any = None) -> Tensor:
    """B as a dense (n × n) matrix, averaged over the process group."""
    B = curvature.dense()
    if reducer is not None:
        reducer.mean_(B)
    return B


def dense_solve(B: Tensor, damping_diagonal: float | Tensor, weight_decay: float | Tensor,
                grad: Tensor) -> CGResult | None:
    """δ = −(B + λD + ηI)⁻¹∇f by Cholesky (λD is ``damping_diagonal``), as a
    :class:`~torch_hf.cg.CGResult` with no iterations, stop reason ``"dense"`` and
    q(δ) = ½ ∇fᵀδ, the minimum of q(x) = ½ xᵀAx + ∇fᵀx. ``None`` when the matrix is not
    numerically positive definite (an indefinite Hessian, or λ below B's rounding): the
    caller then runs CG, which handles negative curvature."""
    A = B.clone()
    A.diagonal().add_(damping_diagonal + weight_decay)
    L, info = torch.linalg.cholesky_ex(A)
    if int(info) != 0:
        return None
    x = torch.cholesky_solve(-grad.unsqueeze(1), L).squeeze(1)
    if not bool(torch.isfinite(x).all()):
        return None
    q = 0.5 * float(torch.dot(grad, x))
    return CGResult(x=x, q=q, iterations=0, stop_reason="dense", saved=[(0, x, q)], q_history=[0.0, q])
