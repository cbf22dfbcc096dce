"""When HF stops moving: steps that change the loss by less than its float resolution.

ρ carries no information there (λ is left alone) and the step is taken whole. After
``STALL_STEPS`` such steps in a row the exact Hessian is looked at once (Lanczos,
:mod:`torch_hf.lanczos`): the Gauss-Newton matrix is PSD and cannot tell a minimum from a
saddle. The verdict is ``"converged"`` (no warning), ``"saddle"``, ``"plateau"`` or
``"unknown"`` (one ``RuntimeWarning`` per optimizer for the last three).
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Callable

import torch
from torch import Tensor

from .curvature import Hessian
from .curvature.closure import loss_of
from .damped import WeightDecay
from .lanczos import lanczos_extremes

__all__ = ["STALL_STEPS", "stall_verdict", "judge_stall", "stall_message"]

# A stall: this many steps in a row below the loss's float resolution; the Hessian is then
# probed with this many Lanczos steps, and a lowest eigenvalue below −ratio × the largest
# magnitude is a saddle (rounding leaves PSD spectra within ~1e-8 of that in float32 runs).
STALL_STEPS = 3
LANCZOS_STEPS = 20
SADDLE_RATIO = 1e-3

logger = logging.getLogger("torch_hf")


def stall_verdict(state: dict, informative: bool, judge: Callable[[], tuple[str, str]], grad_norm: float,
                  resolution: float, may_warn: bool) -> tuple[str, bool]:
    """Count the steps in a row below the loss's float resolution in ``state``; at
    ``STALL_STEPS`` run ``judge`` once (:func:`judge_stall`) and warn unless it finds a
    minimum (only when ``may_warn``: once per optimizer). The verdict holds until a step is
    informative. Returns the verdict ("" while none) and whether a warning was given."""
    if informative:
        state["uninformative_steps"], state["stall"] = 0, ""
        return "", False
    state["uninformative_steps"] = state.get("uninformative_steps", 0) + 1
    if state["uninformative_steps"] < STALL_STEPS or state.get("stall"):
        return state.get("stall", ""), False
    state["stall"], detail = judge()
    logger.info("torch_hf: %d steps below the loss's float resolution: %s (%s)", state["uninformative_steps"],
                state["stall"], detail)
    if state["stall"] == "converged" or not may_warn:
        return state["stall"], False
    warnings.warn(stall_message(state["stall"], state["uninformative_steps"], grad_norm, resolution, detail),
                  RuntimeWarning, stacklevel=5)
    return state["stall"], True


def judge_stall(params: list[Tensor], closure: Callable, weight_decay: WeightDecay, reducer, theta: Tensor,
                resolution: float, safe_kernels: bool | None) -> tuple[str, str]:
    """Extreme eigenvalues of the objective's Hessian ∇²f + ηI at θ (a few Lanczos steps
    from a fixed start, so every process of a group computes the same): ``"saddle"`` if
    the lowest is negative beyond rounding, ``"plateau"`` if a step as long as θ itself
    would change f by less than its ``resolution``, else ``"converged"``. Returns the
    verdict and its evidence in words."""
    try:
        # the loss alone: the Hessian of f needs no outputs or hidden states
        hessian = Hessian(params, lambda: loss_of(closure()), safe_kernels=safe_kernels)

        def mv(v: Tensor) -> Tensor:
            out = hessian.mv(v)
            if reducer is not None:
                reducer.mean_(out)
            return weight_decay.add_product(out, v)

        ends = lanczos_extremes(mv, hessian.numel, LANCZOS_STEPS, torch.Generator().manual_seed(0),
                                dtype=theta.dtype, device=theta.device)
    except Exception as exc:  # noqa: BLE001 - the check is advice; the step itself is done
        return "unknown", f"the Hessian could not be evaluated: {type(exc).__name__}: {exc}"
    low, high = ends.lowest, ends.highest
    scale = max(abs(low), abs(high))
    detail = f"Hessian eigenvalues from {low:.3g} to {high:.3g}, {ends.steps} Lanczos steps"
    if 0.5 * scale * max(float(theta.norm()), 1.0) ** 2 <= resolution:
        return "plateau", detail
    if low < -SADDLE_RATIO * scale:
        return "saddle", detail
    if theta.dtype != torch.float64:  # where a fit must be finer than this dtype resolves, say what float64 buys
        digits = round(math.log10(torch.finfo(theta.dtype).eps / torch.finfo(torch.float64).eps))
        detail += (f"; a minimum to {theta.dtype}'s resolution: a float64 model and data resolve the loss "
                   f"about {digits} digits further")
    return "converged", detail


def stall_message(verdict: str, count: int, grad_norm: float, resolution: float, detail: str) -> str:
    what = {"saddle": "HF has stalled at a saddle point: the Hessian has a negative eigenvalue that the "
                      "Gauss-Newton matrix does not see",
            "plateau": "HF has stalled on a plateau: the loss's curvature is too small for any step to change it "
                       "resolvably",
            "unknown": "HF has stalled, and whether at a minimum could not be checked"}[verdict]
    return (f"torch_hf: {what} ({detail}). {count} HF steps in a row changed the loss by less than its float "
            f"resolution ({resolution:.2g}) at gradient norm {grad_norm:.2g}; λ is left as it is, since ρ "
            "carries no information there. Likely causes: dense default init or saturated units (try "
            "torch_hf.nn.sparse_init_), a loss in float32 that cannot resolve further progress (use float64). "
            "Minibatches or a smaller curvature batch (§12) help leave a plateau; curvature='hessian' with "
            "trust_radius follows negative curvature out of a saddle.")
