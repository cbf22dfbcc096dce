"""Finite-difference and dense-matrix verification of curvature products (§7.2).

Use these on a *tiny* float64 copy of your model (few units, short sequences, T≈4)
before trusting a new model with HF::

    report = torch_hf.testing.check_ggn(model.parameters(), closure, loss_fn=loss_fn)
    print(report)            # relative errors of J v, Jᵀ u, L'' u, G v and dense G

Each check compares the exact product of :class:`torch_hf.GGN` / :class:`torch_hf.Hessian`
with a central finite difference

* J w   ≈ (F(θ + εw) − F(θ − εw)) / 2ε                       (§7.2 point 1)
* Jᵀ u  through the columns of J: [Jᵀu]_j = (J e_j)ᵀ u        (§7.2 point 3)
* L'' u ≈ (∇L(z + εu) − ∇L(z − εu)) / 2ε                      (§7.2 point 2)
* G     = J_fdᵀ L''_fd J_fd, column by column, against ``GGN.mv(e_j)``
* H v   ≈ (∇f(θ + εv) − ∇f(θ − εv)) / 2ε

and raises :class:`VerificationError` when a relative error ``‖a − b‖ / ‖b‖`` exceeds
``rtol``. With ε ≈ 1e-4 in float64 the truncation error is O(ε²) ≈ 1e-8 and the
round-off O(1e-16/ε) ≈ 1e-12, so correct code lands around 1e-8…1e-10; 1e-6 is a
safe threshold (the paper quotes ~1e-6).

Pitfalls (§7.2): use parameters of a *reasonable scale*. Too small and the units sit
in their linear regime, too large and they saturate; either way the activation
derivatives are constant or zero and a wrong second-order term can still match the
finite differences. Use random parameters and random directions, not zeros or
ones; use float64; keep the model tiny (the dense checks cost n closure calls).
The perturbation is applied to the parameters in place and undone exactly.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from . import _flat
from .curvature import GGN, Hessian, evaluate_closure
from .curvature.closure import as_param_list as _as_param_list

__all__ = ["VerificationError", "Report", "check_ggn", "check_hessian", "relative_error",
           "fd_jvp", "fd_jacobian", "fd_loss_hessian", "fd_hvp"]


class VerificationError(AssertionError):
    """A curvature product disagrees with its finite-difference reference."""


def relative_error(actual: Tensor, expected: Tensor) -> float:
    """‖actual − expected‖ / ‖expected‖ (absolute error when ``expected`` is zero)."""
    denom = float(expected.norm())
    diff = float((actual - expected).norm())
    return diff / denom if denom > 0 else diff


@dataclass
class Report:
    """Relative errors of each check, by name (e.g. ``"jvp"``, ``"dense_ggn"``)."""

    errors: dict[str, float] = field(default_factory=dict)
    rtol: float = 1e-6

    @property
    def max_error(self) -> float:
        return max(self.errors.values()) if self.errors else 0.0

    def raise_if_failed(self) -> "Report":
        bad = {k: v for k, v in self.errors.items() if not v <= self.rtol}
        if bad:
            detail = ", ".join(f"{k}: {v:.3g}" for k, v in bad.items())
            raise VerificationError(f"relative error above rtol={self.rtol:g}: {detail}")
        return self

    def __str__(self) -> str:
        rows = "\n".join(f"  {k:<14} {v:.3e}" for k, v in self.errors.items())
        return f"torch_hf.testing report (rtol {self.rtol:g}):\n{rows}"


class _Perturb:
    """Context that shifts the parameters by ``scale * direction`` and restores them exactly."""

    def __init__(self, params: Sequence[Tensor], direction: Tensor, scale: float) -> None:
        self.params, self.parts, self.scale = params, _flat.unflatten(direction, params), scale

    def __enter__(self) -> None:
        self.saved = [p.detach().clone() for p in self.params]
        with torch.no_grad():
            for p, d in zip(self.params, self.parts):
                p.add_(d, alpha=self.scale)

    def __exit__(self, *exc) -> None:
        with torch.no_grad():
            for p, s in zip(self.params, self.saved):
                p.copy_(s)


def _outputs_at(params, closure, direction, scale) -> tuple[Tensor, ...]:
    with _Perturb(params, direction, scale), torch.no_grad():
        result = closure()
    outputs = result[1]
    return tuple(o.detach() for o in ((outputs,) if isinstance(outputs, Tensor) else outputs))


def fd_jvp(params: Sequence[Tensor], closure: Callable, direction: Tensor, eps: float = 1e-4) -> tuple[Tensor, ...]:
    """Central difference (F(θ+εw) − F(θ−εw)) / 2ε of the closure's outputs."""
    plus = _outputs_at(params, closure, direction, eps)
    minus = _outputs_at(params, closure, direction, -eps)
    return tuple((a - b) / (2 * eps) for a, b in zip(plus, minus))


