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
Where M is large (:data:`SKETCH_MIN_OUTPUTS`) the M × M Gram matrix J Jᵀ is most of the
step's cost (27 s of a 31 s step on the heat benchmark, M = 3,500): the damped system
(c JJᵀ + λI)w = u is then solved by CG preconditioned with a Nyström sketch of c JJᵀ
from a few hundred of its columns (:class:`SketchedSolver`; to rounding on a deterministic
objective, to a relative residual of 1e-2 on a stochastic one), the Gram matrix formed
only when that CG does not converge within its cost.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from typing import Any, Callable

import torch
from torch import Tensor

from .cg import CGResult

__all__ = ["DENSE_PRODUCTS_PER_COLUMN", "GAUSS_NEWTON_DAMPING", "GAUSS_NEWTON_FALLBACK_ALPHA",
           "GAUSS_NEWTON_LINE_SEARCH", "SKETCH_MIN_OUTPUTS", "SKETCH_STOCHASTIC_TOLERANCE", "SKETCH_TOLERANCE",
           "SketchedSolver", "nystrom_factor",
           "centred_step", "dense_matrix", "dense_solve", "gram", "residual_solve", "sketched_residual_solve",
           "output_hessian_scale"]

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


# Where the M × M Gram matrix is the step's main cost (M ≥ this many outputs), the damped
# residual-space system is solved by CG preconditioned with a Nyström approximation of
# c JJᵀ from a few hundred of its columns (:func:`sketched_residual_solve`) before the Gram
# matrix is formed. On the heat benchmark (M = 3,500, n = 116,865; one CPU thread) the Gram
# matrix takes 27 s, a product with JJᵀ 0.23 s and 437 columns 7.2 s, after which CG
# converges in 10 / 19 / 43 iterations at s = 9e-5 / 9e-6 / 9e-7 (plain CG: 180 iterations
# for 1e-2 at s = 1e-3). Below it (the Poisson rows' M = 1,020) the Gram matrix costs about
# a second or less.
SKETCH_MIN_OUTPUTS = 2048
# CG stops at ‖(c JJᵀ + sI)w − u‖ ≤ SKETCH_TOLERANCE·‖u‖, the true residual checked at the end.
# On the heat benchmark's J this leaves the step 1e-9 to 1e-8 (relative) from the Cholesky
# solve's, whose own rounding is of that order there (κ·eps).
SKETCH_TOLERANCE = 1e-9
# On points drawn afresh every step (a stochastic objective) the step is an estimate anyway:
# CG stops at this relative residual. On the heat benchmark (rank 256, the weights after 20
# and 40 steps, s = λ and λ/10, by hand) the loss after the step, on its draw and on a fresh
# one, is the exact step's to 0.08-0.23 % where the two draws differ by 0.6-24 %; q(δ) agrees
# to 3e-6-1e-4 (relative), the step to 1.5e-3-3.4e-3; 3 / 5 / 7 / 19 iterations against
# 4 / 7 / 9 / 25 at 1e-3 and 10 / 18 / 24 / 59 at 1e-9 (1e-1: the loss 0.3-7 % off). And none
# of the steps that 1e-9 could not reach (then the Gram matrix was formed: a 28 s step).
SKETCH_STOCHASTIC_TOLERANCE = 1e-2
# One CG iteration (two passes over J, memory-bound) costs about as much as this many
# columns of c JJᵀ (one matrix product J J_Sᵀ for all of them): 0.23 s against 7.2 s / 437
# on the heat benchmark's J, one CPU thread.
SKETCH_COLUMNS_PER_ITERATION = 14
# How many solves a rank's cost (its columns + SKETCH_COLUMNS_PER_ITERATION per CG iteration)
# is remembered for.
SKETCH_RANK_MEMORY = 8


