"""Which kernels a curvature operator runs the closure with: the closure's own, or, when a
first product fails for want of a double backward (fused attention, cuDNN RNNs,
``torch.compile``), twice-differentiable ones (§7.1's products differentiate the backward)."""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator

import torch

from .closure import ClosureError

__all__ = ["twice_differentiable_kernels", "kernels", "build_with_kernel_fallback"]

logger = logging.getLogger("torch_hf")


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Run the enclosed closure calls with kernels whose backward pass can itself be
    differentiated, as every curvature product needs (§7.1's cached products differentiate
    the recorded backward; the Hessian differentiates the gradient):

    * attention through :func:`torch.nn.functional.scaled_dot_product_attention` uses the
      math backend (the flash and memory-efficient kernels have no double backward);
    * cuDNN is off (its RNN backward has no derivative; LSTM and GRU fall back to the
      native kernels, which have one);
    * ``torch.compile``'d modules and functions run eagerly (AOTAutograd has no double
      backward; needs ``torch.compiler.set_stance``, torch ≥ 2.6).

    Trial-point evaluations stay outside, with the fast kernels. :class:`GGN` and
    :class:`Hessian` enter this context by themselves when a first product fails without it.
    """
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # torch < 2.2
            stack.enter_context(torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False,
                                                               enable_math=True))
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        cudnn_was = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            yield
        finally:
            torch.backends.cudnn.enabled = cudnn_was


def kernels(safe: bool):
    """The kernels a curvature operator evaluates its closure with: twice-differentiable
    ones when ``safe``, the closure's own otherwise."""
    return twice_differentiable_kernels() if safe else contextlib.nullcontext()


_COMPILE_HINT = (
    "HF differentiates the closure's backward pass (every curvature product is a derivative of the "
    "gradient), and a torch.compile'd module has no double backward{why}. Call the uncompiled module "
    "in the closure (model._orig_mod for model = torch.compile(m)), or use torch >= 2.6, where torch_hf "
    "runs compiled code eagerly for the curvature operator and compiled for trial points."
)


def build_with_kernel_fallback(op, build: Callable[[], None], probe: Callable[[], object],
                                safe_kernels: bool | None) -> None:
    """Build a curvature operator; with ``safe_kernels=None`` try the closure's own kernels
    first and rebuild under :func:`twice_differentiable_kernels` when a first product
    (``probe``) fails for want of a double backward. Sets ``op.safe_kernels``."""
    if safe_kernels is not None:
        op.safe_kernels = bool(safe_kernels)
        with kernels(op.safe_kernels):
            build()
        return
    op.safe_kernels = False
    try:
        build()
        probe()
        return
    except torch.cuda.OutOfMemoryError:
        raise  # no kernel choice helps; don't run the closure again
    except (RuntimeError, NotImplementedError) as exc:  # raised by the build too (compiled backward)
        first = exc
    op.safe_kernels = True
    try:
        with twice_differentiable_kernels():
            build()
        probe()
    except (RuntimeError, NotImplementedError) as exc:
        text = f"{first} {exc}"
        if "compile" in text or "aot_autograd" in text:
            raise ClosureError(_COMPILE_HINT.format(why=f" ({str(exc).splitlines()[0]})")) from exc
        raise
    logger.info("torch_hf: the closure's kernels have no double backward (%s); the curvature operator "
                "evaluates it with twice-differentiable ones", str(first).splitlines()[0][:160])
