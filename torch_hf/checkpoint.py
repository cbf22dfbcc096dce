"""What :meth:`HessianFree.state_dict` adds to torch.optim's, and reading checkpoints
written before it had a version (torch_hf 0.1.0 kept the same entries inside the first
parameter's state and every setting in every parameter group)."""
from __future__ import annotations

from typing import Any

import torch

from .config import GROUP_KEYS

__all__ = ["STATE_VERSION", "own_state", "split_state_dict", "load_own_state"]

# The version of what state_dict() writes; 1 (and no key) is torch_hf 0.1.0's layout.
STATE_VERSION = 2
_OWN = ("damping", "preconditioner", "generator", "last_trial_evaluations")


def own_state(damping: Any, preconditioner: Any, generator: torch.Generator, last_trial_evaluations: int) -> dict:
    """The optimizer's own entries: the version, λ and its rule's state, the
    preconditioner's state, the random stream and the expected trial count."""
    return {"version": STATE_VERSION, "damping": damping.state_dict(), "preconditioner": preconditioner.state_dict(),
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the parameters' dtype.
            "generator": generator.get_state().tolist(),
            # cg_stop="rate" counts the next step's trial objectives from the last step's
            "last_trial_evaluations": last_trial_evaluations}


def split_state_dict(state_dict: dict) -> tuple[dict, dict | None]:
    """torch.optim's part (the groups cut to the keys a group may hold) and the own part
    (``None`` for a 0.1.0 checkpoint, whose entries are then read from the first
    parameter's state by :func:`load_own_state`)."""
    state_dict = dict(state_dict)
    own = state_dict.pop("hessian_free", None)
    state_dict["param_groups"] = [{k: v for k, v in g.items() if k == "params" or k in GROUP_KEYS}
                                  for g in state_dict["param_groups"]]
    return state_dict, own


def load_own_state(opt: Any, own: dict | None, first_state: dict) -> None:
    """Restore λ, the preconditioner, the random stream and the trial count of ``opt``."""
    if own is None:  # 0.1.0: the same entries, kept in the first parameter's state
        own = {k: first_state.pop(k) for k in _OWN if k in first_state}
    if "damping" in own:
        opt.damping.load_state_dict(own["damping"])
    if "preconditioner" in own:
        opt.preconditioner.load_state_dict(own["preconditioner"])
    if "generator" in own:
        opt.generator.set_state(torch.tensor(own["generator"], dtype=torch.uint8))
    if "last_trial_evaluations" in own:
        opt._last_trial_evaluations = int(own["last_trial_evaluations"])