def fd_jacobian(params: Sequence[Tensor], closure: Callable, eps: float = 1e-4) -> Tensor:
    """Dense Jacobian of the concatenated, flattened outputs, one column per parameter."""
    n = _flat.numel(params)
    ref = params[0]
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    cols = [torch.cat([t.reshape(-1) for t in fd_jvp(params, closure, eye[j], eps)]) for j in range(n)]
    return torch.stack(cols, dim=1)


def fd_loss_hessian(loss_fn: Callable[..., Tensor], outputs: Sequence[Tensor], eps: float = 1e-4) -> Tensor:
    """Dense L'' of ``loss_fn(*outputs)`` w.r.t. the flattened outputs, by central
    differences of its autograd gradient."""
    base = [o.detach() for o in outputs]
    flat = torch.cat([o.reshape(-1) for o in base])

    def grad_at(vec: Tensor) -> Tensor:
        zs, off = [], 0
        for o in base:
            zs.append(vec[off : off + o.numel()].view_as(o).clone().requires_grad_(True))
            off += o.numel()
        with torch.enable_grad():
            g = torch.autograd.grad(loss_fn(*zs), zs, allow_unused=True)
        return torch.cat([torch.zeros_like(z).reshape(-1) if t is None else t.reshape(-1) for z, t in zip(zs, g)])

    eye = torch.eye(flat.numel(), dtype=flat.dtype, device=flat.device)
    cols = [(grad_at(flat + eps * e) - grad_at(flat - eps * e)) / (2 * eps) for e in eye]
    return torch.stack(cols, dim=1)


def fd_hvp(params: Sequence[Tensor], closure: Callable, direction: Tensor, eps: float = 1e-4) -> Tensor:
    """Central difference of the gradient, (∇f(θ+εv) − ∇f(θ−εv)) / 2ε."""

    def grad_at(scale: float) -> Tensor:
        with _Perturb(params, direction, scale):
            loss, _ = evaluate_closure(closure, need_outputs=False)
            with torch.enable_grad():
                g = torch.autograd.grad(loss, params, allow_unused=True)
        return _flat.flatten(g, params)

    return (grad_at(eps) - grad_at(-eps)) / (2 * eps)


def _random_like(n: int, ref: Tensor, generator: torch.Generator) -> Tensor:
    return torch.randn(n, generator=generator, dtype=ref.dtype).to(ref.device)


