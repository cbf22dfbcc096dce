"""The exact solve of the damped Gauss-Newton system for small models (ENGD's regime):
δ = −(B + λD + ηI)⁻¹ ∇f by a Cholesky factorisation of the dense matrix, in place of
truncated CG (Alg. 2); on a full-batch problem, ENGD's Gauss-Newton step.

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

__all__ = ["DENSE_PRODUCTS_PER_COLUMN", "GAUSS_NEWTON_DAMPING", "GAUSS_NEWTON_LINE_SEARCH", "dense_matrix",
           "dense_solve"]

# What one column of the dense GGN costs, in curvature-vector products on the same batch
# (benchmarks/dense_solve.py, CPU, one thread: 0.27 on the 2-64-1 PINN of 1,020 residuals,
# 0.32 and 0.12 on regressions of 337 and 1,153 parameters; the Cholesky solve adds 0.2 to
# 3.7 products). 0.5 leaves room for networks whose forward products cost more.
DENSE_PRODUCTS_PER_COLUMN = 0.5


# The dense step is a Gauss-Newton step, δ = −(B + εI)⁻¹∇f with ε = GAUSS_NEWTON_DAMPING
# times the mean of diag(B) (a regularisation at the level of rounding, not a damping),
# globalised by the line search (§8.8) instead of the Levenberg-Marquardt λ: ENGD's step
# (Dangel et al. 2024, whose λ = 1e-10 is about this ε on their Poisson network). On their
# 2-D Poisson instance (257 parameters) the Levenberg-Marquardt λ settles at 1e-7 to 1e-6
# with ρ near ½ and the damped dense step reaches an L2 error of 5.5e-7 in 1,000 s of CPU;
# the Gauss-Newton step with the line search reaches 6.4e-8 (docs/scientific.md). A step
# the line search rejects hands the next step to the damped solve with the
# Levenberg-Marquardt λ, and an accepted damped step hands it back.
GAUSS_NEWTON_DAMPING = 1e-9
# The line search of a Gauss-Newton step halves α, down to 2⁻³⁰ (ENGD's grid reaches as
# far): on that instance the full step overshoots with ρ near −1500, and the default
# search (×0.8, 20 tries, α ≥ 0.012) rejects it where α ≈ 1e-3 would pass.
GAUSS_NEWTON_LINE_SEARCH = (0.5, 30)  # (β, most evaluations)
# Two variants measured worse and left out (docs/scientific.md): offering the damped and the
# Gauss-Newton step side by side and taking the lower (the run stays on damped steps: 17×
# behind at 120 s on a small reaction-diffusion PINN), or the Gauss-Newton step when it
# makes a quarter of the damped step's decrease (7× behind on the 257-parameter Poisson
# instance, 17× on that reaction-diffusion PINN, at 120 s).


def dense_matrix(curvature: Any, reducer: Any = None) -> Tensor:
    """B as a dense (n × n) matrix, averaged over the process group."""
    B = curvature.dense()
    if reducer is not None:
        reducer.mean_(B)
    return B


def dense_solve(B: Tensor, damping_diagonal: float | Tensor, weight_decay: float | Tensor,
                grad: Tensor) -> CGResult | None:
    """δ = −(B + λD + ηI)⁻¹∇f by Cholesky (λD is ``damping_diagonal``; ε for a Gauss-Newton
    step), as a :class:`~torch_hf.cg.CGResult` with no iterations, stop reason ``"dense"``
    and q(δ) = ½ ∇fᵀδ, the minimum of q(x) = ½ xᵀAx + ∇fᵀx. ``None`` when the matrix is
    not numerically positive definite (an indefinite Hessian, or λ below B's rounding):
    the caller then runs CG, which handles negative curvature."""
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
