"""Preconditioners for CG (§11).

The diagonal ones are P = (d + λD + κ)^ξ (§11.2), where d estimates
diag(B) of the curvature batch (including weight decay), λD is the damping's diagonal
(added exactly, §11.2: "d should approximate diag(B̂), not diag(B)"), κ ≥ 0 pulls P
toward a multiple of the identity, and ξ ∈ (0, 1] (0.75 in §13) makes it gentler.

Protocol used by :class:`torch_hf.HessianFree`:

* ``update(curvature, damping_diagonal, weight_decay, reduce=None)`` — once per step
  (``reduce`` is given only under data parallelism);
* ``solve(r)`` — P⁻¹ r (Algorithm 2's "solution of P y = r");
* ``diagonal()`` — diag(P), or ``None`` for the identity (the trust-region norm);
* ``estimate(curvature)`` — the raw estimate d (shared with scale-sensitive damping).

Estimators:

* :class:`EmpiricalFisherDiagonal` (§11.3): d = (1/N) Σ_i sq(∇ℓ_i) over the N cases,
  the per-case gradients summed in squares without storing them (Algorithm 6) for
  linear layers.
* :class:`GGNDiagonal` (§11.4, Chapelle & Erhan): unbiased d = mean over samples of
  sq(Jᵀ S v) with Rademacher v and S Sᵀ = L'', per case for linear layers.

Beyond §11's diagonals, :class:`KFAC` preconditions each linear layer with a
Kronecker-factored approximation of its GGN block (Martens & Grosse 2015).
"""
from .base import Identity, Preconditioner
from .diagonal import DiagonalPreconditioner, EmpiricalFisherDiagonal, GGNDiagonal
from .kfac import KFAC

__all__ = ["Preconditioner", "Identity", "DiagonalPreconditioner", "EmpiricalFisherDiagonal", "GGNDiagonal", "KFAC"]
