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

:class:`PointwiseResiduals` is the same closure written point by point: each residual a
function of the network at one point (:func:`gradient_at`, :func:`laplacian_at`). It also
gives the residuals' Jacobian J (M × n) by ``torch.func``, one row per residual, which lets
:class:`~torch_hf.HessianFree` solve the Gauss-Newton system exactly in the M-dimensional
residual space when M is below the number of parameters (:func:`torch_hf.dense.residual_solve`).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["residual_loss", "gradient", "laplacian", "PointwiseResiduals", "gradient_at", "laplacian_at"]


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


def gradient_at(u: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """∇u(x) at one point ``x`` (shape (d,)) for ``u`` a scalar function of one point."""
    return torch.func.grad(u)(x)


def laplacian_at(u: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
    """Δu(x) at one point ``x`` (shape (d,)) for ``u`` a scalar function of one point: the
    trace of its Hessian (``torch.func.hessian``)."""
    return torch.func.hessian(u)(x).diagonal().sum()


class PointwiseResiduals:
    """A residual problem's closure, point by point, with its Jacobian.

    Each term is ``(residual, points, *data)``: ``residual(u, x, *data_i)`` is the residual
    at one point ``x`` (a row of ``points``) with ``data_i`` the rows of ``data`` that belong
    to it, and ``u`` the network as a function of one point (``u(x)`` its output, squeezed:
    a scalar for a one-output network). Residuals may be scalars or vectors per point.
    Calling the object returns :func:`residual_loss` of the terms (``(‖r‖², r)``, each term
    scaled by √(w_k/N_k)), evaluated with ``torch.func.vmap`` over the points, so it is a
    closure for :class:`~torch_hf.HessianFree`; :meth:`jacobian` returns J = ∂r/∂θ of the same
    r, by ``vmap`` of ``jacrev`` over the points. With J the optimizer can solve the
    Gauss-Newton system exactly in residual space (M residuals, M × M Cholesky) instead of by
    CG in parameter space: on the 9,873-parameter Poisson network of Dangel et al. (2024)
    with 1,020 residuals, J costs about 140 products (docs/scientific.md).

    Example (−Δu = f inside, u = g on the boundary)::

        pde = PointwiseResiduals(model, [
            (lambda u, x, f: -laplacian_at(u, x) - f, x_interior, f_interior),
            (lambda u, x, g: u(x) - g, x_boundary, g_boundary),
        ])
        opt.step(pde)

    The network must treat points independently (no batch normalisation): a residual is a
    function of its own point alone.
    """

    def __init__(self, model: torch.nn.Module, terms: Sequence[tuple], weights: Sequence[float] | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"PointwiseResiduals: model must be a torch.nn.Module, got {type(model).__name__}")
        if not terms:
            raise ValueError("PointwiseResiduals needs at least one term (residual, points, *data)")
        self.model = model
        self.terms = []
        for k, term in enumerate(terms):
            if not (isinstance(term, (tuple, list)) and len(term) >= 2 and callable(term[0])):
                raise ValueError(f"PointwiseResiduals: term {k} must be (residual, points, *data)")
            fn, points, *data = term
            if not isinstance(points, Tensor) or points.dim() < 1 or len(points) == 0:
                raise ValueError(f"PointwiseResiduals: term {k}'s points must be a non-empty tensor")
            for j, d in enumerate(data):
                if not isinstance(d, Tensor) or len(d) != len(points):
                    raise ValueError(f"PointwiseResiduals: term {k}'s data {j} must be a tensor with one row per "
                                     f"point ({len(points)})")
            self.terms.append((fn, points, tuple(data)))
        self.weights = list(weights) if weights is not None else [1.0] * len(self.terms)
        if len(self.weights) != len(self.terms):
            raise ValueError(f"PointwiseResiduals: {len(self.terms)} terms but {len(self.weights)} weights")

    def _pointwise(self, fn: Callable) -> Callable:
        model = self.model

        def residual(params: dict, x: Tensor, *data: Tensor) -> Tensor:
            def u(point: Tensor) -> Tensor:
                out = torch.func.functional_call(model, params, (point.unsqueeze(0),))
                return out.reshape(out.shape[1:]).squeeze(-1) if out.dim() > 1 else out.squeeze(0)

            return fn(u, x, *data)

        return residual

    def _vmapped(self, fn: Callable, data: tuple) -> Callable:
        return torch.func.vmap(fn, in_dims=(None, 0) + (0,) * len(data))

    def __call__(self) -> tuple[Tensor, Tensor]:
        params = dict(self.model.named_parameters())
        parts = [self._vmapped(self._pointwise(fn), data)(params, points, *data) for fn, points, data in self.terms]
        return residual_loss(*parts, weights=self.weights)

    def jacobian(self, params: Sequence[Tensor] | None = None) -> Tensor:
        """J = ∂r/∂θ (M × n) at the current parameters: rows in the order of the outputs of
        :meth:`__call__`, columns the flat parameters ``params`` (default: the model's
        parameters that require grad) in order; other parameters are held fixed."""
        named = list(self.model.named_parameters())
        if params is None:
            params = [p for _, p in named if p.requires_grad]
        name_of = {id(p): n for n, p in named}
        missing = [i for i, p in enumerate(params) if id(p) not in name_of]
        if missing:
            raise ValueError(f"PointwiseResiduals.jacobian: parameters {missing} are not the model's")
        wanted = [name_of[id(p)] for p in params]
        by_name = dict(named)
        fixed = {n: p.detach() for n, p in named if n not in wanted}
        blocks = []
        for (fn, points, data), w in zip(self.terms, self.weights):
            residual = self._pointwise(fn)

            def of_wanted(free: dict, x: Tensor, *d: Tensor, residual=residual) -> Tensor:
                return residual({**fixed, **free}, x, *d)

            free = {n: by_name[n].detach() for n in wanted}
            jac = self._vmapped(torch.func.jacrev(of_wanted), data)(free, points, *data)
            rows = jac[wanted[0]].numel() // by_name[wanted[0]].numel()  # points × residuals per point
            block = torch.cat([jac[n].reshape(rows, -1) for n in wanted], dim=1)
            blocks.append(block / math.sqrt(rows / w))  # as residual_loss scales the term
        return torch.cat(blocks) if len(blocks) > 1 else blocks[0]
