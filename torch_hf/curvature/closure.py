"""The closure contract: ``closure() -> (loss, outputs)`` with no ``backward()`` inside,
checked once where a curvature operator evaluates it (README, "The closure contract")."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["ClosureError", "NonFiniteLossError", "Closure", "as_param_list", "evaluate_closure", "loss_of"]

Closure = Callable[[], "Tensor | tuple[Tensor, Tensor | Sequence[Tensor]]"]


class ClosureError(ValueError):
    """The closure broke the contract of ``closure() -> (loss, outputs)``."""


class NonFiniteLossError(FloatingPointError):
    """The closure returned a loss that is NaN or infinite."""


def as_param_list(params: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, not a single tensor")
    plist = [p for p in params]
    for p in plist:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must contain tensors, got {type(p).__name__}")
    plist = [p for p in plist if p.requires_grad]
    if not plist:
        raise ValueError("no parameter requires grad: nothing to differentiate")
    return plist


_CLOSURE_CONTRACT = """HessianFree differentiates the closure itself: it must not call backward(), and it returns the network outputs with the loss.
The usual PyTorch closure

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

becomes

    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs"""


def _grad_signature(params: Sequence[Tensor] | None) -> list:
    return [] if params is None else [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def evaluate_closure(closure: Closure, need_outputs: bool, extras: list | None = None,
                     params: Sequence[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Call ``closure`` with grad enabled and check what it returned.

    Returns ``(loss, outputs)`` with ``outputs`` normalised to a tuple (or ``None``
    when the closure returned only the loss and ``need_outputs`` is false). With a list
    ``extras``, the closure must return ``(loss, outputs, extra_outputs)`` (structural
    damping's hidden states, §8.4) and the extra outputs, as a tuple, are appended to it.
    With ``params``, a closure that calls ``backward()`` (the standard PyTorch closure) is
    caught by the change of their ``.grad`` and told the contract.
    """
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    before = _grad_signature(params)
    with torch.enable_grad():
        result = closure()
    if params is not None and _grad_signature(params) != before:
        raise ClosureError("the closure changed the parameters' .grad (it called backward() or zero_grad()). "
                           + _CLOSURE_CONTRACT)
    if extras is not None:
        if not (isinstance(result, (tuple, list)) and len(result) == 3):
            raise ClosureError("with structural damping the closure must return (loss, outputs, hidden_states); "
                               f"got {type(result).__name__}"
                               + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        hidden = result[2]
        hidden = (hidden,) if isinstance(hidden, Tensor) else tuple(hidden)
        if not hidden or not all(isinstance(h, Tensor) and h.requires_grad for h in hidden):
            raise ClosureError("hidden_states must be a tensor or a tuple of tensors that depend on the parameters")
        extras.append(hidden)
        result = result[:2]
    if isinstance(result, Tensor):
        loss, outputs = result, None
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        loss, outputs = result
    else:
        raise ClosureError(
            "closure must return (loss, outputs) or, for curvature='hessian', the loss alone; "
            f"got {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        )
    if not isinstance(loss, Tensor):
        raise ClosureError(f"the loss returned by the closure must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        swapped = isinstance(outputs, Tensor) and outputs.numel() == 1
        raise ClosureError(f"the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                           + (". The second item is a scalar: the closure seems to return (outputs, loss); "
                              "return (loss, outputs), the loss first" if swapped else ""))
    if loss.dim() != 0:
        loss = loss.reshape(())
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(f"the closure returned a non-finite loss ({loss.item()})")
    if not loss.requires_grad:
        raise ClosureError("the loss does not depend on the parameters (it has no autograd graph)")
    if outputs is None:
        if need_outputs:
            raise ClosureError("curvature='ggn' needs the network outputs: the closure returned only the loss. "
                               + _CLOSURE_CONTRACT)
        return loss, None
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    elif isinstance(outputs, (tuple, list)) and outputs and all(isinstance(o, Tensor) for o in outputs):
        outputs = tuple(outputs)
    else:
        raise ClosureError("outputs must be a tensor or a non-empty tuple of tensors")
    for i, out in enumerate(outputs):
        if not out.requires_grad:
            raise ClosureError(f"output {i} does not depend on the parameters (requires_grad is False)")
    return loss, outputs


def loss_of(result):
    """The loss in what a closure returned: ``loss``, or the first item of ``(loss, outputs[,
    hidden])``. For the calls that need nothing else (trial points, the Hessian of f)."""
    return result[0] if isinstance(result, (tuple, list)) else result
