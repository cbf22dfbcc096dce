"""The damped system CG solves (§8, §13): A = B + λD + ηI, composed from the curvature
operator B, the damping object's λD and the weight decay η, averaged over the
data-parallel group. Weight decay lives here and nowhere else: it enters f, ∇f, every
product and the preconditioner's diagonal through :class:`WeightDecay`.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

__all__ = ["WeightDecay", "DampedOperator"]


class WeightDecay:
    """η of the penalty (η/2)‖θ‖², exactly in f, ∇f and the curvature (§13). ``eta`` is a
    float, or a flat vector when parameter groups decay at different rates."""

    def __init__(self, eta: float | Tensor) -> None:
        self.eta = eta
        self.active = bool(eta.any()) if isinstance(eta, Tensor) else eta != 0

    @classmethod
    def of_groups(cls, groups: Sequence[dict], params: list[Tensor]) -> "WeightDecay":
        """The groups' rates over ``params`` (those that require grad), flat."""
        rates = [(g["weight_decay"], [p for p in g["params"] if p.requires_grad]) for g in groups]
        if len({r for r, _ in rates}) == 1:
            return cls(float(rates[0][0]))
        return cls(torch.cat([torch.full((p.numel(),), float(r), dtype=p.dtype, device=p.device)
                              for r, ps in rates for p in ps]))

    def penalty(self, theta: Tensor) -> float:
        """(η/2)‖θ‖² (0.0 when η = 0)."""
        return 0.5 * float((self.eta * theta * theta).sum()) if self.active else 0.0

    def gradient(self, grad: Tensor, theta: Tensor) -> Tensor:
        """∇f + ηθ."""
        return grad + self.eta * theta if self.active else grad

    def add_product(self, out: Tensor, v: Tensor) -> Tensor:
        """out += ηv, in place."""
        if not self.active:
            return out
        return out.addcmul_(self.eta, v) if isinstance(self.eta, Tensor) else out.add_(v, alpha=self.eta)

    def diagonal(self) -> float | Tensor:
        """η as the preconditioner adds it to its diagonal (§11.2)."""
        return self.eta if isinstance(self.eta, Tensor) else float(self.eta)


class DampedOperator:
    """v ↦ (B + λD + ηI) v, B's part averaged over the process group (``reducer``), and the
    count of products taken (``products``). When the damping is diagonal, λD and ηI are
    folded into one fused pass per product."""

    def __init__(self, curvature: Any, damping: Any, weight_decay: WeightDecay, reducer: Any = None) -> None:
        self.curvature, self.damping, self.weight_decay, self.reducer = curvature, damping, weight_decay, reducer
        diagonal = damping.diagonal()
        self._shift = None if diagonal is None else diagonal + weight_decay.eta
        self.products = 0

    @property
    def shift(self) -> float | Tensor | None:
        """diag(λD) + η, what the damping and the weight decay add to B's diagonal
        (``None`` when the damping is not diagonal)."""
        return self._shift

    def mv(self, v: Tensor) -> Tensor:
        self.products += 1
        out = self.curvature.mv(v)
        if self.reducer is not None:
            self.reducer.mean_(out)
        shift = self._shift
        if shift is not None:
            return out.addcmul_(shift, v) if isinstance(shift, Tensor) else out.add_(v, alpha=shift)
        out.add_(self.damping.mv(v))  # a damping that is not diagonal
        return self.weight_decay.add_product(out, v)

    __call__ = mv
