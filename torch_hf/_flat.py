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


def unflatten_columns(V: Tensor, like: Sequence[Tensor]) -> list[Tensor]:
    """The columns of a (numel × k) matrix as k-batched tensors shaped ``(k, *p.shape)``."""
    k, out, offset = V.shape[1], [], 0
    for p in like:
        n = p.numel()
        out.append(V[offset:offset + n].t().reshape(k, *p.shape))
        offset += n
    if offset != V.shape[0]:
        raise ValueError(f"V has {V.shape[0]} rows but the parameters have {offset} entries")
    return out


def flatten_columns(tensors: Sequence[Tensor | None], like: Sequence[Tensor], k: int) -> Tensor:
    """Inverse of :func:`unflatten_columns`: k-batched tensors (``None``: zeros) as a (numel × k) matrix."""
    parts = [torch.zeros(k, p.numel(), dtype=p.dtype, device=p.device) if t is None else t.reshape(k, -1)
             for t, p in zip(tensors, like)]
    return torch.cat(parts, dim=1).t()


def numel(params: Iterable[Tensor]) -> int:
    return sum(p.numel() for p in params)
