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

    def dense(self) -> Tensor:
        """The whole matrix, column by column (tiny models only: n products)."""
        n = self.numel
        eye = torch.eye(n, dtype=self._grad.dtype, device=self._grad.device)
        return torch.stack([self.mv(eye[i]) for i in range(n)], dim=1)
