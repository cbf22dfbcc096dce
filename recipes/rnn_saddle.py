"""Where a saved HF run on an RNN task stands: the input's reach at initialization, the
gradient's signal against its noise, and the exact Hessian's extreme eigenvalues with the
loss along the most negative direction (docs/rnns.md, XOR)."""
from __future__ import annotations

from pathlib import Path

import torch

import torch_hf
from recipes.rnn_tasks import Batch, forward, generate, readout_steps, sparse_init_rnn, spec, task_loss


def input_reach(task: str, input_scale: float, seed: int, T: int = 100, back: int = 95, n: int = 100) -> float:
    """‖∂h_T/∂x_{T−back}‖ averaged over ``n`` sequences at initialization: how much of an
    input ``back`` steps earlier reaches the last state (why the default input scale is 0.1)."""
    s = spec(task)
    b = generate(task, T, n, torch.Generator().manual_seed(1))
    model = sparse_init_rnn(s.inputs, 100, s.outputs, torch.Generator().manual_seed(seed), input_scale=input_scale)
    x = b.x.clone().requires_grad_(True)
    states, _ = forward(model, x, readout=1)
    (g,) = torch.autograd.grad(states[-1].pow(2).sum(), x)
    return float(g[T - back].norm(dim=-1).mean())


SADDLE_STEPS = (1e-3, 1e-2, 3e-2, 1e-1)


def saddle_report(state_path: str | Path, batches: int = 16, lanczos_steps: int = 40, seed: int = 777,
                  steps: tuple[float, ...] = SADDLE_STEPS) -> dict:
    """Where a saved HF run stands (``--resume``'s ``<stem>.pt``), in float64: the norm of
    the expected gradient and of one batch's deviation from it (``batches`` fresh batches of
    the run's gradient batch size; ‖Ē‖² is debiased by the noise/``batches``), and the
    extreme eigenvalues of the exact Hessian of the loss on one such batch (Lanczos).

    A negative eigenvalue as large as the largest is a saddle whose way down the GGN does
    not see (docs/rnns.md, XOR). How far that way down reaches is measured along the unit
    Ritz vector v of the smallest eigenvalue, signed downhill on the batch: for each step a
    in ``steps``, the loss change f(θ + a v) − f(θ) on that batch and on a fresh one, and
    the secant curvature (f(θ + a v) + f(θ − a v) − 2 f(θ)) / a² on the batch, which tends
    to vᵀHv as a → 0 (the finite-difference check of §7.2 along v).
    """
    saved = torch.load(state_path, map_location="cpu", weights_only=False)
    cfg = saved["config"]
    s = spec(cfg["task"])
    model = sparse_init_rnn(s.inputs, cfg["hidden"], s.outputs, torch.Generator().manual_seed(0)).double()
    model.load_state_dict(saved["model"])
    params = list(model.parameters())
    kind, T, size = s.kind, cfg["T"], cfg["batch_size"]
    gen = torch.Generator().manual_seed(seed)

    def batch_loss(b: Batch) -> torch.Tensor:
        _, out = forward(model, b.x.double(), readout=readout_steps(kind))
        return task_loss(kind, out, b.y.double() if kind in ("regression", "binary") else b.y)[0]

    def flat_grad(b: Batch) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(batch_loss(b), params)])

    grads = torch.stack([flat_grad(generate(cfg["task"], T, size, gen)) for _ in range(batches)])
    mean = grads.mean(0)
    noise = float(((grads - mean) ** 2).sum(1).mean().sqrt())
    signal = max(float(mean @ mean) - noise**2 / batches, 0.0) ** 0.5
    b = generate(cfg["task"], T, size, gen)
    hessian = torch_hf.curvature.Hessian(params, lambda: batch_loss(b))
    extremes = torch_hf.lanczos.lanczos_extremes(hessian.mv, hessian.numel, lanczos_steps, gen)
    low, high, v = extremes.lowest, extremes.highest, extremes.lowest_vector
    if float(flat_grad(b) @ v) > 0:
        v = -v
    fresh = generate(cfg["task"], T, size, gen)
    theta = [p.detach().clone() for p in params]
    shifts = [piece.view_as(p) for piece, p in zip(v.split([p.numel() for p in params]), params)]

    def loss_at(a: float, data: Batch) -> float:
        with torch.no_grad():
            for p, p0, d in zip(params, theta, shifts):
                p.copy_(p0 + a * d)
            value = float(batch_loss(data))
            for p, p0 in zip(params, theta):
                p.copy_(p0)
        return value

    base, base_fresh = loss_at(0.0, b), loss_at(0.0, fresh)
    along = []
    for a in steps:
        up, down = loss_at(a, b), loss_at(-a, b)
        along.append({"step": a, "batch_change": up - base, "fresh_change": loss_at(a, fresh) - base_fresh,
                      "curvature": (up + down - 2 * base) / a**2})
    return {"iterations": saved["it"], "test_loss": saved["history"][-1]["test_loss"], "gradient": signal,
            "noise": noise, "batch_size": size, "hessian_min": low, "hessian_max": high,
            "along_negative": along}
