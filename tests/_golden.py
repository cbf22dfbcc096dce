"""Golden trajectories: 20 HF steps of six configurations, parameters and diagnostics after
every step, recorded before a refactoring and compared after it (tests/test_golden.py).

    python tests/_golden.py            # (re)record tests/data/golden.pt from the current code

Each case is a tiny float64 problem with every random stream seeded, so a run is a
function of the code alone. Only a change of behaviour should move a trajectory; where an
operation order had to change, the comparison's tolerance says by how much it may.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
import torch_hf  # noqa: E402

STEPS = 20
# The first five cases were recorded before the regime-aware defaults (cg_stop="auto",
# solver="auto"): they pin the rules they were recorded with. The "auto_*" cases record
# the defaults themselves.
PINNED = {"cg_stop": "rate", "solver": "cg"}
GOLDEN = HERE / "data" / "golden.pt"
# The diagnostics that describe the step (the timings do not).
FIELDS = ("cg_stop", "solver", "regime", "loss_before", "loss_after", "rho", "damping", "damping_next", "cg_iterations", "cg_stop_reason",
          "chosen_iteration", "line_search_alpha", "predicted_reduction", "rho_informative", "converged", "stall",
          "curvature_products", "objective_evaluations", "grad_norm", "step_norm", "accepted")


def _autoencoder(seed: int = 0) -> tuple[nn.Module, Callable]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.Linear(3, 5), nn.Sigmoid(),
                          nn.Linear(5, 8)).double()
    x = torch.rand(64, 8, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def closure():
        z = model(x)
        return F.binary_cross_entropy_with_logits(z, x), z

    return model, closure


def _defaults():
    model, closure = _autoencoder()
    opt = torch_hf.HessianFree(model.parameters(), weight_decay=1e-4, generator=torch.Generator().manual_seed(1),
                               **PINNED)
    return model, opt, closure, None


def _kfac():
    model, closure = _autoencoder()
    pre = torch_hf.preconditioners.KFAC(inverse_every=2)
    opt = torch_hf.HessianFree(model.parameters(), preconditioner=pre, generator=torch.Generator().manual_seed(2),
                               **PINNED)
    return model, opt, closure, None


def _hessian():
    model, closure = _autoencoder()
    opt = torch_hf.HessianFree(model.parameters(), curvature="hessian", trust_radius=0.5,
                               generator=torch.Generator().manual_seed(3), **PINNED)
    return model, opt, closure, None


def _structural_rnn():
    torch.manual_seed(4)
    cell = nn.ModuleDict({"inp": nn.Linear(2, 6), "rec": nn.Linear(6, 6), "out": nn.Linear(6, 1)}).double()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(12, 32, 2, generator=g, dtype=torch.float64)  # T × B × inputs
    y = x[:3, :, 0].sum(0, keepdim=True).t()
    xc = x[:, :8]

    def closure_for(inputs, targets):
        def closure():
            h = torch.zeros(inputs.shape[1], 6, dtype=torch.float64)
            states = []
            for t in range(inputs.shape[0]):
                h = torch.tanh(cell["inp"](inputs[t]) + cell["rec"](h))
                states.append(h)
            z = cell["out"](h)
            return F.mse_loss(z, targets), z, torch.stack(states)
        return closure

    damping = torch_hf.damping.Structural(0.3, mu=0.1, batch_dim=1)
    opt = torch_hf.HessianFree(cell.parameters(), damping=damping, preconditioner=torch_hf.preconditioners.Identity(),
                               cg_max_iters=30, **PINNED)
    return cell, opt, closure_for(x, y), closure_for(xc, y[:8])


def _pinn(**options):
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).double()
    g = torch.Generator().manual_seed(5)
    inner = torch.rand(60, 2, generator=g, dtype=torch.float64)
    t = torch.rand(4, 8, generator=g, dtype=torch.float64)
    zero, one = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    edge = torch.cat([torch.stack(p, 1) for p in ((t[0], zero), (t[1], one), (zero, t[2]), (one, t[3]))])
    f = 2 * math.pi**2 * torch.sin(math.pi * inner[:, 0]) * torch.sin(math.pi * inner[:, 1])

    def closure():
        xi = inner.detach().requires_grad_(True)
        u = model(xi).squeeze(-1)
        (du,) = torch.autograd.grad(u.sum(), xi, create_graph=True)
        lap = sum(torch.autograd.grad(du[:, d].sum(), xi, create_graph=True)[0][:, d] for d in range(2))
        r = torch.cat([(lap + f) / math.sqrt(len(inner)), model(edge).squeeze(-1) / math.sqrt(len(edge))])
        return (r ** 2).sum(), r

    options = options or {"cg_stop": "progress", "solver": "cg"}
    opt = torch_hf.HessianFree(model.parameters(), generator=torch.Generator().manual_seed(6), **options)
    return model, opt, closure, None


def _auto_pinn():
    """The defaults on a full-batch PINN: CG with the rate rule until the objective is seen
    to repeat, then the progress rule, then the dense solve once CG costs more."""
    return _pinn(weight_decay=0.0)


def _auto_minibatch():
    """The defaults on minibatches (a new batch each step): f never repeats, CG keeps the
    rate rule and the solver stays CG."""
    model, _ = _autoencoder()
    x = torch.rand(256, 8, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    opt = torch_hf.HessianFree(model.parameters(), generator=torch.Generator().manual_seed(8))
    steps = iter(range(10**6))

    class NextBatch:
        """Steps the optimizer on batch k at its k-th step (trial points included)."""
        param_groups = opt.param_groups

        @property
        def last_step(self):
            return opt.last_step

        def step(self, closure, curvature_closure=None):
            xb = x[32 * (next(steps) % 8):][:32]

            def batch():
                z = model(xb)
                return F.binary_cross_entropy_with_logits(z, xb), z

            return opt.step(batch)

    return model, NextBatch(), None, None


CASES: dict[str, Callable] = {"defaults": _defaults, "kfac": _kfac, "hessian": _hessian,
                              "structural_rnn": _structural_rnn, "pinn": _pinn, "auto_pinn": _auto_pinn,
                              "auto_minibatch": _auto_minibatch}


def trajectory(name: str, steps: int = STEPS, nudge: float = 0.0) -> dict:
    """Parameters (flat) and diagnostics after each of ``steps`` steps of case ``name``;
    with ``nudge``, the initial parameters are first scaled by 1 + nudge·N(0, 1) (fixed
    draws): a perturbation the size of another CPU's rounding."""
    model, opt, closure, curvature_closure = CASES[name]()
    if nudge:
        g = torch.Generator().manual_seed(7)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(1 + nudge * torch.randn(p.shape, generator=g, dtype=p.dtype))
    params, diagnostics = [], []
    for _ in range(steps):
        opt.step(closure, curvature_closure)
        params.append(torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone())
        diagnostics.append({k: getattr(opt.last_step, k) for k in FIELDS})
    return {"params": torch.stack(params), "diagnostics": diagnostics}


def record() -> dict:
    golden = {name: trajectory(name) for name in CASES}
    sys.path.insert(0, str(HERE))
    from test_distributed import _launch  # two gloo processes, the defaults, data parallel
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        golden["data_parallel"] = {"params": [torch.cat([p.reshape(-1) for p in ps])
                                              for ps in _launch("defaults", Path(tmp))]}
    return golden


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    torch.save(record(), GOLDEN)
    print(f"recorded {GOLDEN}")
