"""Diagonal preconditioners P = (d + λD + κ)^ξ (§11.2) with the estimators of §11.3–11.4."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from ..curvature import GGN, Hessian
from ..distributed import shard_of
from .base import GeneratorOwner, Preconditioner, _per_case_probes, _rademacher_like, _require_ggn, damped_power, \
    moving_average_

__all__ = ["DiagonalPreconditioner", "EmpiricalFisherDiagonal", "GGNDiagonal"]

logger = logging.getLogger("torch_hf")


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
        # (rank, world size) under data parallelism, set from ``reduce`` by each update: a
        # random estimator draws the whole batch's per-case probes and keeps its share.
        self.shard: tuple[int, int] | None = None

    def estimate(self, curvature) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, curvature, damping_diagonal: Tensor | float | None = 0.0, weight_decay: float = 0.0,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.shard = shard_of(reduce)
        d = self.estimate(curvature)
        if reduce is not None:
            d = reduce(d)
        d = d.clamp_min(0)
        if self.decay > 0:
            if self._average is None or self._average.shape != d.shape:
                self._average, self._updates = torch.zeros_like(d), 0
            self._updates += 1
            d = moving_average_(self._average, d, self.decay) / (1 - self.decay**self._updates)
        self.last_estimate = d
        extra = damping_diagonal if damping_diagonal is not None else 0.0
        p = damped_power(d + weight_decay + extra + self.kappa, self.exponent)
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
        d, per_case = ggn.squared_vjp(ggn.output_grads)
        if not bool(per_case.all()) and not self.allow_batch_fallback:
            raise NotImplementedError(
                f"EmpiricalFisherDiagonal computes per-case squared gradients only for linear layers applied once "
                f"to a (cases x features) input; {int((~per_case).sum())} parameter entries are elsewhere. "
                "Use GGNDiagonal, or allow_batch_fallback=True"
            )
        return d * n_cases


class GGNDiagonal(GeneratorOwner, DiagonalPreconditioner):
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

    def estimate(self, curvature) -> Tensor:
        total = None
        for _ in range(self.samples):
            if isinstance(curvature, GGN) and curvature.matching_loss is not None:
                v = tuple(_per_case_probes(o, self.generator, self.shard) for o in curvature.outputs)
                d, _ = curvature.squared_vjp(curvature.loss_sqrt_hvp(v))
            elif isinstance(curvature, (GGN, Hessian)):
                v = _rademacher_like(curvature.grad, self.generator)  # in parameter space: one draw for the group
                d = v * curvature.mv(v)  # Hutchinson; clamped after averaging
            else:
                raise TypeError(f"GGNDiagonal cannot estimate the diagonal of {type(curvature).__name__}")
            total = d if total is None else total + d
        return total / self.samples

    def state_dict(self) -> dict:
        return self._save_generator(super().state_dict())

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self._load_generator(state)
