"""Models of the recipes: the deep autoencoders of Martens (2010) and their sparse initialization."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

MNIST_LAYERS = (784, 1000, 500, 250, 30)
CURVES_LAYERS = (784, 400, 200, 100, 50, 25, 6)


def sparse_init_(linear: nn.Linear, nonzero: int = 15, scale: float = 1.0, generator: torch.Generator | None = None) -> None:
    """Sparse initialization of Martens (2010): each unit gets ``nonzero`` random incoming
    weights drawn from N(0, scale²), all others and the bias are zero."""
    out_features, in_features = linear.weight.shape
    k = min(nonzero, in_features)
    with torch.no_grad():
        linear.weight.zero_()
        linear.bias.zero_()
        for row in range(out_features):
            idx = torch.randperm(in_features, generator=generator)[:k]
            linear.weight[row, idx] = torch.randn(k, generator=generator, dtype=linear.weight.dtype) * scale


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
