"""Tiny float64 models and their dense references (built with torch.autograd.functional)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call


class TinyRNN(nn.Module):
    """tanh RNN unrolled over T steps; returns one output per step (a tuple)."""

    def __init__(self, n_in=2, n_hidden=3, n_out=2):
        super().__init__()
        self.inp = nn.Linear(n_in, n_hidden)
        self.rec = nn.Linear(n_hidden, n_hidden, bias=False)
        self.out = nn.Linear(n_hidden, n_out)

    def forward(self, x):
        h = torch.zeros(x.shape[0], self.rec.in_features, dtype=x.dtype)
        ys = []
        for t in range(x.shape[1]):
            h = torch.tanh(self.inp(x[:, t]) + self.rec(h))
            ys.append(self.out(h))
        return tuple(ys)


class TiedAutoencoder(nn.Module):
    """Decoder uses the transpose of the encoder weight (tied weights)."""

    def __init__(self, n=5, k=3):
        super().__init__()
        self.enc = nn.Linear(n, k)
        self.dec_bias = nn.Parameter(torch.zeros(n))

    def forward(self, x):
        h = torch.sigmoid(self.enc(x))
        return F.linear(h, self.enc.weight.t(), self.dec_bias)


class TinyConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


@dataclass
class Case:
    name: str
    model: nn.Module
    x: torch.Tensor
    loss_fn: Callable  # loss_fn(*outputs)

    @property
    def params(self):
        return list(self.model.parameters())

    def closure(self):
        out = self.model(self.x)
        outs = out if isinstance(out, tuple) else (out,)
        return self.loss_fn(*outs), out

    # -- dense references ------------------------------------------------------
    def _func(self, flat):
        names = [n for n, _ in self.model.named_parameters()]
        d, off = {}, 0
        for n, p in zip(names, self.params):
            d[n] = flat[off : off + p.numel()].view_as(p)
            off += p.numel()
        out = functional_call(self.model, d, (self.x,))
        return out if isinstance(out, tuple) else (out,)

    def flat_params(self):
        return torch.nn.utils.parameters_to_vector(self.params).detach().clone()

    def dense_jacobian(self):
        f = lambda th: torch.cat([o.reshape(-1) for o in self._func(th)])
        return torch.autograd.functional.jacobian(f, self.flat_params())

    def dense_loss_hessian(self):
        outs = [o.detach() for o in self._func(self.flat_params())]
        sizes = [o.numel() for o in outs]

        def loss_of(z):
            parts = torch.split(z, sizes)
            return self.loss_fn(*[p.view_as(o) for p, o in zip(parts, outs)])

        return torch.autograd.functional.hessian(loss_of, torch.cat([o.reshape(-1) for o in outs]))

    def dense_ggn(self):
        jac = self.dense_jacobian()
        return jac.T @ self.dense_loss_hessian() @ jac

    def dense_hessian(self):
        return torch.autograd.functional.hessian(lambda th: self.loss_fn(*self._func(th)), self.flat_params())


def make_case(name: str, seed: int = 0) -> Case:
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    B = 5
    if name == "mlp_tanh_mse":
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
        x, t = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randn(B, 2, generator=g, dtype=torch.float64)
        return Case(name, m, x, lambda z: F.mse_loss(z, t))
    if name == "mlp_sigmoid_bce":
        m = nn.Sequential(nn.Linear(3, 4), nn.Sigmoid(), nn.Linear(4, 3)).double()
        x, t = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.rand(B, 3, generator=g, dtype=torch.float64)
        return Case(name, m, x, lambda z: F.binary_cross_entropy_with_logits(z, t))
    if name == "mlp_tanh_ce":
        m = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
        x, t = torch.randn(B, 3, generator=g, dtype=torch.float64), torch.randint(0, 3, (B,), generator=g)
        return Case(name, m, x, lambda z: F.cross_entropy(z, t))
    if name == "conv_ce":
        m = TinyConv().double()
        x, t = torch.randn(3, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (3,), generator=g)
        return Case(name, m, x, lambda z: F.cross_entropy(z, t))
    if name == "rnn_tuple_mse":
        m = TinyRNN().double()
        x = torch.randn(3, 4, 2, generator=g, dtype=torch.float64)
        ts = torch.randn(4, 3, 2, generator=g, dtype=torch.float64)
        return Case(name, m, x, lambda *ys: sum(F.mse_loss(y, t, reduction="sum") for y, t in zip(ys, ts)) / 3)
    if name == "tied_autoencoder_bce":
        m = TiedAutoencoder().double()
        with torch.no_grad():
            m.dec_bias.normal_(generator=g)
        x = torch.rand(B, 5, generator=g, dtype=torch.float64)
        return Case(name, m, x, lambda z: F.binary_cross_entropy_with_logits(z, x))
    raise KeyError(name)


ALL_CASES = ["mlp_tanh_mse", "mlp_sigmoid_bce", "mlp_tanh_ce", "conv_ce", "rnn_tuple_mse", "tied_autoencoder_bce"]


class PoissonResiduals:
    """A PINN-style closure: the outputs are residuals Δu + f built by ``torch.autograd.grad``
    of a tiny tanh network w.r.t. its *inputs* (plus boundary values), loss ‖r‖²."""

    def __init__(self, seed: int = 0, n_interior: int = 6, n_boundary: int = 3, width: int = 4):
        g = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        self.model = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                                   nn.Linear(width, 1)).double()
        self.x_int = torch.rand(n_interior, 2, generator=g, dtype=torch.float64)
        self.x_bnd = torch.rand(n_boundary, 2, generator=g, dtype=torch.float64)
        self.f = torch.randn(n_interior, generator=g, dtype=torch.float64)

    @property
    def params(self):
        return list(self.model.parameters())

    def residuals(self, model_fn):
        x = self.x_int.clone().requires_grad_(True)
        u = model_fn(x).squeeze(-1)
        (du,) = torch.autograd.grad(u.sum(), x, create_graph=True)
        lap = sum(torch.autograd.grad(du[:, d].sum(), x, create_graph=True)[0][:, d] for d in range(2))
        return torch.cat([lap + self.f, model_fn(self.x_bnd).squeeze(-1)])

    def closure(self):
        r = self.residuals(self.model)
        return (r ** 2).sum(), r

    def dense_ggn(self):
        names = [n for n, _ in self.model.named_parameters()]
        theta = torch.nn.utils.parameters_to_vector(self.params).detach().clone()

        def r_of(flat):
            d, off = {}, 0
            for n, p in zip(names, self.params):
                d[n] = flat[off: off + p.numel()].view_as(p)
                off += p.numel()
            return self.residuals(lambda x: functional_call(self.model, d, (x,)))

        jac = torch.autograd.functional.jacobian(r_of, theta)
        return 2 * jac.T @ jac  # L'' of ‖r‖² is 2I
