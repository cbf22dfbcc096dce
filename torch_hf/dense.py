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

When the closure also gives its outputs' Jacobian J (M × n, ``closure.jacobian(params)``;
:class:`torch_hf.residuals.PointwiseResiduals` for PINNs) and the loss is a sum of squares
(L'' = cI), the same system is solved in residual space, :func:`residual_solve`: one
Cholesky of the M × M matrix c JJᵀ + sI instead of n × n, whatever n is (with M ≥ n the
n × n matrix is built as c JᵀJ, without forward columns; either way the defaults take the
dense step from the second step on). On the benchmark's
9,873-parameter Poisson network with 1,020 residuals this takes the exact Gauss-Newton step
in about 0.6 s of one CPU thread, where CG capped at 250 products took 4.7 s and fell short.
"""
from __future__ import annotations

import weakref
from typing import Any

import torch
from torch import Tensor

from .cg import CGResult

__all__ = ["DENSE_PRODUCTS_PER_COLUMN", "GAUSS_NEWTON_DAMPING", "GAUSS_NEWTON_FALLBACK_ALPHA",
           "GAUSS_NEWTON_LINE_SEARCH",
           "dense_matrix", "dense_solve", "gram", "residual_solve", "output_hessian_scale"]

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
# A Gauss-Newton step whose line search ends below this α is offered the damped step
# (λ of the Levenberg-Marquardt rule) too, and the lower of the two is taken: far from a
# solution the undamped direction can need α ≈ 1e-6 for many steps (a reaction-diffusion
# PINN of 10,000 points, docs/scientific.md). On a stochastic objective (batches drawn
# afresh) the dense step is always the damped one (HessianFree._step).
GAUSS_NEWTON_FALLBACK_ALPHA = 1e-2
# ε following the steps (÷10 after a full step with ρ > 0.75, ×10 after a shortened one,
# within [1e-13, 1e-6]) measured worse on the 257-parameter Poisson instance: 5.6e-7 /
# 1.3e-7 / 7.6e-8 at 50 / 150 / 300 s against 4.0e-7 / 8.2e-8 / 7.0e-8 with ε fixed.
# Two variants measured worse and left out (docs/scientific.md): offering the damped and the
# Gauss-Newton step side by side and taking the lower (the run stays on damped steps: 17×
# behind at 120 s on a small reaction-diffusion PINN), or the Gauss-Newton step when it
# makes a quarter of the damped step's decrease (7× behind on the 257-parameter Poisson
# instance, 17× on that reaction-diffusion PINN, at 120 s).


def output_hessian_scale(curvature: Any) -> float | None:
    """c when the loss's Hessian in the outputs is c·I (a sum of squared residuals: c = 2),
    read from one product with L'' on a probe whose entries all differ (a non-uniform
    diagonal or a coupling of outputs changes its shape), else ``None``."""
    outputs = getattr(curvature, "outputs", None)
    if outputs is None or len(outputs) != 1 or getattr(curvature, "extras", ()) or not hasattr(curvature, "loss_hvp"):
        return None
    try:  # a step asks several times about one operator: the probe is read once
        return _SCALES[curvature]
    except (KeyError, TypeError):
        pass
    z = outputs[0]
    probe = torch.linspace(0.5, 1.5, z.numel(), dtype=z.dtype, device=z.device).reshape(z.shape)
    h = curvature.loss_hvp((probe,))[0]
    c = float(h.reshape(-1)[0] / probe.reshape(-1)[0])
    c = c if c > 0 and torch.allclose(h, c * probe, rtol=1e-12, atol=0.0) else None
    try:
        _SCALES[curvature] = c
    except TypeError:  # an operator that cannot be weakly referenced: not remembered
        pass
    return c


_SCALES: "weakref.WeakKeyDictionary[Any, float | None]" = weakref.WeakKeyDictionary()


def gram(J: Tensor) -> Tensor:
    """K = J Jᵀ (M × M), the upper triangle by row blocks and mirrored: about 56 % of the
    multiply-adds of ``J @ J.t()`` (28.8 s against 48.3 s for the heat benchmark's
    3,500 × 116,865 J on one CPU thread; B = JᵀJ of the 10,000-point reaction-diffusion
    PINN, 3,021 × 10,200 as passed here, 1.9 s against 3.0 s)."""
    m = J.shape[0]
    # Blocks pay where the products are at least as long as K is wide (process CPU time, one
    # thread, `benchmarks/jacobian_cost.py --gram 3021 10200 2000 2600`: 0.64× and 0.76× the
    # plain product); for a J taller than long the copies cost more than they save.
    blocks = max(1, min(8, m // 256)) if J.shape[1] >= m else 1
    if blocks == 1:
        return J @ J.t()  # symmetric to rounding; the Cholesky reads one triangle
    K = torch.zeros(m, m, dtype=J.dtype, device=J.device)  # the lower blocks are never read, but not garbage
    edges = [round(m * i / blocks) for i in range(blocks + 1)]
    for a, b in zip(edges[:-1], edges[1:]):
        K[a:b, a:] = J[a:b] @ J[a:].t()  # the rows' blocks on and right of the diagonal
    return K.triu() + K.triu(1).t()


def residual_solve(J: Tensor, c: float, shift: float, output_grad: Tensor, grad: Tensor,
                   K: Tensor | None = None) -> CGResult | None:
    """δ = −(c JᵀJ + sI)⁻¹∇f in residual space, for B = c JᵀJ (M outputs, M < n parameters)
    and ∇f = Jᵀu with u = ∂L/∂z (``output_grad``, no weight decay): by the push-through
    identity (c JᵀJ + sI)⁻¹Jᵀ = Jᵀ(c JJᵀ + sI)⁻¹, δ = −Jᵀ(c JJᵀ + sI)⁻¹u, one Cholesky of an
    M × M matrix (Dangel et al.'s ENGD made scalable, a Woodbury form). ``K`` is J Jᵀ when
    the caller has it (:func:`gram`). Returned as :func:`dense_solve` returns it,
    q(δ) = ½ ∇fᵀδ; ``None`` when not positive definite."""
    K = c * (gram(J) if K is None else K)
    K.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(K)
    if int(info) != 0:
        return None
    w = torch.cholesky_solve(output_grad.reshape(-1, 1).to(K.dtype), L).squeeze(1)
    x = -(J.t() @ w)
    if not bool(torch.isfinite(x).all()):
        return None
    q = 0.5 * float(torch.dot(grad, x))
    return CGResult(x=x, q=q, iterations=0, stop_reason="dense", saved=[(0, x, q)], q_history=[0.0, q])


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
