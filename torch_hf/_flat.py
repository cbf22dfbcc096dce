"""Flat-vector helpers: the layout of :func:`torch.nn.utils.parameters_to_vector`."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import Tensor


def flatten(tensors: Sequence[Tensor | None], like: Sequence[Tensor]) -> Tensor:
    """Concatenate ``tensors`` into one flat vector; ``None`` entries become zeros shaped as ``like``."""
    parts = []
    for t, p in zip(tensors, like):
        if t is not None and t.layout != torch.strided:
            raise TypeError(f"sparse gradients are not supported by torch_hf (got layout {t.layout})")
        parts.append(torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1))
    if not parts:
        raise ValueError("no parameters to flatten")
    return torch.cat(parts)


def unflatten(vector: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """Views of ``vector`` shaped as the tensors in ``like`` (no copy)."""
    out, offset = [], 0
    for p in like:
        n = p.numel()
        out.append(vector[offset : offset + n].view_as(p))
        offset += n
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} entries but the parameters have {offset}")
    return out


def numel(params: Iterable[Tensor]) -> int:
    return sum(p.numel() for p in params)
