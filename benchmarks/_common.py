"""Interleaved timing: every repetition runs each candidate once, in turn, so that
machine noise hits all of them alike; results are medians."""
from __future__ import annotations

import statistics
import time
from typing import Callable


def interleaved(candidates: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, float]:
    """Median wall time in seconds of each candidate over ``reps`` interleaved rounds."""
    for _ in range(warmup):
        for fn in candidates.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in candidates}
    for _ in range(reps):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def mnist_autoencoder_problem(batch: int = 1000, device: str = "cpu", seed: int = 0):
    """The MNIST autoencoder of Martens (2010) on a random batch in [0, 1].

    Returns ``(model, x, closure)`` with ``closure() -> (BCE-with-logits loss, logits)``.
    """
    import torch
    import torch.nn.functional as F

    from recipes.models import MNIST_LAYERS, deep_autoencoder

    torch.manual_seed(seed)
    model = deep_autoencoder(MNIST_LAYERS).to(device)
    x = torch.rand(batch, 784, device=device)

    def closure():
        z = model(x)
        return F.binary_cross_entropy_with_logits(z, x), z

    return model, x, closure


def synchronizer(device):
    """A function that waits for the device (no-op on CPU)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None
