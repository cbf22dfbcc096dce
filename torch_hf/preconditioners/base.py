"""The preconditioner protocol, the identity, and what the estimators share."""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ..curvature import GGN

__all__ = ["Preconditioner", "Identity", "GeneratorOwner", "moving_average_", "damped_power"]


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

    def use_generator(self, generator: torch.Generator) -> None:
        """Lent the optimizer's random stream (a preconditioner that draws random probes
        takes it when it was given none of its own; the optimizer then saves it once)."""


class Identity(Preconditioner):
    """No preconditioning, P = I."""

    def __repr__(self) -> str:
        return "Identity()"


def _require_ggn(curvature, who: str) -> GGN:
    if not isinstance(curvature, GGN):
        raise TypeError(f"{who} needs the network outputs: use it with curvature='ggn' (got {type(curvature).__name__})")
    return curvature


def _rademacher_like(like: Tensor, gen: torch.Generator | None) -> Tensor:
    """±1 entries shaped like ``like``, from ``gen`` (a CPU generator) or, with ``None``,
    from the global stream of ``like``'s device. Off the CPU the entries are drawn on the
    device, from a generator seeded by one draw of ``gen`` (so the same on every process
    of a group): drawing a 1250 × 784 probe on the host and copying it took 12 of the
    58 ms of an HF step on an H200 (benchmarks/step_phases.py)."""
    if gen is None or like.device.type == "cpu":
        bits = torch.randint(0, 2, like.shape, generator=gen, device=like.device)
    else:
        seed = int(torch.randint(0, 2**62, (), generator=gen))
        device_gen = torch.Generator(device=like.device).manual_seed(seed)
        bits = torch.randint(0, 2, like.shape, generator=device_gen, device=like.device)
    return bits.to(dtype=like.dtype) * 2 - 1


def _per_case_probes(like: Tensor, gen: torch.Generator | None, shard: tuple[int, int] | None) -> Tensor:
    """Rademacher probes for the cases of ``like`` (an output, batch first). Under data
    parallelism (``shard`` = (rank, world size)) the probes of all the group's cases are
    drawn and this rank's share kept: the group then draws exactly what one process would
    on the whole batch, given the same stream."""
    if shard is None:
        return _rademacher_like(like, gen)
    rank, world = shard
    return _rademacher_like(like.expand(world, *like.shape), gen)[rank]




def moving_average_(average: Tensor, new: Tensor, decay: float) -> Tensor:
    """average ← decay·average + (1 − decay)·new, in place (bias-corrected by the caller
    with 1 − decay^updates)."""
    return average.mul_(decay).add_(new, alpha=1 - decay)


def damped_power(base: Tensor, exponent: float) -> Tensor:
    """base^ξ, with base floored at √tiny: an all-zero row (an unused parameter, no
    damping) would make P singular."""
    return base.clamp_min(torch.finfo(base.dtype).tiny ** 0.5).pow(exponent)


class GeneratorOwner:
    """A random estimator's stream: its own (given at construction, saved in its state) or
    the optimizer's (lent by :meth:`use_generator`, saved by the optimizer)."""

    generator: torch.Generator | None
    _lent = False

    def use_generator(self, generator: torch.Generator) -> None:
        if self.generator is None:
            self.generator, self._lent = generator, True

    def _save_generator(self, state: dict) -> dict:
        if self.generator is not None and not self._lent:
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the parameters' dtype.
            state["generator"] = self.generator.get_state().tolist()
        return state

    def _load_generator(self, state: dict) -> None:
        if self.generator is not None and "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
