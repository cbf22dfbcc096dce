"""Data-parallel HF over ``torch.distributed`` (§7.1, §12).

Each of N processes evaluates the closure on its own shard of the batch. Every
quantity HF uses is an *average over the batch*, so averaging the per-process values
gives exactly the whole-batch value when the shards have equal size and each closure
returns the *mean* loss over its shard:

* f and ∇f (the gradient batch), the objective at trial points (ρ, CG-backtracking,
  line search);
* the curvature product B v (curvature batch), one all-reduce per CG iteration;
* the diagonal estimates of the preconditioner and of scale-sensitive damping.

CG itself runs redundantly on every process: its inputs (b, and every B v) are
identical after the all-reduce, so every process computes the same iterates and takes
the same termination decisions with no extra communication. Parameters must start
equal; :class:`Reducer` broadcasts them from rank 0 on the first step.

Shards of unequal size make the average a weighted one (each shard counts equally);
give every process the same number of cases for the exact whole-batch step.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["Reducer", "resolve_process_group", "shard_of"]


def resolve_process_group(process_group: Any) -> Any | None:
    """The group the optimizer reduces over, or ``None`` for single-process HF.

    ``None`` (the default of :class:`torch_hf.HessianFree`) means the default group when
    ``torch.distributed`` is initialised with more than one process; ``False`` forces
    single-process behaviour; anything else is used as a process group.
    """
    if process_group is False:
        return None
    import torch.distributed as dist

    if not dist.is_available():
        if process_group is not None:
            raise RuntimeError("process_group given but torch.distributed is not available in this build")
        return None
    if process_group is None:
        if not dist.is_initialized() or dist.get_world_size() <= 1:
            return None
        return dist.group.WORLD
    if not dist.is_initialized():
        raise RuntimeError("process_group given but torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    return process_group


def shard_of(reduce: Any) -> tuple[int, int] | None:
    """``(rank, world_size)`` when ``reduce`` (the ``reduce`` argument a preconditioner or
    damping estimator is given) is a :class:`Reducer`, else ``None``: a random estimator
    draws the probes of the whole batch and keeps its rank's share, so that N processes on
    equal, batch-first shards draw exactly the probes one process draws on the whole batch."""
    return (reduce.rank, reduce.world_size) if isinstance(reduce, Reducer) else None


class Reducer:
    """Averages tensors and floats over a process group (all-reduce SUM / world size).
    Calling it is :meth:`mean`: it is what preconditioners get as ``reduce``."""

    def __init__(self, group: Any) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def mean_(self, t: Tensor) -> Tensor:
        """In-place average of ``t`` over the group; returns ``t``."""
        self._dist.all_reduce(t, op=self._dist.ReduceOp.SUM, group=self.group)
        return t.div_(self.world_size)

    def mean(self, t: Tensor) -> Tensor:
        """Average of ``t`` over the group in a new tensor (``t`` is left as it is)."""
        return self.mean_(t.detach().clone())

    __call__ = mean

    def mean_float(self, value: float, like: Tensor) -> float:
        """Average of a Python float (one all-reduce of a 1-element tensor on ``like``'s device)."""
        t = torch.tensor([value], dtype=torch.float64, device=like.device)
        return float(self.mean_(t))

    @torch.no_grad()
    def broadcast_parameters(self, params: list[Tensor], src: int = 0) -> None:
        """Make every process's parameters equal to those of rank ``src`` (global rank)."""
        for p in params:
            self._dist.broadcast(p.data, src=src, group=self.group)

    def broadcast_generator(self, generator: torch.Generator, like: Tensor, src: int = 0) -> None:
        """Give every process rank ``src``'s random stream (through ``like``'s device, which
        NCCL needs): the random probes of the estimators then agree across the group."""
        state = generator.get_state().to(like.device)
        self._dist.broadcast(state, src=src, group=self.group)
        generator.set_state(state.cpu())
