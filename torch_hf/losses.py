"""Matching losses and their exact output Hessians L'' (§6.2, Table 2).

For a loss that is convex in the network outputs ``z`` the generalized Gauss-Newton
matrix G = Jᵀ L'' J needs products with L'' = ∂²L/∂z². For the three *matching*
loss/output-nonlinearity pairs of Table 2 L'' has a closed form that costs one
elementwise pass, so :class:`torch_hf.GGN` uses it when it recognises the loss in
the closure's autograd graph (``F.mse_loss``, ``F.binary_cross_entropy_with_logits``,
``F.cross_entropy`` with hard targets, each with ``reduction`` ``"mean"`` or ``"sum"``
and no weights). Anything else falls back to the exact double-backward product.

Each closed form also gives a factor S with S Sᵀ = L'', which the unbiased GGN
diagonal estimator of §11.4 needs (``sq(Jᵀ S v)`` with Rademacher ``v``).

======================  ===========================  ==================================
loss                    L'' (per case)               factor S v
======================  ===========================  ==================================
squared error  c‖z−t‖²  2c I                         √(2c) v
sigmoid + binary CE     c diag(p(1−p)), p = σ(z)     √(c p(1−p)) ⊙ v
softmax + CE            c (diag(p) − p pᵀ)           √c (√p ⊙ v − p (√pᵀ v))
======================  ===========================  ==================================

``c`` is 1 for ``reduction="sum"`` and 1/N for ``"mean"`` (N = number of elements
for the first two, number of non-ignored targets for cross-entropy).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["MatchingLoss", "recognize"]

_MEAN, _SUM = 1, 2  # at::Reduction enum values saved on loss backward nodes


@dataclass
class MatchingLoss:
    """Closed-form output Hessian of a recognised matching loss.

    Attributes:
        name: ``"squared_error"``, ``"binary_cross_entropy"`` or ``"cross_entropy"``.
        hvp: ``u -> L'' u`` for ``u`` shaped like the output.
        sqrt_hvp: ``v -> S v`` with ``S Sᵀ = L''`` (for §11.4's estimator).
    """

    name: str
    hvp: Callable[[Tensor], Tensor]
    sqrt_hvp: Callable[[Tensor], Tensor]


def _scale(reduction: int, count: float) -> float | None:
    if reduction == _MEAN:
        return 1.0 / count
    if reduction == _SUM:
        return 1.0
    return None


def _only_input_is(node, output_node) -> bool:
    """True when ``node``'s differentiable inputs are exactly the output (targets constant)."""
    nexts = [n for n, _ in node.next_functions if n is not None]
    return len(nexts) == 1 and nexts[0] is output_node


def recognize(loss: Tensor, output: Tensor) -> MatchingLoss | None:
    """Return the closed-form L'' of ``loss`` w.r.t. ``output``, or ``None``.

    Recognition reads the backward node that produced ``loss``: it must be one of
    the matching losses applied directly to ``output`` with a constant target.
    A positive constant factor on top (``loss / N``, ``c * loss``) is folded in.
    Anything not recognised (sums of losses, label smoothing, class weights, soft
    targets) returns ``None`` and the caller uses autograd instead.
    """
    node, out_node = loss.grad_fn, output.grad_fn
    if node is None or out_node is None:
        return None
    try:
        node, scale = _strip_constant_scale(node)
    except (AttributeError, RuntimeError):
        return None
    if node is None:
        return None
    found = _recognize_node(node, out_node, output)
    if found is None or scale == 1.0:
        return found
    root_scale = scale**0.5
    hvp, sqrt_hvp = found.hvp, found.sqrt_hvp
    return MatchingLoss(found.name, lambda u: hvp(u) * scale, lambda v: sqrt_hvp(v) * root_scale)


def _strip_constant_scale(node) -> tuple[object | None, float]:
    """Peel ``loss * c``, ``c * loss`` and ``loss / c`` (c a positive constant) off the
    top of the loss graph: ``F.binary_cross_entropy_with_logits(z, x, reduction="sum") / N``
    is the per-case summed loss of the papers. Returns the inner node and the product
    of the constants (``None`` node when the top is not such a scaling)."""
    scale = 1.0
    while type(node).__name__ in ("MulBackward0", "DivBackward0"):
        nexts = [(i, n) for i, (n, _) in enumerate(node.next_functions) if n is not None]
        if len(nexts) != 1:
            return node, scale  # both factors depend on the parameters: not a constant scaling
        index, inner = nexts[0]
        const = node._saved_other if index == 0 else node._saved_self
        if not isinstance(const, (Tensor, int, float)) or (isinstance(const, Tensor) and const.numel() != 1):
            return None, scale
        c = float(const)
        if type(node).__name__ == "DivBackward0":
            if index != 0:
                return None, scale  # loss in the denominator
            c = 1.0 / c if c != 0 else float("nan")
        if not (c > 0 and c != float("inf")):
            return None, scale
        scale *= c
        node = inner
    return node, scale


def _recognize_node(node, out_node, output: Tensor) -> MatchingLoss | None:
    kind = type(node).__name__
    try:
        if kind == "MseLossBackward0" and _only_input_is(node, out_node):
            c = _scale(node._saved_reduction, output.numel())
            if c is None:
                return None
            a = 2.0 * c
            root = a ** 0.5
            return MatchingLoss("squared_error", lambda u: u * a, lambda v: v * root)
        if kind == "BinaryCrossEntropyWithLogitsBackward0" and _only_input_is(node, out_node):
            if node._saved_weight is not None or node._saved_pos_weight is not None:
                return None
            c = _scale(node._saved_reduction, output.numel())
            if c is None:
                return None
            p = torch.sigmoid(output.detach())
            curv = p * (1 - p) * c
            root = curv.sqrt()
            return MatchingLoss("binary_cross_entropy", lambda u: u * curv, lambda v: v * root)
        if kind == "NllLossBackward0":
            logsm = node.next_functions[0][0]
            if type(logsm).__name__ != "LogSoftmaxBackward0" or not _only_input_is(logsm, out_node):
                return None
            if node._saved_weight is not None or output.dim() < 2 or logsm._saved_dim != 1:
                return None
            target = node._saved_target
            keep = (target != node._saved_ignore_index).unsqueeze(1).to(output.dtype)
            count = float(node._saved_total_weight.item()) if node._saved_reduction == _MEAN else 1.0
            c = _scale(node._saved_reduction, max(count, 1.0))
            if c is None:
                return None
            p = torch.softmax(output.detach(), dim=1)
            sqrt_p = p.sqrt()
            w = keep * c
            root_w = w.sqrt()

            def hvp(u: Tensor) -> Tensor:
                pu = p * u
                return (pu - p * pu.sum(1, keepdim=True)) * w

            def sqrt_hvp(v: Tensor) -> Tensor:
                return (sqrt_p * v - p * (sqrt_p * v).sum(1, keepdim=True)) * root_w

            return MatchingLoss("cross_entropy", hvp, sqrt_hvp)
    except (AttributeError, RuntimeError):
        # Saved-attribute names are a PyTorch internal: if they change, fall back to autograd.
        return None
    return None
