"""Least-squares closures for residual problems: physics-informed networks (PINNs),
regression, boundary and initial conditions.

A loss that is a weighted sum of mean squared residuals,

    L(θ) = Σ_k w_k · (1/N_k) Σ_i r_{k,i}(θ)²,

is the squared norm of one vector, r = (√(w_1/N_1)·r_1, √(w_2/N_2)·r_2, …). Returned as
``(‖r‖², r)``, the closure hands :class:`~torch_hf.HessianFree` the residuals as outputs
and a squared error on them, a matching loss (§6.2) with L'' = 2I in closed form, so the
GGN is exactly the Gauss-Newton matrix 2 JᵀJ of L. Each term must be scaled by
√(w_k/N_k): a term left unscaled makes the GGN that of another loss than the one reported.
:func:`residual_loss` does the scaling.

    def closure():
        u, lap = torch_hf.residuals.laplacian(model, x_interior)
        return torch_hf.residuals.residual_loss(-lap - f, model(x_boundary) - g)

:func:`gradient` and :func:`laplacian` are the input derivatives a PINN's residuals are
made of, built with ``create_graph`` so the optimizer can differentiate them again.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["residual_loss", "gradient", "laplacian"]


def residual_loss(*terms: Tensor, weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """``(loss, r)`` with loss = Σ_k w_k · mean(term_k²) = ‖r‖², r the terms flattened,
    each divided by √(N_k / w_k) (N_k its number of entries), and concatenated.

    Args:
        terms: residual tensors (any shapes), e.g. the PDE residual at interior points and
            the boundary residual.
        weights: w_k > 0 per term (default 1 each).

    Returns what a HessianFree closure returns: ``(loss, outputs)``.
    """
    if not terms:
        raise ValueError("residual_loss needs at least one residual tensor")
    if weights is None:
        weights = [1.0] * len(terms)
    weights = list(weights)
    if len(weights) != len(terms):
        raise ValueError(f"residual_loss: {len(terms)} terms but {len(weights)} weights")
    parts = []
    for k, (term, w) in enumerate(zip(terms, weights)):
        if not isinstance(term, Tensor) or term.numel() == 0:
            raise ValueError(f"residual_loss: term {k} must be a non-empty tensor")
        if not (isinstance(w, (int, float)) and w > 0 and math.isfinite(w)):
            raise ValueError(f"residual_loss: weight {k} must be a finite number > 0, got {w!r}")
        parts.append(term.reshape(-1) / math.sqrt(term.numel() / w))
    r = torch.cat(parts) if len(parts) > 1 else parts[0]
    return torch.nn.functional.mse_loss(r, torch.zeros_like(r), reduction="sum"), r


def gradient(u: Tensor, x: Tensor) -> Tensor:
    """∂u/∂x per point: ``u`` (N) computed from ``x`` (N × d, ``requires_grad``), row i of
    the result the gradient of u_i with respect to x_i (points do not interact)."""
    if not x.requires_grad:
        raise ValueError("gradient: x must require grad (x = x.detach().requires_grad_(True) before computing u)")
    (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
    return du


def laplacian(fn: Callable[[Tensor], Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, Δu)`` at the points ``x`` (N × d) for ``u = fn(x)`` (N or N × 1), by reverse
    mode with respect to the inputs, one pass per dimension, the graph kept for the
    optimizer's derivatives with respect to the parameters."""
    x = x.detach().requires_grad_(True)
    u = fn(x)
    if u.dim() == 2 and u.shape[1] == 1:
        u = u.squeeze(-1)
    du = gradient(u, x)
    lap = torch.zeros_like(u)
    for d in range(x.shape[1]):
        (second,) = torch.autograd.grad(du[:, d].sum(), x, create_graph=True)
        lap = lap + second[:, d]
    return u, lap
