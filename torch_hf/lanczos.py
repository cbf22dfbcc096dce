"""Extreme eigenvalues of a symmetric curvature operator by the Lanczos process.

The Gauss-Newton matrix is positive semi-definite, so an HF run that stops moving cannot
tell from its own curvature whether it sits at a minimum or at a saddle point: the GGN
does not see the Hessian's negative directions (§5–6). A few Lanczos steps on the exact
Hessian (:class:`torch_hf.Hessian`) answer that question at the cost of as many
Hessian-vector products; :class:`torch_hf.HessianFree` runs them once when its steps stall,
and the RNN recipe's saddle analysis uses them on saved runs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

__all__ = ["LanczosExtremes", "lanczos_extremes"]


@dataclass
class LanczosExtremes:
    """The smallest and largest Ritz values of a symmetric operator and the unit Ritz
    vector of the smallest (``steps`` is how many Lanczos steps were taken)."""

    lowest: float
    highest: float
    lowest_vector: Tensor
    steps: int


def lanczos_extremes(mv: Callable[[Tensor], Tensor], n: int, steps: int = 20,
                     generator: torch.Generator | None = None, dtype: torch.dtype = torch.float64,
                     device: torch.device | str | None = None) -> LanczosExtremes:
    """Lanczos with full reorthogonalisation on the symmetric operator ``mv`` of size ``n``,
    from a random start (drawn from ``generator`` on the CPU, so that every process of a
    data-parallel group that passes an equally seeded generator starts from the same vector).

    After k steps the tridiagonal matrix Tₖ = QₖᵀAQₖ has eigenvalues (Ritz values) inside
    [λ_min(A), λ_max(A)], and its extreme ones converge to A's extremes first, so a few
    tens of steps estimate both ends of the spectrum of an operator with millions of rows.
    Stops early when the Krylov space is exhausted (an invariant subspace is found).
    """
    if n < 1:
        raise ValueError(f"lanczos_extremes: the operator has no rows (n = {n})")
    if steps < 1:
        raise ValueError(f"lanczos_extremes: steps must be >= 1, got {steps}")
    q = torch.randn(n, generator=generator, dtype=dtype).to(device)
    basis, alphas, betas = [q / q.norm()], [], []
    previous, beta = torch.zeros_like(q), 0.0
    for _ in range(min(steps, n)):
        w = mv(basis[-1]) - beta * previous
        alphas.append(float(w @ basis[-1]))
        for v in basis:  # full reorthogonalisation: a few tens of vectors, and no ghost eigenvalues
            w = w - (w @ v) * v
        beta = float(w.norm())
        if not beta > 1e-12 * max(abs(a) for a in alphas) or len(alphas) == min(steps, n):
            break
        betas.append(beta)
        previous = basis[-1]
        basis.append(w / beta)
    m = len(alphas)
    off = torch.tensor(betas[: m - 1], dtype=torch.float64)
    tri = torch.diag(torch.tensor(alphas, dtype=torch.float64)) + torch.diag(off, 1) + torch.diag(off, -1)
    ritz, vectors = torch.linalg.eigh(tri)
    lowest = torch.stack(basis[:m], 1) @ vectors[:, 0].to(dtype=dtype, device=q.device)
    return LanczosExtremes(float(ritz[0]), float(ritz[-1]), lowest / lowest.norm(), m)
