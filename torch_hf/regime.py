"""Is the objective deterministic (full batch) or stochastic (minibatches)? Measured, not
declared: at each step the closure's f(θ) is compared with the value the previous step
measured at the same θ (its accepted trial point, or θ₀ itself after a rejected step).
On a full-batch objective the two agree to rounding; a minibatch, a resampled batch or
dropout makes them differ, and one difference is enough to call the run stochastic for
good (a batch resampled every hundred steps is stochastic).

:class:`~torch_hf.HessianFree` reads :func:`deterministic` for its defaults:
``cg_stop="auto"`` runs CG to the paper's relative-progress rule on a deterministic
objective (a precise fit gains from each accurate step) and to the rate rule otherwise
(more, cheaper updates against the noise), and ``solver="auto"`` may solve a small model's
system exactly (:mod:`torch_hf.dense`).
"""
from __future__ import annotations

import math

__all__ = ["CONFIRMATIONS", "observe", "remember", "deterministic", "describe"]

# Repeats of f at the same θ before the objective is called deterministic: one is enough
# (on minibatches f repeating to rounding at a new θ is as good as impossible), so only the
# first step is taken before the regime is known.
CONFIRMATIONS = 1


def observe(state: dict, f: float, resolution: float) -> None:
    """Compare this step's f(θ) with the previous step's value at the same θ."""
    previous = state.pop("f_next", None)
    if previous is None or state.get("stochastic", False):
        return
    if abs(f - previous) <= 4 * resolution + 1e-300:
        state["repeats"] = state.get("repeats", 0) + 1
    else:
        state["stochastic"] = True


def remember(state: dict, f_next: float | None) -> None:
    """What f should be at the parameters the step leaves (``None``: not known, e.g. with
    lr < 1 the step is not the evaluated trial point)."""
    if f_next is not None and math.isfinite(f_next):
        state["f_next"] = f_next


def deterministic(state: dict) -> bool:
    return not state.get("stochastic", False) and state.get("repeats", 0) >= CONFIRMATIONS


def describe(state: dict) -> str:
    """``"deterministic"``, ``"stochastic"`` or ``"unknown"`` (not yet confirmed)."""
    if state.get("stochastic", False):
        return "stochastic"
    return "deterministic" if deterministic(state) else "unknown"
