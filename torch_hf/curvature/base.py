"""The base of the curvature operators: what every curvature matrix shares."""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["CurvatureOperator"]


class CurvatureOperator:
    """A curvature matrix as a linear operator on flat parameter vectors (the layout of
    :func:`torch.nn.utils.parameters_to_vector`), built from one evaluation of a closure.
    A new matrix defines ``mv`` (its one hook) and sets ``params``, ``_loss`` and
    ``_grad`` when it evaluates the closure; ``dense``, ``@`` and the checks come from here."""

    params: list[Tensor]
    _loss: Tensor
    _grad: Tensor

    @property
    def loss(self) -> Tensor:
        """The loss of the closure evaluation this operator was built from (detached)."""
        return self._loss

    @property
    def grad(self) -> Tensor:
        """The flat gradient ∇f of that evaluation (detached)."""
        return self._grad

    @property
    def numel(self) -> int:
        return self._grad.numel()

    def _check_vector(self, v: Tensor, name: str = "v") -> None:
        if not isinstance(v, Tensor) or v.dim() != 1 or v.numel() != self.numel:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a flat vector of {self.numel} entries, got {shape}")

    def mv(self, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def mm(self, V: Tensor) -> Tensor:
        """B V for a (numel × k) block of columns; one product per column here, batched
        through autograd by the operators that can (:class:`GGN`, :class:`Hessian`)."""
        if V.dim() != 2 or V.shape[0] != self.numel:
            raise ValueError(f"V must be a ({self.numel} x k) matrix, got {tuple(V.shape)}")
        return torch.stack([self.mv(V[:, i]) for i in range(V.shape[1])], dim=1)

    def dense(self, chunk: int = 64) -> Tensor:
        """The whole matrix B (n × n), ``chunk`` columns at a time through :meth:`mm`
        (small models only: the cost is about n products, batched where the operator can)."""
        n = self.numel
        eye = torch.eye(n, dtype=self._grad.dtype, device=self._grad.device)
        return torch.cat([self.mm(eye[:, i:i + chunk]) for i in range(0, n, chunk)], dim=1)
