"""The problem shared by tests/test_distributed.py and its worker processes."""
from __future__ import annotations

import torch
import torch.nn.functional as F

import torch_hf

N_CASES = 24  # whole batch; each of `world` processes holds a contiguous shard
N_CURV = 4  # curvature cases taken from the front of each shard (§12.1)


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(N_CASES, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (N_CASES,), generator=g)
    return x, y


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()


def make_optimizer(config: str, m: torch.nn.Module) -> torch_hf.HessianFree:
    if config == "fisher":
        return torch_hf.HessianFree(m.parameters(), damping=torch_hf.damping.Tikhonov(0.5),
                                    preconditioner=torch_hf.preconditioners.EmpiricalFisherDiagonal(0.75),
                                    weight_decay=1e-3, cg_max_iters=20, cg_stop="progress")
    if config == "scale":
        damping = torch_hf.damping.ScaleSensitive(3.0, estimator=torch_hf.preconditioners.EmpiricalFisherDiagonal())
        return torch_hf.HessianFree(m.parameters(), damping=damping,
                                    preconditioner=torch_hf.preconditioners.Identity(), cg_max_iters=10,
                                    cg_stop="progress")
    if config == "rate":  # timing-driven CG length: the ranks must still agree
        return torch_hf.HessianFree(m.parameters(), cg_max_iters=40, cg_tol=0.0, cg_stop="rate")
    if config == "kfac":  # Kronecker factors averaged over the group: every rank gets the same P
        pre = torch_hf.preconditioners.KFAC(decay=0.5, inverse_every=2, generator=torch.Generator().manual_seed(0))
        return torch_hf.HessianFree(m.parameters(), preconditioner=pre, cg_max_iters=20, cg_stop="progress")
    if config == "defaults":  # random GGN-diagonal probes and cg_stop="rate": CG truncates on the preconditioner
        return torch_hf.HessianFree(m.parameters())
    raise ValueError(config)


def run_steps(config: str, rank: int = 0, world: int = 1, n_shards: int = 2, steps: int = 3,
              device: str = "cpu") -> list[torch.Tensor]:
    """``steps`` HF steps. With ``world`` > 1 this process holds shard ``rank`` of
    ``world`` (and a model seeded by rank, so the first step's broadcast from rank 0 is
    exercised); with ``world`` == 1 it holds the whole batch, and its curvature batch is
    the union of the ``n_shards`` shards' curvature batches."""
    x, y = (t.to(device) for t in data())
    n_shards = world if world > 1 else n_shards
    size = N_CASES // n_shards
    shards = [(x[r * size:(r + 1) * size], y[r * size:(r + 1) * size]) for r in range(n_shards)]
    if world > 1:
        xs, ys = shards[rank]
        xc, yc = xs[:N_CURV], ys[:N_CURV]
    else:
        xs, ys = x, y
        xc, yc = torch.cat([s[0][:N_CURV] for s in shards]), torch.cat([s[1][:N_CURV] for s in shards])
    m = model(seed=rank).to(device)
    opt = make_optimizer(config, m)

    def closure():
        z = m(xs)
        return F.cross_entropy(z, ys), z

    def curvature_closure():
        z = m(xc)
        return F.cross_entropy(z, yc), z

    for _ in range(steps):
        opt.step(closure, curvature_closure)
    return [p.detach().cpu().clone() for p in m.parameters()]