def check_ggn(
    params: Iterable[Tensor],
    closure: Callable,
    loss_fn: Callable[..., Tensor] | None = None,
    *,
    eps: float = 1e-4,
    rtol: float = 1e-6,
    directions: int = 2,
    dense: bool = True,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> Report:
    """Verify :class:`torch_hf.GGN` on ``(params, closure)`` against finite differences.

    Args:
        params: the (tiny, float64) model's parameters.
        closure: ``() -> (loss, outputs)`` as for the optimizer.
        loss_fn: ``loss_fn(*outputs) -> loss``, the same loss as a function of the
            outputs. Needed for the finite-difference L'' and the fully
            finite-difference dense G; without it those two checks are skipped.
        eps: finite-difference step (~1e-4 in float64, §7.2).
        rtol: largest relative error accepted.
        directions: number of random directions for the J v, Jᵀ u and L'' u checks.
        dense: also build G column by column (n products) and compare it with
            J_fdᵀ L''_fd J_fd.
        seed: seed of the random directions.
        raise_on_failure: raise :class:`VerificationError` if a check fails.

    Returns:
        A :class:`Report` of relative errors.
    """
    params = _as_param_list(params)
    ref = params[0]
    gen = torch.Generator().manual_seed(seed)
    report = Report(rtol=rtol)
    # Finite differences first: they perturb the parameters in place, which would
    # invalidate the activations an operator has cached.
    with torch.no_grad():
        loss, outputs = evaluate_closure(closure, need_outputs=True)
    n = _flat.numel(params)
    vs = [_random_like(n, ref, gen) for _ in range(directions)]
    us = [[torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outputs] for _ in vs]
    fd_j = [torch.cat([t.reshape(-1) for t in fd_jvp(params, closure, v, eps)]) for v in vs]
    jac = fd_jacobian(params, closure, eps)
    lhess = fd_loss_hessian(loss_fn, outputs, eps) if loss_fn is not None else None
    ggn = GGN(params, closure)
    worst = {"jvp": 0.0, "vjp": 0.0, "loss_hvp": 0.0, "ggn_mv": 0.0}
    for v, u, approx in zip(vs, us, fd_j):
        exact = torch.cat([t.reshape(-1) for t in ggn.jvp(v)])
        worst["jvp"] = max(worst["jvp"], relative_error(exact, approx))
        u_flat = torch.cat([t.reshape(-1) for t in u])
        worst["vjp"] = max(worst["vjp"], relative_error(ggn.vjp(u), jac.T @ u_flat))
        if lhess is not None:
            lu = torch.cat([t.reshape(-1) for t in ggn.loss_hvp(u)])
            worst["loss_hvp"] = max(worst["loss_hvp"], relative_error(lu, lhess @ u_flat))
            worst["ggn_mv"] = max(worst["ggn_mv"], relative_error(ggn.mv(v), jac.T @ (lhess @ (jac @ v))))
    if lhess is None:
        del worst["loss_hvp"], worst["ggn_mv"]
    report.errors.update(worst)
    if dense and lhess is not None:
        report.errors["dense_ggn"] = relative_error(ggn.dense(), jac.T @ lhess @ jac)
    return report.raise_if_failed() if raise_on_failure else report


def check_hessian(
    params: Iterable[Tensor],
    closure: Callable,
    *,
    eps: float = 1e-4,
    rtol: float = 1e-6,
    directions: int = 2,
    dense: bool = True,
    seed: int = 0,
    raise_on_failure: bool = True,
) -> Report:
    """Verify :class:`torch_hf.Hessian` against central differences of the gradient
    (random directions, and column by column when ``dense``). Arguments as in
    :func:`check_ggn`."""
    params = _as_param_list(params)
    ref = params[0]
    gen = torch.Generator().manual_seed(seed)
    report = Report(rtol=rtol)
    n = _flat.numel(params)
    vs = [_random_like(n, ref, gen) for _ in range(directions)]
    fd = [fd_hvp(params, closure, v, eps) for v in vs]
    eye = torch.eye(n, dtype=ref.dtype, device=ref.device)
    fd_dense = torch.stack([fd_hvp(params, closure, e, eps) for e in eye], dim=1) if dense else None
    hess = Hessian(params, closure)  # after the in-place perturbations, see check_ggn
    report.errors["hvp"] = max(relative_error(hess.mv(v), approx) for v, approx in zip(vs, fd))
    if fd_dense is not None:
        report.errors["dense_hessian"] = relative_error(hess.dense(), fd_dense)
    return report.raise_if_failed() if raise_on_failure else report
