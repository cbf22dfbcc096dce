"""Subnormal floats flushed to zero on CPU for the duration of a step (x86 handles them
in slow microcode; values below float32's normal range carry nothing a step can use)."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def _denormals_flushed(enabled: bool):
    """Flush subnormal floats to zero inside the block (CPU), restoring the caller's mode.
    Yields whether flushing is in force inside the block.

    torch has no getter for the mode, so it is read off one multiplication: with
    flush-to-zero a float32 subnormal times one is zero."""
    already = _flushing_denormals()
    if not enabled or already:
        yield already
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)


def _flushing_denormals() -> bool:
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0
