"""The phases of one HF iteration (Algorithm 3) as functions of their inputs:
:class:`~torch_hf.HessianFree.step` calls them in order, and each returns what the
next one needs.

* :func:`solve` — line 4, δ ← PCG(−∇f, A, x₀ = ζ·δ₍k−1₎, P) (Alg. 2, §10);
* :func:`backtrack` — line 5, CG-backtracking (§8.7);
* :func:`reduction_ratio` — line 6, ρ against the undamped model (§8.5);
* :func:`line_search` — line 7, the Armijo rule (§8.8);

with :class:`TrialObjective`, f at the trial points θ₀ + αδ they compare.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable

import torch
from torch import Tensor

from . import _flat
from .cg import CGResult, cg
from .config import CGConfig, LineSearchConfig
from .curvature import ClosureError
from .curvature.closure import loss_of
from .damped import WeightDecay

__all__ = ["TrialObjective", "overhead_iterations", "solve", "backtrack", "reduction_ratio", "line_search", "cg_backtracking"]

logger = logging.getLogger("torch_hf")


class TrialObjective:
    """f(θ₀ + αδ) with the weight decay, averaged over the process group, +inf where not
    finite. ``call`` runs the closure at a trial point (without a graph where it can);
    ``evaluations`` counts the calls. The parameters are left at the last trial point."""

    def __init__(self, params: list[Tensor], closure: Callable, call: Callable[[Callable], Any],
                 weight_decay: WeightDecay, reducer: Any, theta0: Tensor) -> None:
        self.params, self.closure, self.call = params, closure, call
        self.weight_decay, self.reducer, self.theta0 = weight_decay, reducer, theta0
        self.evaluations = 0

    def at(self, delta: Tensor, alpha: float = 1.0) -> float:
        self.evaluations += 1
        write_through_data(self.params, self.theta0 + alpha * delta)
        loss = loss_of(self.call(self.closure))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ClosureError("at a trial point the closure must return a scalar loss tensor (or (loss, outputs)); "
                               f"got {type(loss).__name__}"
                               + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
        value = float(loss)
        if self.reducer is not None:
            value = self.reducer.mean_float(value, self.params[0])
        if self.weight_decay.active:
            value += self.weight_decay.penalty(torch.cat([p.reshape(-1) for p in self.params]))
        return value if math.isfinite(value) else math.inf

    def restore(self) -> None:
        """Write θ₀ back (the curvature operator's graph saw θ₀)."""
        write_through_data(self.params, self.theta0)


def write_through_data(params: list[Tensor], flat: Tensor) -> None:
    """Write ``flat`` into the parameters through ``.data``: the version counters stay as
    they are, so the curvature operator (whose graph saved the parameters) can still be
    used once θ₀ is written back — structural damping's model penalty needs J_h δ then."""
    for p, v in zip(params, _flat.unflatten(flat, params)):
        p.data.copy_(v)


# Costs relative to one curvature-vector product on the same batch, for cg_stop="rate"
# (docs/benchmarks.md: a GGN product costs 1.27 gradients; a forward pass about a third).
_GRADIENT_PER_PRODUCT = 0.8
_FORWARD_PER_PRODUCT = 0.3


def overhead_iterations(batch_ratio: float, separate_gradient: bool, preconditioned: bool,
                        trial_evaluations: int) -> float:
    """What a step costs outside CG, in CG iterations (products on the curvature batch),
    for ``cg_stop="rate"``: counted, not timed, so runs stay reproducible and every process
    of a group stops CG at the same iteration. The curvature evaluation and the
    preconditioner's estimate cost about one product each; a gradient on a gradient batch
    ``r`` times the curvature batch ``_GRADIENT_PER_PRODUCT·r``; each trial objective (as
    many as the last step needed) ``_FORWARD_PER_PRODUCT·r``."""
    r = batch_ratio
    cost = 1.0 + (1.0 if preconditioned else 0.0)
    if separate_gradient:
        cost += _GRADIENT_PER_PRODUCT * r
    return cost + trial_evaluations * _FORWARD_PER_PRODUCT * r


def solve(A: Callable[[Tensor], Tensor], grad: Tensor, previous: Tensor | None, preconditioner: Any,
          config: CGConfig, check_every: int, overhead_iters: float | None, capture_stream=None) -> CGResult:
    """Line 4: δ ← PCG(−∇f, A, x₀ = ζ·δ₍k−1₎, P) (Alg. 2, §10), keeping the iterates ⌈γ^m⌉
    for backtracking; a start that meets a non-finite product restarts from zero. With
    ``capture_stream``, CG's vector work is replayed from a CUDA graph (:func:`torch_hf.cg.cg`)."""
    usable = previous is not None and config.decay > 0 and previous.shape == grad.shape
    x0 = previous * config.decay if usable else None
    factor = config.backtracking_factor or 1e9  # None: only the last iterate is kept
    trust_metric = preconditioner.diagonal() if config.trust_radius is not None else None
    kwargs = dict(precondition=preconditioner.solve, max_iters=config.max_iters, min_iters=config.min_iters,
                  tol=config.tol, backtracking_factor=factor, trust_radius=config.trust_radius,
                  trust_metric=trust_metric, check_every=check_every, overhead_iters=overhead_iters,
                  capture_stream=capture_stream)
    try:
        return cg(A, -grad, x0, **kwargs)
    except FloatingPointError:
        if x0 is None:
            raise
        logger.warning("torch_hf: non-finite product at the CG initialisation; restarting CG from zero")
        return cg(A, -grad, None, **kwargs)


def backtrack(result: CGResult, objective: TrialObjective, last_only: bool) -> tuple[int, Tensor, float, float]:
    """Line 5: CG-backtracking (§8.7), walking back from the last saved iterate while f
    improves. Returns (CG iteration, δ, q(δ), f(θ₀ + δ))."""
    saved = result.saved[-1:] if last_only else result.saved
    j, f_best = cg_backtracking([x for _, x, _ in saved], objective.at)
    chosen_iteration, delta, q_chosen = saved[j]
    return chosen_iteration, delta, q_chosen, f_best


def reduction_ratio(model_reduction: float, f_best: float, loss_before: float, resolution: float
                    ) -> tuple[float, bool]:
    """Line 6: ρ = (f(θ+δ) − f(θ)) / M(δ), M the undamped model (§8.5, eq. 10), and whether
    it is informative: below the loss's float ``resolution`` both changes are rounding, ρ
    would read 0 and λ would grow on noise (a full-batch run then stalls silently)."""
    actual = f_best - loss_before
    rho = actual / model_reduction if model_reduction < 0 else (-math.inf if math.isfinite(actual) else math.nan)
    if not math.isfinite(f_best):
        rho = math.nan
    informative = not (math.isfinite(f_best) and abs(actual) <= resolution and abs(model_reduction) <= resolution)
    return rho, informative


def line_search(objective: TrialObjective, grad: Tensor, delta: Tensor, f_best: float, loss_before: float,
                config: LineSearchConfig, informative: bool = True) -> tuple[float, float, float]:
    """Line 7: Armijo backtracking f(θ+αδ) ≤ f(θ) + c·α·∇fᵀδ (§8.8). Returns (α, f, ∇fᵀδ);
    α = 0 when δ is not a descent direction or no α passes. A descent step whose actual and
    predicted changes are both below the loss's float resolution is taken whole: comparing
    f there compares rounding, and the step cannot change f by more than that rounding,
    while the model's step still carries θ to the minimum to the gradient's precision."""
    slope = float(torch.dot(grad, delta))
    alpha, f_new = 1.0, f_best
    if slope >= 0 or not math.isfinite(slope):
        return 0.0, loss_before, slope  # not a descent direction: no step
    if not informative:
        return alpha, f_new, slope
    if config.c is not None:
        tries = 0
        while not (f_new <= loss_before + config.c * alpha * slope):
            if tries >= config.max_evals:
                return 0.0, loss_before, slope
            alpha *= config.beta
            f_new = objective.at(delta, alpha)
            tries += 1
    elif not math.isfinite(f_new):
        return 0.0, loss_before, slope
    return alpha, f_new, slope


def cg_backtracking(iterates: list[Tensor], objective: Callable[[Tensor], float]) -> tuple[int, float]:
    """CG-backtracking (§8.7, Martens 2010): evaluate the objective at the last saved
    iterate, then walk back through earlier ones while it keeps decreasing.

    Returns the index of the chosen iterate and its objective value. Non-finite values
    count as +inf, so a diverged tail is walked past.
    """
    if not iterates:
        raise ValueError("no CG iterates to choose from")
    j = len(iterates) - 1
    best = objective(iterates[j])
    while j > 0:
        previous = objective(iterates[j - 1])
        if previous < best or not math.isfinite(best):
            best, j = previous, j - 1
        else:
            break
    return j, best
