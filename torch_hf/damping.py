"""Damping of the quadratic model (§8): what CG minimises is M̂(δ) = M(δ) + ½ δᵀ(λD)δ.

A damping object has a tiny protocol used by :class:`torch_hf.HessianFree`:

* ``prepare(context)`` — once per step, before CG, with the step's
  :class:`DampingContext` (the curvature operator; scale-sensitive damping estimates
  its diagonal here);
* ``mv(v)`` — λ D v, added to every curvature product;
* ``diagonal()`` — diag(λD) when D is diagonal (the preconditioner adds it, §11.2), else ``None``;
* ``update(rho)`` — adapt λ from the reduction ratio ρ (§8.5);
* ``value`` — the current λ; ``state_dict()`` / ``load_state_dict()``.

Provided here: :class:`Tikhonov` (D = I, §8.1), :class:`ScaleSensitive` (diagonal D from
an estimate of diag(B), §8.3), and the Levenberg-Marquardt rule
:class:`LevenbergMarquardt` (§8.5) that both use to adapt λ. Structural damping
(§8.4) plugs into the same protocol: it adds a term to the *curvature operator*
(the hidden states as extra outputs) through ``curvature_kwargs``, and declares with
``needs_base_point`` that its model penalty reads the operator at θ₀.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from .distributed import shard_of

__all__ = ["LevenbergMarquardt", "Damping", "Tikhonov", "ScaleSensitive", "Structural", "DampingContext"]


class LevenbergMarquardt:
    """The Levenberg-Marquardt rule for λ (§8.5).

    ρ > ``high`` (3/4): λ ← λ·``decrease`` (2/3); ρ < ``low`` (1/4): λ ← λ·``increase`` (3/2);
    otherwise unchanged. A non-finite ρ counts as a failure (λ increases). The result is
    clipped to ``[min_value, max_value]``.
    """

    def __init__(self, decrease: float = 2 / 3, increase: float = 3 / 2, low: float = 0.25, high: float = 0.75,
                 min_value: float = 1e-12, max_value: float = 1e12) -> None:
        if not 0 < decrease < 1:
            raise ValueError(f"decrease must be in (0, 1), got {decrease}")
        if not increase > 1:
            raise ValueError(f"increase must be > 1, got {increase}")
        if not low <= high:
            raise ValueError(f"low must be <= high, got low={low}, high={high}")
        if not 0 <= min_value <= max_value:
            raise ValueError(f"need 0 <= min_value <= max_value, got {min_value}, {max_value}")
        self.decrease, self.increase, self.low, self.high = decrease, increase, low, high
        self.min_value, self.max_value = min_value, max_value

    def __call__(self, value: float, rho: float) -> float:
        if rho != rho or rho < self.low:  # NaN ρ: the trial failed
            value *= self.increase
        elif rho > self.high:
            value *= self.decrease
        return min(max(value, self.min_value), self.max_value)

    def __repr__(self) -> str:
        return (f"LevenbergMarquardt(decrease={self.decrease:.4g}, increase={self.increase:.4g}, "
                f"low={self.low}, high={self.high})")


@dataclass
class DampingContext:
    """What a damping object may look at when a step begins."""

    curvature: Any  # the step's curvature operator (GGN or Hessian)
    params: list[Tensor] | None = None  # not passed by the optimizer any more (no rule read it)
    # Averages a per-process estimate over the data-parallel group (identity when single-process).
    reduce: Callable[[Tensor], Tensor] = lambda t: t


_LM = "levenberg-marquardt"


class Damping:
    """Base class: λ with an adaptation rule and D = 0 (no damping term).

    Args:
        init: initial λ (a finite number >= 0).
        adapt: ``(λ, ρ) -> λ``; the Levenberg-Marquardt rule by default, ``None`` for a fixed λ.
    """

    # Whether model_penalty reads the curvature operator at θ₀ (structural damping's J_h δ):
    # the optimizer then writes θ₀ back into the parameters before asking for it. A subclass
    # that overrides model_penalty declares it by default.
    needs_base_point: bool = False

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if "model_penalty" in vars(cls) and "needs_base_point" not in vars(cls):
            cls.needs_base_point = True

    def __init__(self, init: float = 1.0, adapt: Callable[[float, float], float] | None | str = _LM) -> None:
        if not (isinstance(init, (int, float)) and init >= 0 and init == init and init != float("inf")):
            raise ValueError(f"damping init must be a finite number >= 0, got {init!r}")
        if adapt is not None and adapt != _LM and not callable(adapt):
            raise TypeError(f"adapt must be callable (lambda, rho) -> lambda, or None; got {adapt!r}")
        self.value = float(init)
        self.adapt = LevenbergMarquardt() if adapt == _LM else adapt

    def prepare(self, context: DampingContext) -> None:
        """Called once per step before CG."""

    def mv(self, v: Tensor) -> Tensor:
        """λ D v."""
        return torch.zeros_like(v)

    def diagonal(self) -> Tensor | float | None:
        """diag(λD) if D is diagonal (a tensor, or a float for λI), else ``None``."""
        return 0.0

    def augment_closure(self, closure: Callable) -> Callable:
        """Hook: may wrap the curvature closure (kept for rules written against 0.1.0; the
        ones here add curvature terms through :meth:`curvature_kwargs` instead)."""
        return closure

    def use_generator(self, generator: torch.Generator) -> None:
        """Lent the optimizer's random stream, for a rule that draws and has none of its own."""

    def curvature_kwargs(self) -> dict:
        """Extra keyword arguments for the curvature operator (structural damping adds
        its hidden-state term to the GGN here, so it costs no extra pass)."""
        return {}

    def model_penalty(self, delta: Tensor, curvature: Any) -> float:
        """½ δᵀ(λD)δ: the damping's part of the quadratic CG minimised, removed again
        when ρ compares f against the undamped model (§8.5)."""
        return 0.5 * float(torch.dot(delta, self.mv(delta)))

    def update(self, rho: float) -> None:
        """Adapt λ from the reduction ratio ρ (§8.5)."""
        if self.adapt is not None:
            self.value = self.adapt(self.value, rho)

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, state: dict) -> None:
        self.value = float(state["value"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(value={self.value:.4g}, adapt={self.adapt!r})"


class Tikhonov(Damping):
    """Tikhonov damping D = I (§8.1): the damped curvature is B + λI.

    Args:
        init: initial λ.
        adapt: adaptation rule, Levenberg-Marquardt by default; ``None`` fixes λ.
    """

    def mv(self, v: Tensor) -> Tensor:
        return v * self.value

    def diagonal(self) -> float:
        return self.value


class ScaleSensitive(Damping):
    """Scale-sensitive diagonal damping (§8.3): D = diag(d) + κ·mean(d)·I with d an
    estimate of diag(B) on the step's curvature batch.

    With κ = 0 this is the classical Levenberg-Marquardt choice D = diag(diag(B)),
    invariant to diagonal reparameterisations and to rescaling f; κ > 0 interpolates
    toward Tikhonov (a multiple of the identity), which §8.3 recommends since diag(B)
    can nearly vanish along directions the quadratic model does not trust.

    Args:
        init: initial λ.
        estimator: object with ``estimate(curvature) -> Tensor`` (e.g.
            :class:`torch_hf.preconditioners.GGNDiagonal`); GGNDiagonal by default.
        kappa: the identity share κ (relative to the mean of d).
        adapt: adaptation rule, Levenberg-Marquardt by default.
    """

    def __init__(self, init: float = 1.0, estimator: Any = None, kappa: float = 1e-2,
                 adapt: Callable[[float, float], float] | None | str = _LM) -> None:
        super().__init__(init, adapt)
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        if estimator is None:
            from .preconditioners import GGNDiagonal

            estimator = GGNDiagonal()
        if not hasattr(estimator, "estimate"):
            raise TypeError("estimator must have an estimate(curvature) method")
        self.estimator, self.kappa = estimator, kappa
        self.d: Tensor | None = None

    def use_generator(self, generator: torch.Generator) -> None:
        use = getattr(self.estimator, "use_generator", None)  # the estimator's probes draw from it
        if use is not None:
            use(generator)

    def prepare(self, context: DampingContext) -> None:
        from .preconditioners import DiagonalPreconditioner

        if isinstance(self.estimator, DiagonalPreconditioner):  # it draws its rank's share of the probes
            self.estimator.shard = shard_of(context.reduce)
        d = context.reduce(self.estimator.estimate(context.curvature)).clamp_min(0)
        self.d = d + self.kappa * d.mean()

    def _require(self) -> Tensor:
        if self.d is None:
            raise RuntimeError("ScaleSensitive damping used before prepare(): no diagonal estimate yet")
        return self.d

    def mv(self, v: Tensor) -> Tensor:
        return v * self._require() * self.value

    def diagonal(self) -> Tensor:
        return self._require() * self.value


class Structural(Tikhonov):
    r"""Structural damping (§8.4; Martens & Sutskever 2011) with Tikhonov damping.

    The damped quadratic adds to ½δᵀ(B + λI)δ the GGN of λμ·d(h(θ+δ); h(θ)), where h are
    the hidden states of an RNN, d a matching distance and μ a fixed ratio — so the
    structural strength λμ follows λ under the Levenberg-Marquardt rule, as in the paper.
    Its curvature, λμ·J_hᵀ D_h J_h, is added to the GGN *inside* each product (the hidden
    states join the outputs as extra coordinates the loss does not use), so it costs no
    second pass.

    The closure then returns ``(loss, outputs, hidden)``, ``hidden`` a tensor or tuple of
    tensors:

    * ``units="tanh"``: ``hidden`` are the states h; d = ½‖Δh‖², D_h = I;
    * ``units="logistic"``: ``hidden`` are the *pre-activations* a of logistic units
      h = σ(a); d is the cross-entropy between σ(a) and σ(a_k), whose GGN in a is
      D_h = diag(σ(a)(1 − σ(a))) (the matching loss of §6.2).

    d is summed over the state entries and divided by ``cases`` = ``hidden.shape[batch_dim]``
    (the loss is usually a mean over cases, so μ keeps its meaning across batch sizes).

    Args:
        init: initial λ.
        mu: μ, the structural-to-Tikhonov ratio (Martens & Sutskever 2011 used 1/30).
        units: ``"tanh"`` or ``"logistic"``.
        batch_dim: the dimension of ``hidden`` that indexes the cases.
        adapt: adaptation rule of λ, Levenberg-Marquardt by default.
    """

    def __init__(self, init: float = 1.0, mu: float = 1 / 30, units: str = "tanh", batch_dim: int = 0,
                 adapt: Callable[[float, float], float] | None | str = _LM) -> None:
        super().__init__(init, adapt)
        if not mu >= 0:
            raise ValueError(f"mu must be >= 0, got {mu}")
        if units not in ("tanh", "logistic"):
            raise ValueError(f"units must be 'tanh' or 'logistic', got {units!r}")
        self.mu, self.units, self.batch_dim = float(mu), units, batch_dim

    def curvature_kwargs(self) -> dict:
        return {"extra_hvp": self.hidden_hvp}

    def _weights(self, hidden: tuple[Tensor, ...]) -> list[Tensor | float]:
        out: list[Tensor | float] = []
        for h in hidden:
            scale = self.value * self.mu / h.shape[self.batch_dim]
            if self.units == "tanh":
                out.append(scale)
            else:
                p = torch.sigmoid(h.detach())
                out.append(p * (1 - p) * scale)
        return out

    def hidden_hvp(self, u: tuple[Tensor, ...], hidden: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """λμ D_h u for the hidden-state coordinates (the GGN calls it in every product)."""
        return tuple(x * w for x, w in zip(u, self._weights(hidden)))

    def prepare(self, context: DampingContext) -> None:
        if not getattr(context.curvature, "extras", ()):
            raise ValueError("Structural damping needs curvature='ggn' and a closure returning "
                             "(loss, outputs, hidden_states)")

    def model_penalty(self, delta: Tensor, curvature: Any) -> float:
        penalty = super().model_penalty(delta, curvature)
        jh = curvature.extras_jvp(delta)
        return penalty + 0.5 * sum(float((x * w * x).sum()) for x, w in zip(jh, self._weights(curvature.extras)))

    def state_dict(self) -> dict:
        return {"value": self.value, "mu": self.mu}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.mu = float(state.get("mu", self.mu))

    def __repr__(self) -> str:
        return f"Structural(value={self.value:.4g}, mu={self.mu:.4g}, units={self.units!r})"
