"""What a step did, as data: :attr:`HessianFree.last_step` and :attr:`HessianFree.history`."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

__all__ = ["StepDiagnostics", "record"]

logger = logging.getLogger("torch_hf")


@dataclass
class StepDiagnostics:
    """What one HF step did (``opt.last_step``).

    ``rho_informative`` is ``False`` when the step changed the loss, and the model predicted
    a change, below the loss's float resolution (ρ is rounding noise then, and λ is left
    alone). After ``3`` such steps in a row the optimizer looks at the exact Hessian once
    (:mod:`torch_hf.lanczos`) and ``stall`` says what it found: ``"converged"`` (no negative
    curvature: a minimum, reached to the loss's resolution; ``converged`` is then ``True``),
    ``"saddle"`` (a negative eigenvalue the Gauss-Newton matrix does not see), ``"plateau"``
    (curvature too small for any step to change the loss resolvably) or ``"unknown"`` (the
    Hessian could not be evaluated). Only the last three warn.

    ``regime`` is what :mod:`torch_hf.regime` has measured of the objective before this
    step (``"deterministic"``, ``"stochastic"`` or ``"unknown"``), ``cg_stop`` the CG rule
    the step used, and ``solver`` ``"cg"`` or ``"dense"`` (:mod:`torch_hf.dense`).
    """

    step: int = 0
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    rho: float = float("nan")
    damping: float = float("nan")
    damping_next: float = float("nan")
    cg_iterations: int = 0
    cg_stop_reason: str = ""
    cg_stop: str = ""
    solver: str = "cg"
    regime: str = "unknown"
    chosen_iteration: int = 0
    line_search_alpha: float = float("nan")
    predicted_reduction: float = float("nan")
    rho_informative: bool = True
    converged: bool = False
    stall: str = ""
    directional_derivative: float = float("nan")
    curvature_products: int = 0
    objective_evaluations: int = 0
    backtracking_evaluations: int = 0
    line_search_evaluations: int = 0
    grad_norm: float = float("nan")
    step_norm: float = 0.0
    accepted: bool = False
    wall_time_s: float = 0.0
    times: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


def record(history: list[StepDiagnostics], diag: StepDiagnostics, size: int | None) -> None:
    """Append ``diag`` to ``history``, keeping the latest ``size`` (``None``: all, 0: none),
    and log it at debug level."""
    if size != 0:
        history.append(diag)
        if size is not None and len(history) > size:
            del history[: len(history) - size]
    logger.debug("torch_hf step %d: loss %.6g -> %.6g, rho %.3g, lambda %.3g, cg %d (%s), alpha %.3g",
                 diag.step, diag.loss_before, diag.loss_after, diag.rho, diag.damping, diag.cg_iterations,
                 diag.cg_stop_reason, diag.line_search_alpha)
