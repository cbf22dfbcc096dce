"""Memory tools for HF (§7.1): CPU offload of the activations cached for CG.

HF keeps the activations of one forward pass alive for every product of a CG run
(§7.1). On a GPU they can dominate memory; :class:`OffloadActivations` moves each
tensor autograd saves to host memory when it is saved and back to the device each time
a product needs it — the trade the paper describes of storing activations "in the
slower CPU memory and moving them to the GPU as needed".
"""
from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import Tensor

__all__ = ["OffloadActivations", "unroll", "sparse_init_"]


def sparse_init_(module: torch.nn.Module, nonzero: int = 15, scale: float = 1.0,
                 generator: torch.Generator | None = None) -> torch.nn.Module:
    """Sparse initialization of Martens (2010, §5), which HF's results rest on: every unit
    of every ``nn.Linear`` in ``module`` (or ``module`` itself) gets ``nonzero`` incoming
    weights drawn from N(0, scale²) at random positions; all its other weights and its bias
    are zero. Units start neither saturated nor in lockstep, whatever the fan-in, so deep
    logistic networks leave the first plateau that dense init leaves them on.

    Returns ``module``. ``generator`` (a CPU ``torch.Generator``) makes it reproducible;
    without one the global RNG is used.
    """
    if not (isinstance(nonzero, int) and nonzero >= 1):
        raise ValueError(f"nonzero must be an int >= 1, got {nonzero!r}")
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise ValueError(f"sparse_init_ found no nn.Linear in {type(module).__name__}")
    with torch.no_grad():
        for linear in linears:
            out_features, in_features = linear.weight.shape
            k = min(nonzero, in_features)
            weight = torch.zeros(out_features, in_features, dtype=linear.weight.dtype)
            for row in range(out_features):
                idx = torch.randperm(in_features, generator=generator)[:k]
                weight[row, idx] = torch.randn(k, generator=generator, dtype=linear.weight.dtype) * scale
            linear.weight.copy_(weight)
            if linear.bias is not None:
                linear.bias.zero_()
    return module


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


class _StackSteps(torch.autograd.Function):
    """``torch.cat`` along dim 0 whose backward is ``split`` (a ``SplitBackward`` node).

    ``torch.stack``/``torch.cat`` take the gradient apart with one ``select``/``narrow``
    per piece; a GGN product differentiates that backward again (§7.1's cached
    products), and the derivative of each ``select`` writes its piece into a zero tensor
    the size of the whole sequence: O(T²) time and traffic per product. ``split``'s own
    derivative is a single ``cat``, so products stay O(T).
    """

    generate_vmap_rule = True  # torch.func transforms may pass through unroll too

    @staticmethod
    def forward(*pieces: Tensor) -> Tensor:
        return torch.cat(pieces)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        ctx.like = [(p.shape, p.dtype, p.device) for p in inputs]

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad.split([shape[0] for shape, _, _ in ctx.like])

    @staticmethod
    def jvp(ctx, *tangents: Tensor | None) -> Tensor:
        # pieces that do not depend on the dual inputs come without a tangent
        return torch.cat([torch.zeros(s, dtype=d, device=dev) if t is None else t
                          for t, (s, d, dev) in zip(tangents, ctx.like)])


def unroll(cell, inputs: Tensor, h0: Tensor, checkpoint: int | str | None = None,
           return_states: bool = True) -> Tensor:
    """Run a recurrent ``cell(x_t, h) -> h`` over ``inputs`` (time first: T × ...).

    Args:
        cell: the transition, a module or function of ``(x_t, h)``.
        inputs: the input sequence, ``inputs[t]`` is fed at step t.
        h0: the initial state.
        checkpoint: ``None`` keeps every step's activations for backward; ``"sqrt"``
            splits the sequence into segments of ⌈√T⌉ steps and keeps only the state
            entering each segment, recomputing the segment's activations when backward
            (or a curvature product) needs them (§7.1, with
            ``torch.utils.checkpoint``, non-reentrant); an int sets the segment length.
        return_states: return all states (T × ...) — needed for per-step outputs or
            structural damping — or only the last one, which is what makes the memory
            of a checkpointed unroll O(√T) states.

    Returns:
        the stacked states h_1..h_T, or h_T.
    """
    T = inputs.shape[0]
    if T == 0:
        raise ValueError("inputs must have at least one time step")
    if checkpoint is None:
        k = T
    elif checkpoint == "sqrt":
        k = max(1, math.ceil(math.sqrt(T)))
    elif isinstance(checkpoint, int) and checkpoint >= 1:
        k = checkpoint
    else:
        raise ValueError(f"checkpoint must be None, 'sqrt' or a positive int, got {checkpoint!r}")

    def segment(h: Tensor, xs: Tensor):
        # unbind, not xs[t]: each indexing op's backward would write its step into a zero
        # tensor the size of the whole sequence, O(T²) memory traffic per backward.
        states = []
        for x_t in xs.unbind(0):
            h = cell(x_t, h)
            if return_states:
                states.append(h)
        return _StackSteps.apply(*(s.unsqueeze(0) for s in states)) if return_states else h

    # Without grad nothing is saved for backward, so there is nothing to checkpoint (and
    # forward-mode AD, which the recomputed GGN products use, need not pass through it).
    if checkpoint is None or not torch.is_grad_enabled():
        return segment(h0, inputs)

    pieces, h = [], h0
    for xs in inputs.split(k):  # split, not slicing: see _StackSteps
        out = torch.utils.checkpoint.checkpoint(segment, h, xs, use_reentrant=False)
        if return_states:
            pieces.append(out)
            h = out[-1]
        else:
            h = out
    return _StackSteps.apply(*pieces) if return_states else h