class SketchedSolver:
    """The damped residual-space solve δ = −Jᵀ(c JJᵀ + sI)⁻¹u without the M × M Gram
    matrix where that pays (:data:`SKETCH_MIN_OUTPUTS`), the sketch's rank adapted from step
    to step so that its columns cost about what the CG iterations they save cost. One per
    optimizer; its state (the rank, a call count that seeds the column draw) only sets the
    speed, not the step."""

    def __init__(self, rank: int = 256, seed: int = 0, min_outputs: int = SKETCH_MIN_OUTPUTS) -> None:
        self.rank, self.seed, self.min_outputs, self.calls = rank, seed, min_outputs, 0
        self.costs: dict[int, tuple[int, int]] = {}  # rank -> (call, columns + iterations in columns)
        self._factor: tuple | None = None  # (J's identity, (Û, Λ̂), rank) of the last factor drawn

    def applies(self, J: Tensor) -> bool:
        """Whether J has enough rows for the Gram matrix to be worth avoiding."""
        return J.shape[0] >= self.min_outputs

    def solve(self, J: Tensor, c: float, shift: float, output_grad: Tensor,
              tolerance: float = SKETCH_TOLERANCE) -> CGResult | None:
        """The step as :func:`residual_solve` gives it (to ``tolerance``, the relative
        residual of (c JJᵀ + sI)w = u: :data:`SKETCH_TOLERANCE` on a deterministic objective,
        :data:`SKETCH_STOCHASTIC_TOLERANCE` on a stochastic one), or ``None`` when CG did not
        converge within a Gram matrix's worth of work (the caller then forms it); the rank
        for the next call is adjusted either way (on a factor drawn for this call, not one
        reused)."""
        m = J.shape[0]
        # A second system of the same J in one step (the centred step's fallback, another
        # damping) reuses the factor: it does not depend on the shift or the right-hand side.
        # (A stale factor could only slow CG: the residual is checked against J itself.)
        key = None
        if J.is_contiguous():  # its address, version and a sample of its entries
            sample = J.reshape(-1)[::max(1, J.numel() // 1024)]
            key = (J.data_ptr(), J._version, tuple(J.shape), J.dtype, J.device, float(c), float(sample.sum()))
        if key is not None and self._factor is not None and self._factor[0] == key:
            _, factor, rank = self._factor
            return sketched_residual_solve(J, c, shift, output_grad, rank, _iteration_budget(m, rank), tolerance,
                                           factor=factor)
        rank = min(m, max(16, min(self.rank, m // 4)))
        budget = _iteration_budget(m, rank)
        generator = torch.Generator(device=J.device).manual_seed(self.seed + self.calls)
        self.calls += 1
        factor = nystrom_factor(J, c, rank, generator)
        self._factor = None if factor is None else (key, factor, rank)
        result = None if factor is None else sketched_residual_solve(J, c, shift, output_grad, rank, budget,
                                                                      tolerance, factor=factor)
        iterations = budget if result is None else result.iterations
        cost = rank + SKETCH_COLUMNS_PER_ITERATION * iterations
        self.costs[rank] = (self.calls, cost)
        proposal = rank
        if SKETCH_COLUMNS_PER_ITERATION * iterations > rank:  # the iterations cost more than the columns
            proposal = max(rank, min(2 * rank, m // 4))
        elif 4 * SKETCH_COLUMNS_PER_ITERATION * iterations < rank:
            proposal = max(16, rank // 2)
        # A rank tried within the last few calls that cost more than this one is not tried
        # again yet: on the heat benchmark the rule alone alternates 256 (23 iterations) and
        # 512 (8), the slower of the two every other step. The shift falls from step to
        # step, so an entry is forgotten after SKETCH_RANK_MEMORY calls.
        tried = self.costs.get(proposal)
        if proposal != rank and tried is not None and self.calls - tried[0] <= SKETCH_RANK_MEMORY \
                and tried[1] >= cost:
            proposal = rank
        self.rank = proposal
        return result


def _iteration_budget(m: int, rank: int) -> int:
    """CG iterations after which forming J Jᵀ would have been cheaper: by blocks it costs
    about 0.56 M² n multiply-adds, a column M n at the same rate."""
    return max(20, int((0.56 * m - rank) / SKETCH_COLUMNS_PER_ITERATION))


def nystrom_factor(J: Tensor, c: float, rank: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor] | None:
    """(Û, Λ̂) of the column Nyström approximation K̂ = K_{:S} K_{SS}⁺ K_{S:} = Û Λ̂ Ûᵀ of
    K = c JJᵀ (K_SS⁺ on K_SS's numerical range), its ``rank`` columns S drawn without
    replacement with probability ∝ K's diagonal (one product c J J_Sᵀ), λ̂ in descending
    order; ``None`` on a non-finite or zero J. It does not depend on the shift: one factor
    serves every damped system of the same J."""
    diagonal = torch.linalg.vector_norm(J, dim=1).square()  # no M × n temporary
    if not (bool(torch.isfinite(diagonal).all()) and float(diagonal.sum()) > 0):
        return None
    columns = torch.multinomial(diagonal, min(rank, int((diagonal > 0).sum())), replacement=False,
                                generator=generator)
    Y = c * (J @ J[columns].t())  # K_{:S}
    core = Y[columns]
    theta, Q = torch.linalg.eigh(0.5 * (core + core.t()))  # K_SS, often numerically singular
    keep = theta > torch.finfo(J.dtype).eps * len(columns) * float(theta[-1])
    if not bool(keep.any()):
        return None
    B = Y @ (Q[:, keep] / theta[keep].sqrt())  # B Bᵀ = K_{:S} K_SS⁺ K_{S:}, on K_SS's numerical range
    U, sigma, _ = torch.linalg.svd(B, full_matrices=False)
    return U, sigma ** 2


def sketched_residual_solve(J: Tensor, c: float, shift: float, output_grad: Tensor, rank: int,
                            max_iterations: int, tolerance: float = SKETCH_TOLERANCE,
                            generator: torch.Generator | None = None,
                            factor: tuple[Tensor, Tensor] | None = None) -> CGResult | None:
    """δ = −Jᵀ(c JJᵀ + sI)⁻¹u as :func:`residual_solve` computes it, without forming JJᵀ:
    CG on (c JJᵀ + sI)w = u preconditioned with the column Nyström approximation
    K̂ = Û Λ̂ Ûᵀ of K = c JJᵀ from ``rank`` of its columns (:func:`nystrom_factor`, or
    ``factor`` when one was drawn for this J and c already), and
    P⁻¹ = Û (λ̂_r + s)(Λ̂ + sI)⁻¹ Ûᵀ + (I − ÛÛᵀ) (Frangella, Tropp & Udell, *Randomized
    Nyström preconditioning*, 2023). A PINN's JJᵀ has a few hundred eigenvalues above λ and
    the rest near rounding, so a sketch of that rank leaves CG tens of iterations.

    q(δ) = ½ c‖Jδ‖² + ½ s‖δ‖² + ∇fᵀδ is evaluated from the final w exactly (not assumed
    at the minimum). ``None`` when the true relative residual is above ``tolerance`` (at
    least 1000 rounding units of J's dtype) after
    ``max_iterations`` iterations, or on a non-finite or non-positive quantity."""
    u = output_grad.reshape(-1).to(J.dtype)
    factor = factor if factor is not None else nystrom_factor(J, c, rank, generator)
    if factor is None:
        return None
    U, lam_hat = factor
    scale = (lam_hat[-1] + shift) / (lam_hat + shift)

    def precondition(v: Tensor) -> Tensor:
        return v + U @ ((U.t() @ v) * (scale - 1.0))

    w = torch.zeros_like(u)
    r = u.clone()
    z = precondition(r)
    p = z.clone()
    rz = torch.dot(r, z)
    # float32 cannot reach 1e-9: a thousand times its rounding unit there (1.2e-4)
    target = max(tolerance, 1000 * torch.finfo(J.dtype).eps) * float(u.norm())
    iterations, r_norm = 0, float(r.norm())
    while r_norm > target and iterations < max_iterations:
        Ap = c * (J @ (J.t() @ p)) + shift * p
        pAp = torch.dot(p, Ap)
        a = rz / pAp  # a tensor: the updates need no host round trip
        w.add_(a * p)
        r.sub_(a * Ap)
        z = precondition(r)
        rz_next = torch.dot(r, z)
        p = z + (rz_next / rz) * p
        rz = rz_next
        iterations += 1
        # One host round trip an iteration: the curvature check and the residual together
        # (an iterate past non-positive curvature is discarded with the whole solve).
        curvature, r_norm = torch.stack([pAp, r.norm()]).tolist()
        if not curvature > 0:
            return None
    x = -(J.t() @ w)
    JJw = -(J @ x)  # JJᵀw, which also gives the true residual
    if not float((u - c * JJw - shift * w).norm()) <= 10 * target:  # the recursion drifts a little from the truth
        return None
    # δ = −Jᵀw: Jδ = −JJᵀw, ‖δ‖² = wᵀJJᵀw, ∇fᵀδ = −uᵀJJᵀw (∇f = Jᵀu).
    q = 0.5 * c * float(JJw @ JJw) + 0.5 * shift * float(w @ JJw) - float(u @ JJw)
    if not (math.isfinite(q) and bool(torch.isfinite(x).all())):
        return None
    return CGResult(x=x, q=q, iterations=iterations, stop_reason="dense", saved=[(iterations, x, q)],
                    q_history=[0.0, q])


def centred_step(J: Tensor, c: float, shift: float, output_grad: Tensor, center: Tensor,
                 solve: Callable[[Tensor], CGResult | None]) -> CGResult | None:
    """The damped step centred at δ_c: the minimiser of ½c‖Jδ‖² + uᵀJδ + ½s‖δ − δ_c‖²,
    δ = δ_c − Jᵀ(c JJᵀ + sI)⁻¹(u + cJδ_c), by ``solve(u')`` (a residual-space solve of
    (c JJᵀ + sI)w = u' returning −Jᵀw, :func:`residual_solve` or the sketched CG).

    On points drawn afresh every step the exact damped step keeps nothing of earlier steps
    outside the span of this batch's rows of J (3,500 of 116,865 dimensions on the heat
    benchmark); centring the damping at δ_c = ζ·δ₍k−1₎ keeps, in the directions this batch
    does not curve, what earlier batches found: the exact-solve form of CG's start from
    ζ·δ₍k−1₎ (§10), which the paper notes generalises across minibatches better (§12.2).
    In the directions the batch curves strongly the step is the uncentred one.

    Returned with q the undamped-centre model the optimizer's ρ compares against,
    q(δ) = ½c‖Jδ‖² + ½s‖δ‖² + uᵀJδ (computed, not assumed at a minimum); ``None`` when
    the solve fails or q(δ) ≥ 0 (δ_c points uphill on this batch: the caller takes the
    uncentred step)."""
    u = output_grad.reshape(-1).to(J.dtype)
    Jc = J @ center
    result = solve(u + c * Jc)
    if result is None:
        return None
    x = center + result.x
    Jx = Jc + J @ result.x
    q = 0.5 * c * float(Jx @ Jx) + 0.5 * shift * float(x @ x) + float(u @ Jx)
    if not (math.isfinite(q) and q < 0 and bool(torch.isfinite(x).all())):
        return None
    return dataclasses.replace(result, x=x, q=q, saved=[(result.iterations, x, q)], q_history=[0.0, q])


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
