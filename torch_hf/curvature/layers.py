"""Per-layer statistics for the preconditioners (§11.3–11.4, K-FAC): Jᵀc with the per-case
factors of each linear layer read on the way (Algorithm 6's structure). The public face
is :meth:`GGN.layer_vjp` and :meth:`GGN.squared_vjp`; preconditioners use those."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .graph import linear_layers

__all__ = ["layer_backward", "squared_vjp"]


def layer_backward(outputs: tuple[Tensor, ...], params: list[Tensor], c: tuple[Tensor, ...],
                    on_layer: Callable[[Tensor, Tensor, int, int | None], None]) -> tuple[Tensor | None, ...]:
    """Jᵀ c for every parameter, calling ``on_layer(x, delta, weight_index, bias_index)``
    on the way for each linear layer applied once to a (cases × features) input ``x``,
    with ``delta`` the cotangent of its output (cases × out): the per-case factors of
    the layer's gradient, J_iᵀ c_i = delta_i ⊗ x_i (Algorithm 6's structure)."""
    batch = outputs[0].shape[0] if outputs[0].dim() > 0 else 1
    handles = []

    def make_hook(x, w, b):
        def hook(grad_outputs):
            if grad_outputs[0] is not None:
                on_layer(x, grad_outputs[0], w, b)
            return None
        return hook

    for node, x, w, b in linear_layers(outputs, params, batch):
        handles.append(node.register_prehook(make_hook(x, w, b)))
    try:
        with torch.enable_grad():
            return torch.autograd.grad(outputs, params, c, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()


def squared_vjp(outputs: tuple[Tensor, ...], params: list[Tensor], c: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    per_case: dict[int, Tensor] = {}

    def on_layer(x, delta, w, b):
        d2 = delta.square()
        per_case[w] = d2.t() @ x.square()
        if b is not None:
            per_case[b] = d2.sum(0)

    grads = layer_backward(outputs, params, c, on_layer)
    parts, mask = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if i in per_case:
            parts.append(per_case[i].reshape(-1))
            mask.append(torch.ones(p.numel(), dtype=torch.bool, device=p.device))
        else:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.square().reshape(-1))
            mask.append(torch.zeros(p.numel(), dtype=torch.bool, device=p.device))
    return torch.cat(parts), torch.cat(mask)
