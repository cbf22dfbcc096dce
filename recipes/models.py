"""Models of the recipes: the deep autoencoders of Martens (2010) and their sparse initialization."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

import torch_hf

MNIST_LAYERS = (784, 1000, 500, 250, 30)
CURVES_LAYERS = (784, 400, 200, 100, 50, 25, 6)


def sparse_init_(linear: nn.Linear, nonzero: int = 15, scale: float = 1.0, generator: torch.Generator | None = None) -> None:
    """Sparse initialization of Martens (2010); see :func:`torch_hf.nn.sparse_init_`."""
    torch_hf.nn.sparse_init_(linear, nonzero=nonzero, scale=scale, generator=generator)


def deep_autoencoder(encoder_sizes: Sequence[int] = MNIST_LAYERS, sparse: bool = True,
                     generator: torch.Generator | None = None) -> nn.Sequential:
    """Encoder ``encoder_sizes`` mirrored into a decoder: logistic hidden units, a linear
    code layer, and a linear output layer whose logits go into a sigmoid cross-entropy
    loss (the output nonlinearity is folded into the loss, §6.2)."""
    sizes = list(encoder_sizes) + list(reversed(encoder_sizes[:-1]))
    layers: list[nn.Module] = []
    code_index = len(encoder_sizes) - 2  # the linear layer that produces the code
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        lin = nn.Linear(a, b)
        if sparse:
            sparse_init_(lin, generator=generator)
        layers.append(lin)
        last = i == len(sizes) - 2
        if not last and i != code_index:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)
