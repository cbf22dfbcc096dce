"""The settings of the whole optimizer, validated once: HF solves one joint quadratic per
step, so CG and the line search have one configuration, not one per parameter group
(``param_groups`` hold only what may differ: ``weight_decay``, and ``lr``, which the
schedulers of :mod:`torch.optim.lr_scheduler` write, the same in every group).

Each error names the :class:`~torch_hf.HessianFree` argument it is about.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["CGConfig", "LineSearchConfig", "GROUP_KEYS", "check_options", "check_parts"]

# What a parameter group may hold besides its parameters.
GROUP_KEYS = ("lr", "weight_decay")


def _int_at_least(name: str, value, low: int, extra: str = "") -> None:
    if not (isinstance(value, int) and not isinstance(value, bool) and value >= low):
        raise ValueError(f"Invalid {name}: {value} (must be an int >= {low}{extra})")


@dataclass(frozen=True)
class CGConfig:
    """Truncated preconditioned CG (Alg. 2; §4, §8.6–8.7, §10): ``cg_*`` arguments of
    :class:`~torch_hf.HessianFree`, with ``backtracking_factor`` and ``trust_radius``."""

    max_iters: int = 250
    min_iters: int = 1
    tol: float = 5e-4
    stop: str = "auto"
    decay: float = 0.95
    backtracking_factor: float | None = 1.3
    trust_radius: float | None = None
    check_every: int | None = None

    def __post_init__(self) -> None:
        _int_at_least("cg_max_iters", self.max_iters, 1)
        if not (isinstance(self.min_iters, int) and 0 <= self.min_iters <= self.max_iters):
            raise ValueError(f"Invalid cg_min_iters: {self.min_iters} (must be an int in [0, cg_max_iters])")
        if not self.tol >= 0:
            raise ValueError(f"Invalid cg_tol: {self.tol} (must be >= 0)")
        if self.stop not in ("auto", "progress", "rate"):
            raise ValueError(f"Invalid cg_stop: {self.stop!r} (must be 'auto', 'progress' or 'rate')")
        if not 0 <= self.decay <= 1:
            raise ValueError(f"Invalid cg_decay: {self.decay} (must be in [0, 1])")
        if self.backtracking_factor is not None and not self.backtracking_factor > 1:
            raise ValueError(f"Invalid backtracking_factor: {self.backtracking_factor} (must be > 1, or None)")
        if self.trust_radius is not None and not self.trust_radius > 0:
            raise ValueError(f"Invalid trust_radius: {self.trust_radius} (must be > 0, or None)")
        if self.check_every is not None:
            _int_at_least("cg_check_every", self.check_every, 1, ", or None")


@dataclass(frozen=True)
class LineSearchConfig:
    """The Armijo backtracking line search of §8.8: ``line_search_*`` arguments;
    ``c=None`` turns it off."""

    c: float | None = 1e-2
    beta: float = 0.8
    max_evals: int = 20

    def __post_init__(self) -> None:
        if self.c is not None and not 0 < self.c < 1:
            raise ValueError(f"Invalid line_search_c: {self.c} (must be in (0, 1), or None)")
        if not 0 < self.beta < 1:
            raise ValueError(f"Invalid line_search_beta: {self.beta} (must be in (0, 1))")
        _int_at_least("line_search_max_evals", self.max_evals, 1)


def check_options(lr, weight_decay, recompute, curvature, autocast_dtype, generator, history_size,
                   curvature_batch, solver="auto", dense_max_params=4096) -> None:
    """The constructor's checks of what is not a part or a config object (each error names its argument)."""
    if solver not in ("auto", "cg", "dense"):
        raise ValueError(f"Invalid solver: {solver!r} (must be 'auto', 'cg' or 'dense')")
    if not (isinstance(dense_max_params, int) and not isinstance(dense_max_params, bool) and dense_max_params >= 0):
        raise ValueError(f"Invalid dense_max_params: {dense_max_params} (must be an int >= 0)")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"Invalid lr: {lr} (must be > 0)")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
    if recompute and curvature != "ggn":
        raise ValueError("recompute=True needs curvature='ggn'")
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(f"autocast_dtype must be a torch.dtype or None, got {autocast_dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if history_size is not None and not (isinstance(history_size, int) and history_size >= 0):
        raise ValueError(f"Invalid history_size: {history_size} (must be an int >= 0, or None)")
    if curvature_batch is not None and not (isinstance(curvature_batch, int) and curvature_batch >= 1):
        raise ValueError(f"Invalid curvature_batch: {curvature_batch} (must be an int >= 1, or None)")


def check_parts(damping: Any, preconditioner: Any) -> None:
    from .damping import Damping

    if not isinstance(damping, Damping):
        raise TypeError(f"damping must be a torch_hf.damping.Damping, got {type(damping).__name__}")
    for name in ("update", "solve", "diagonal"):
        if not callable(getattr(preconditioner, name, None)):
            raise TypeError(f"preconditioner must have a {name}() method (see torch_hf.preconditioners)")
