"""The exact Hessian H = ∇²f (§5) with the gradient graph cached."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import Tensor

from .. import _flat
from .base import CurvatureOperator
from .closure import Closure, as_param_list, evaluate_closure
from .kernels import build_with_kernel_fallback

__all__ = ["Hessian"]


class Hessian(CurvatureOperator):
    r"""Exact Hessian operator H = ∇²f (§5) with the gradient graph cached.

    The gradient is computed once with ``create_graph=True``; each ``mv(v)`` is then
    one backward pass through that graph (Hv = ∂⟨∇f, v⟩/∂θ, the same product as
    Pearlmutter's R-operator, evaluated reverse-over-reverse). H may be indefinite.

    Args:
        params: the parameters.
        closure: returns ``loss`` or ``(loss, outputs)`` (the outputs take no part in the
            products; they are kept, detached, as ``outputs`` so that callers can compare
            batch sizes as they do with :class:`GGN`).
        safe_kernels: as for :class:`GGN`.
    """

    def __init__(self, params: Iterable[Tensor], closure: Closure, safe_kernels: bool | None = None) -> None:
        self.params = as_param_list(params)
        self._closure = closure
        self.safe_kernels = False
        build_with_kernel_fallback(self, self._build, lambda: self.mv(torch.ones_like(self._grad)), safe_kernels)

    def _build(self) -> None:
        loss, outputs = evaluate_closure(self._closure, need_outputs=False, params=self.params)
        self.outputs = tuple(o.detach() for o in outputs or ())
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self._live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grad = _flat.flatten([None if g is None else g.detach() for g in grads], self.params)
        self._loss = loss.detach()

    def mv(self, v: Tensor) -> Tensor:
        """H v with no forward pass."""
        self._check_vector(v)
        if not self._live:
            return torch.zeros_like(v)
        parts = _flat.unflatten(v, self.params)
        with torch.enable_grad():
            hv = torch.autograd.grad(
                [g for _, g in self._live], self.params, [parts[i] for i, _ in self._live],
                retain_graph=True, allow_unused=True,
            )
        return _flat.flatten(hv, self.params)

    def mm(self, V: Tensor) -> Tensor:
        """H V for a (numel × k) block in one batched backward pass (``is_grads_batched``);
        one product per column where that is not available."""
        if V.dim() != 2 or V.shape[0] != self.numel:
            raise ValueError(f"V must be a ({self.numel} x k) matrix, got {tuple(V.shape)}")
        if not self._live:
            return torch.zeros_like(V)
        if V.device.type == "cpu":  # a loop is faster there (see GGN.mm)
            return super().mm(V)
        k, parts = V.shape[1], _flat.unflatten_columns(V, self.params)
        try:
            with torch.enable_grad():
                hv = torch.autograd.grad([g for _, g in self._live], self.params, [parts[i] for i, _ in self._live],
                                         retain_graph=True, allow_unused=True, is_grads_batched=True)
        except RuntimeError:
            return super().mm(V)
        return _flat.flatten_columns(hv, self.params, k)
