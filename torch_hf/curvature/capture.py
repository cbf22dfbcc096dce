"""A curvature product replayed from a CUDA graph: one launch in place of hundreds.

On a GPU one GGN product of a small network is a few hundred small kernels, each launched
from Python through the autograd engine: the product of the CURVES autoencoder at a
1250-case batch took 5.3 ms on an H200 against 0.15 ms of arithmetic (``benchmarks/
step_phases.py``). The products of one HF step all differentiate the same recorded graph
(§7.1's cached activations) with a new vector, so the kernels, their shapes and the
addresses they read are the same for every product of the step: :class:`CapturedProduct`
runs the first product as usual (the warm-up), records the second into a
``torch.cuda.CUDAGraph`` and replays the graph for it and every later product, copying the
vector into the graph's input and the result out of its output. The replay launches the
same kernels on the same data, so it gives the same product as the uncaptured path.

Capture needs the forward pass, the products and the replay on one side stream (a backward
kernel runs on the stream of its forward op, and the legacy default stream cannot be
captured): :class:`~torch_hf.HessianFree` runs its whole step on such a stream when it
captures. A product that cannot be captured (a host synchronisation or a data-dependent
shape in a user's loss Hessian, an operator that allocates outside the graph's pool)
falls back to the uncaptured product for the rest of the step, saying why once in the
log (``logging.getLogger("torch_hf")``); the optimizer then stops capturing.
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

__all__ = ["CapturedProduct", "CapturedUpdate"]

logger = logging.getLogger("torch_hf")
_reported: set[str] = set()


def _report(what: str, failure: str) -> None:
    if failure not in _reported:
        _reported.add(failure)
        logger.warning("torch_hf: %s could not be captured in a CUDA graph (%s); it runs uncaptured", what, failure)


def _describe(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}".splitlines()[0][:300]


def _record(fn: Callable[[], object], stream, device: torch.device):
    """Record ``fn()`` into a new CUDA graph (its own memory pool) on ``stream``; returns
    ``(graph, what fn returned)``. ``capture_begin``/``capture_end`` rather than
    ``torch.cuda.graph``: that context also collects garbage and empties the allocator's
    cache on entry, every step. A capture that fails leaves the device's default generator
    marked as capturing (its next random draw raises "Offset increment outside graph
    capture"): a clean copy of its state is put back (torch >= 2.4; nothing captured here
    draws random numbers)."""
    graph = torch.cuda.CUDAGraph()
    generator = torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    saved = generator.clone_state() if hasattr(generator, "graphsafe_set_state") else None
    try:
        with torch.cuda.stream(stream):
            graph.capture_begin()
            try:
                out = fn()
            finally:
                graph.capture_end()
    except BaseException:
        if saved is not None:
            generator.graphsafe_set_state(saved)
        raise
    return graph, out


class CapturedProduct:
    """``mv`` of one curvature operator, replayed from a CUDA graph after the first call.

    Args:
        mv: the operator's own product ``v -> B v`` (flat vectors).
        stream: the CUDA stream the operator's forward pass ran on; the graph is captured
            and replayed there.

    Attributes: ``calls`` (products asked for), ``replays`` (of those, served by the
    graph), ``failure`` (``None``, or why the capture failed: the product then runs
    uncaptured).
    """

    def __init__(self, mv: Callable[[Tensor], Tensor], stream) -> None:
        self._mv, self._stream = mv, stream
        self.graph = None
        self.calls = self.replays = 0
        self.failure: str | None = None
        self._input: Tensor | None = None
        self._output: Tensor | None = None

    def __call__(self, v: Tensor) -> Tensor:
        if self._mv is _released:
            _released(v)
        self.calls += 1
        if self.failure is not None or self.calls == 1:  # the first call warms up (cuBLAS handles, autograd)
            return self._mv(v)
        if self.graph is None:
            try:
                self._input = v.detach().clone()
                self.graph, self._output = self._capture(self._input)
            except Exception as err:  # noqa: BLE001 - any failure means: do not capture
                self.graph, self._input, self._output = None, None, None
                self.failure = _describe(err)
                _report("the curvature product", self.failure)
                return self._mv(v)
        assert self._input is not None and self._output is not None
        self._input.copy_(v)
        self.graph.replay()
        self.replays += 1
        return self._output.clone()  # the graph's output is overwritten by the next replay

    def release(self) -> None:
        """Drop the graph, its buffers and the operator (``op.mv = CapturedProduct(op.mv)``
        is a reference cycle that would keep the step's activations until the garbage
        collector runs); the counters stay readable. Later calls raise."""
        self._mv = _released
        self.graph, self._input, self._output = None, None, None

    def _capture(self, static_input: Tensor):
        """Record one product on ``static_input``; returns (graph, output)."""
        return _record(lambda: self._mv(static_input), self._stream, static_input.device)


class CapturedUpdate:
    """A function of no arguments that updates fixed buffers in place (CG's vector work,
    :func:`torch_hf.cg._cg_graphed`), replayed from a CUDA graph after the first call.
    With ``stream=None`` it always runs as is. Attributes as :class:`CapturedProduct`."""

    def __init__(self, fn: Callable[[], None], stream, device: torch.device | None = None) -> None:
        self._fn, self._stream, self._device = fn, stream, device
        self.graph = None
        self.calls = self.replays = 0
        self.failure: str | None = None

    def __call__(self) -> None:
        self.calls += 1
        if self._stream is None or self.failure is not None or self.calls == 1:
            self._fn()
            return
        if self.graph is None:
            try:
                self.graph, _ = _record(self._fn, self._stream, self._device or torch.device("cuda"))
            except Exception as err:  # noqa: BLE001 - any failure means: do not capture
                self.graph, self.failure = None, _describe(err)
                _report("CG's vector work", self.failure)
                self._fn()  # a capture does not run the work: nothing was updated
                return
        self.graph.replay()
        self.replays += 1


def _released(v: Tensor) -> Tensor:
    raise RuntimeError("this captured product was released at the end of its step")
