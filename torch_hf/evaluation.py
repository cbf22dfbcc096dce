"""Lines 1–2 of Algorithm 3: the closure evaluated at θ₀ — f and ∇f on the gradient batch
and the curvature operator on the curvature batch (§12.1), its activations cached for CG
(§7.1) — and the closure evaluated at trial points, without a graph where it can be.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from . import _flat
from .curvature import ClosureError, NonFiniteLossError, evaluate_closure
from .damped import WeightDecay

__all__ = ["Evaluation", "evaluate", "first_cases", "TrialCall", "blame"]

logger = logging.getLogger("torch_hf")


@dataclass(frozen=True)
class Evaluation:
    """The curvature operator B, the closure's loss (what ``step`` returns), f and ∇f at
    θ₀ with the weight decay, and the batch sizes' ratio."""

    curvature: Any
    loss: Tensor
    f: float
    grad: Tensor
    theta0: Tensor
    resolution: float  # the loss's float resolution at θ₀
    separate_gradient: bool  # the gradient batch is not the curvature batch
    batch_ratio: float  # gradient batch / curvature batch (by the outputs' sizes)


def evaluate(params: list[Tensor], closure: Callable, curvature_closure: Callable | None,
             build_curvature: Callable[[Callable, str], Any], needs_extras: bool, decay: WeightDecay,
             reducer: Any) -> Evaluation:
    """f(θ) and ∇f on the gradient batch, and B = ``build_curvature(closure, name)`` on the
    curvature batch (the gradient batch when ``curvature_closure`` is None). A
    :class:`NonFiniteLossError` leaves θ as it is and names the closure; under data
    parallelism every process raises it, none is left waiting."""
    failure: NonFiniteLossError | None = None
    separate, ratio = curvature_closure is not None, 1.0
    try:
        op = build_curvature(curvature_closure or closure, "curvature_closure (the curvature batch)" if separate
                             else "the closure")
        if not separate:
            f_loss, f_grad = op.loss, op.grad
        else:
            with blame("closure (the gradient batch)"):
                loss_t, outs = evaluate_closure(closure, need_outputs=False, extras=[] if needs_extras else None,
                                                params=params)
            if outs and op.outputs and op.outputs[0].numel():
                ratio = outs[0].numel() / op.outputs[0].numel()
            with torch.enable_grad():
                grads = torch.autograd.grad(loss_t, params, allow_unused=True)
            f_loss, f_grad = loss_t.detach(), _flat.flatten(grads, params)
    except NonFiniteLossError as exc:
        if reducer is None:
            raise
        failure = exc  # tell the other processes before raising
    if reducer is not None:
        # One all-reduce carries the loss and any failure: a NaN from a failed process
        # makes the mean NaN everywhere, so every process raises.
        mean_loss = reducer.mean_float(math.nan if failure is not None else float(f_loss), params[0])
        if not math.isfinite(mean_loss):
            raise failure or NonFiniteLossError("the loss is not finite on another process of the group")
        f_loss = torch.tensor(mean_loss, dtype=f_loss.dtype, device=f_loss.device)
        f_grad = reducer.mean(f_grad)
    theta0 = torch.cat([p.detach().reshape(-1) for p in params])
    f = float(f_loss) + decay.penalty(theta0)
    grad = decay.gradient(f_grad, theta0)
    if not bool(torch.isfinite(grad).all()):
        which = "closure (the gradient batch)" if separate else "the closure"
        raise NonFiniteLossError(f"{which}: the gradient of the loss is not finite at the current parameters, "
                                 "though the loss is (an inf·0 or a non-differentiable point, such as sqrt at 0)")
    resolution = 8 * torch.finfo(f_loss.dtype).eps * max(abs(f), 1e-30)
    return Evaluation(op, f_loss, f, grad, theta0, resolution, separate, ratio)


def first_cases(closure: Callable, n: int) -> Callable:
    """The curvature closure of the one-closure form (§12.1): ``closure(slice(0, n))``."""
    try:
        takes_cases = bool(inspect.signature(closure).parameters)
    except (TypeError, ValueError):  # a builtin or C callable: assume it does
        takes_cases = True
    if not takes_cases:
        raise ClosureError(f"curvature_batch={n} needs a closure that takes the cases to evaluate: "
                           "def closure(cases=slice(None)): xb, yb = x[cases], y[cases]; ...; "
                           "or pass a curvature_closure to step()")
    cases = slice(0, n)
    return lambda: closure(cases)


class TrialCall:
    """Runs the closure at a trial point: under ``no_grad`` (no graph is kept, so trial
    points cost a plain forward pass), unless the closure differentiates inside (a PINN's
    Δu by ``torch.autograd.grad``): then it raises under ``no_grad``, is called again with
    grad enabled, and from then on always so (logged once). ``torch.func`` transforms work
    under ``no_grad`` as they are."""

    def __init__(self) -> None:
        self.needs_grad = False

    def __call__(self, closure: Callable):
        if not self.needs_grad:
            try:
                with torch.no_grad():
                    return closure()
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as no_grad_error:
                with torch.enable_grad():  # a second failure propagates, chained to the first
                    result = closure()
                self.needs_grad = True
                logger.info("torch_hf: the closure needs autograd at trial points (%s); evaluating them with "
                            "grad enabled from now on", str(no_grad_error).splitlines()[0][:120])
                return result
        with torch.enable_grad():
            return closure()


@contextlib.contextmanager
def blame(which: str):
    """Name the closure behind a contract violation or a non-finite value."""
    try:
        yield
    except (ClosureError, NonFiniteLossError) as exc:
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(which):
            exc.args = (f"{which}: {exc.args[0]}",) + exc.args[1:]
        raise
