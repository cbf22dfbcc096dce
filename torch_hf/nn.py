"""Memory tools for HF (§7.1): CPU offload of the activations cached for CG.

HF keeps the activations of one forward pass alive for every product of a CG run
(§7.1). On a GPU they can dominate memory; :class:`OffloadActivations` moves each
tensor autograd saves to host memory when it is saved and back to the device each time
a product needs it — the trade the paper describes of storing activations "in the
slower CPU memory and moving them to the GPU as needed".
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["OffloadActivations"]


class OffloadActivations(torch.autograd.graph.saved_tensors_hooks):
    """Context manager: tensors saved for backward inside it live in host memory.

    ``with OffloadActivations(): op = torch_hf.GGN(params, closure)`` builds the
    curvature operator with its cached activations on the CPU; every product copies
    the ones it needs back to their device (asynchronously from pinned memory). Tensors
    already on the CPU are kept as they are, so on a CPU-only machine this is a no-op
    apart from the bookkeeping. ``HessianFree(..., offload_activations=True)`` does
    this for you.

    Attributes:
        packed: tensors seen when saved; ``offloaded``: how many of them were moved;
        ``bytes_offloaded``: their size; ``unpacked``: how many times a saved tensor
        was read back (once per use in every backward or product).
    """

    def __init__(self, pin_memory: bool = True) -> None:
        self.pin_memory = pin_memory and torch.cuda.is_available()
        self.packed = self.offloaded = self.bytes_offloaded = self.unpacked = 0
        super().__init__(self._pack, self._unpack)

    def _pack(self, t: Tensor):
        self.packed += 1
        if t.device.type == "cpu":
            return (None, t)
        host = torch.empty(t.size(), dtype=t.dtype, layout=t.layout, pin_memory=self.pin_memory)
        host.copy_(t, non_blocking=self.pin_memory)
        self.offloaded += 1
        self.bytes_offloaded += t.numel() * t.element_size()
        return (t.device, host)

    def _unpack(self, packed) -> Tensor:
        self.unpacked += 1
        device, t = packed
        return t if device is None else t.to(device, non_blocking=self.pin_memory)
