"""Diagonal preconditioners for CG (§11).

Every preconditioner here is diagonal, P = (d + λD + κ)^ξ (§11.2), where d estimates
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
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .curvature import GGN, Hessian

__all__ = ["Preconditioner", "Identity", "DiagonalPreconditioner", "EmpiricalFisherDiagonal", "GGNDiagonal"]


class Preconditioner:
    """Base protocol; see the module docstring."""

    def update(self, curvature, damping_diagonal: Tensor | float | None = 0.0, weight_decay: float = 0.0,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Recompute P for this step's curvature operator. ``reduce`` averages a
        per-process estimate over the data-parallel group (see :mod:`torch_hf.distributed`)."""

    def solve(self, r: Tensor) -> Tensor:
        """P⁻¹ r."""
        return r

    def diagonal(self) -> Tensor | None:
        """diag(P), or ``None`` when P = I."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Identity(Preconditioner):
    """No preconditioning, P = I."""

    def __repr__(self) -> str:
        return "Identity()"


class DiagonalPreconditioner(Preconditioner):
    """P = (d + λD + κ)^ξ from an estimate ``d`` of diag(B) (§11.2).

    Args:
        exponent: ξ in (0, 1] (§13: 0.75).
        kappa: κ ≥ 0, added before the power.
        decay: β in [0, 1): d is the exponential moving average of the per-step
            estimates, d_k = β d_{k−1} + (1 − β) d̂_k (bias-corrected as in Adam), so a
            noisy one-sample estimate on a small curvature batch is averaged over steps;
            0 (default) uses each step's estimate alone, as the paper does.
    """

    def __init__(self, exponent: float = 0.75, kappa: float = 0.0, decay: float = 0.0) -> None:
        if not 0 < exponent <= 1:
            raise ValueError(f"exponent must be in (0, 1], got {exponent}")
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.exponent, self.kappa, self.decay = exponent, kappa, decay
        self._inverse: Tensor | None = None
        self._diag: Tensor | None = None
        self._average: Tensor | None = None
        self._updates = 0
        self.last_estimate: Tensor | None = None

    def estimate(self, curvature) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, curvature, damping_diagonal: Tensor | float | None = 0.0, weight_decay: float = 0.0,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        d = self.estimate(curvature)
        if reduce is not None:
            d = reduce(d)
        d = d.clamp_min(0)
        if self.decay > 0:
            if self._average is None or self._average.shape != d.shape:
                self._average, self._updates = torch.zeros_like(d), 0
            self._updates += 1
            self._average.mul_(self.decay).add_(d, alpha=1 - self.decay)
            d = self._average / (1 - self.decay**self._updates)
        self.last_estimate = d
        extra = damping_diagonal if damping_diagonal is not None else 0.0
        base = d + weight_decay + extra + self.kappa
        # An all-zero row (unused parameter, no damping) would make P singular.
        floor = torch.finfo(base.dtype).tiny ** 0.5
        p = base.clamp_min(floor).pow(self.exponent)
        self._diag = p
        self._inverse = p.reciprocal()

    def solve(self, r: Tensor) -> Tensor:
        if self._inverse is None:
            raise RuntimeError(f"{type(self).__name__}.solve called before update()")
        return r * self._inverse

    def diagonal(self) -> Tensor | None:
        return self._diag

    def state_dict(self) -> dict:
        if self._average is None:
            return {}
        return {"average": self._average.clone(), "updates": self._updates}

    def load_state_dict(self, state: dict) -> None:
        if "average" in state:
            self._average, self._updates = state["average"].clone(), int(state["updates"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exponent={self.exponent}, kappa={self.kappa}, decay={self.decay})"


def _require_ggn(curvature, who: str) -> GGN:
    if not isinstance(curvature, GGN):
        raise TypeError(f"{who} needs the network outputs: use it with curvature='ggn' (got {type(curvature).__name__})")
    return curvature


class EmpiricalFisherDiagonal(DiagonalPreconditioner):
    """diag of the empirical Fisher, d = (1/N) Σ_i sq(∇ℓ_i) (§11.3), with f = (1/N) Σ_i ℓ_i.

    The per-case gradients of linear layers are squared and summed inside one backward
    pass (Algorithm 6). Parameters that are not in such a layer (convolutions, weights
    shared across time steps) would need per-case storage; for them this raises
    ``NotImplementedError`` unless ``allow_batch_fallback=True``, which uses
    N·sq(∇f) instead (a biased stand-in). Prefer :class:`GGNDiagonal` there: its fallback
    stays unbiased.
    """

    def __init__(self, exponent: float = 0.75, kappa: float = 0.0, allow_batch_fallback: bool = False,
                 decay: float = 0.0) -> None:
        super().__init__(exponent, kappa, decay)
        self.allow_batch_fallback = allow_batch_fallback

    def estimate(self, curvature) -> Tensor:
        ggn = _require_ggn(curvature, "EmpiricalFisherDiagonal")
        n_cases = ggn.outputs[0].shape[0]
        d, per_case = ggn.squared_vjp(ggn._grad_z)
        if not bool(per_case.all()) and not self.allow_batch_fallback:
            raise NotImplementedError(
                f"EmpiricalFisherDiagonal computes per-case squared gradients only for linear layers applied once "
                f"to a (cases x features) input; {int((~per_case).sum())} parameter entries are elsewhere. "
                "Use GGNDiagonal, or allow_batch_fallback=True"
            )
        return d * n_cases


class GGNDiagonal(DiagonalPreconditioner):
    """Unbiased estimate of diag(G) (§11.4): mean over ``samples`` of sq(Jᵀ S v) with
    Rademacher v (lower variance than Gaussian, Martens et al. 2012) and S Sᵀ = L''.

    The squares are taken per case for linear layers (Algorithm 6's structure), over
    the whole batch elsewhere (still unbiased, noisier). Without a closed-form S (a
    loss other than the matching losses) or with ``curvature='hessian'`` it uses
    Hutchinson's estimator v ⊙ (B v), also unbiased, clamped at zero.

    Args:
        exponent: ξ (§13: 0.75).
        kappa: κ.
        samples: number of random vectors averaged.
        generator: optional ``torch.Generator`` for reproducible samples.
        decay: moving average of the estimates over steps (see :class:`DiagonalPreconditioner`).
    """

    def __init__(self, exponent: float = 0.75, kappa: float = 0.0, samples: int = 1,
                 generator: torch.Generator | None = None, decay: float = 0.0) -> None:
        super().__init__(exponent, kappa, decay)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples, self.generator = samples, generator

    def _rademacher(self, like: Tensor) -> Tensor:
        gen = self.generator
        bits = torch.randint(0, 2, like.shape, generator=gen, device="cpu" if gen is not None else like.device)
        return (bits.to(device=like.device, dtype=like.dtype) * 2 - 1)

    def estimate(self, curvature) -> Tensor:
        total = None
        for _ in range(self.samples):
            if isinstance(curvature, GGN) and curvature.matching_loss is not None:
                v = tuple(self._rademacher(o) for o in curvature.outputs)
                d, _ = curvature.squared_vjp(curvature.loss_sqrt_hvp(v))
            elif isinstance(curvature, (GGN, Hessian)):
                v = self._rademacher(curvature.grad)
                d = v * curvature.mv(v)  # Hutchinson; clamped after averaging
            else:
                raise TypeError(f"GGNDiagonal cannot estimate the diagonal of {type(curvature).__name__}")
            total = d if total is None else total + d
        return total / self.samples

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the parameters' dtype.
            state["generator"] = self.generator.get_state().tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.generator is not None and "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
