"""What subnormal floats cost on CPU, and where an HF step's time goes.

1. On the CURVES autoencoder at sparse initialization (``recipes/models.py``), a gradient
   and a GGN product on ``--batch`` cases, timed with float32 subnormals handled by the
   CPU and flushed to zero (``torch.set_flush_denormal``), interleaved, medians; printed as
   the ratio slow / flushed (why ``HessianFree(flush_denormal=True)`` is the default).
2. ``--steps`` HF steps with the library's defaults (gradient batch 1000, curvature batch
   250, the README's loop) from the same initialization: the fraction of step time in
   each phase of Algorithm 3 (``opt.last_step.times``) and CG iterations per step.
3. With ``--rnn-state``: one Adam update of the RNN recipe (batch 100, gradient-norm clip,
   as ``recipes/rnn_pathological.py`` trains it) from a run's saved state (its ``<stem>.pt``),
   subnormals handled by the CPU against flushed (why the recipes flush for every optimizer).

    python benchmarks/subnormals.py --threads 1
    python benchmarks/subnormals.py --threads 1 --steps 0 --rnn-state results/rnn_temporal_order_T100_adam_seed2.pt
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved  # noqa: E402
from recipes.data import load_curves  # noqa: E402
from recipes.models import CURVES_LAYERS, deep_autoencoder  # noqa: E402


def with_mode(flush: bool, fn):
    """``fn`` run with subnormals flushed (``flush``) or handled by the CPU."""
    def run():
        torch.set_flush_denormal(flush)
        fn()
    return run


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--steps", type=int, default=20, help="HF steps profiled (0: none)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--rnn-state", default=None, metavar="PT",
                    help="also time an Adam update of the RNN recipe from this saved Adam run (<stem>.pt)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    train, _ = load_curves(None, n_train=20000, n_test=10000, seed=0)
    x_all = torch.from_numpy(train)
    model = deep_autoencoder(CURVES_LAYERS, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    x = x_all[: args.batch]

    def closure():
        z = model(x)
        return F.binary_cross_entropy_with_logits(z, x, reduction="sum") / len(x), z

    op = torch_hf.GGN(params, closure)
    v = torch.randn(sum(p.numel() for p in params), generator=torch.Generator().manual_seed(1))

    def gradient():
        loss, _ = closure()
        torch.autograd.grad(loss, params)

    t = interleaved({"gradient, subnormals": with_mode(False, gradient),
                     "gradient, flushed": with_mode(True, gradient),
                     "GGN product, subnormals": with_mode(False, lambda: op.mv(v)),
                     "GGN product, flushed": with_mode(True, lambda: op.mv(v))}, reps=args.reps)
    torch.set_flush_denormal(False)
    out = {k: round(s * 1000, 2) for k, s in t.items()}
    print(f"CURVES autoencoder, {args.batch} cases, threads {torch.get_num_threads()} (median ms):")
    for what in ("gradient", "GGN product"):
        slow, fast = t[f"{what}, subnormals"], t[f"{what}, flushed"]
        print(f"  {what:12s} {slow * 1000:8.1f} with subnormals {fast * 1000:8.1f} flushed   ratio {slow / fast:.1f}")
        out[f"{what} ratio"] = round(slow / fast, 2)
    if args.steps:
        opt = torch_hf.HessianFree(params, weight_decay=2e-5)
        perm = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(2))
        phases: dict[str, float] = {}
        iters = 0
        for k in range(args.steps):
            xb = x_all[perm[k * 1000:(k + 1) * 1000]]
            xc = xb[:250]

            def step_closure():
                z = model(xb)
                return F.binary_cross_entropy_with_logits(z, xb, reduction="sum") / len(xb), z

            def curvature_closure():
                z = model(xc)
                return F.binary_cross_entropy_with_logits(z, xc, reduction="sum") / len(xc), z

            opt.step(step_closure, curvature_closure)
            iters += opt.last_step.cg_iterations
            for name, s in opt.last_step.times.items():
                phases[name] = phases.get(name, 0.0) + s
        total = sum(phases.values())
        print(f"{args.steps} HF steps, library defaults, 1000 / 250: {iters / args.steps:.1f} CG iterations per step")
        for name, s in phases.items():
            print(f"  {name:30s} {100 * s / total:5.1f}%")
            out[f"share {name}"] = round(s / total, 3)
    if args.rnn_state:
        out.update(rnn_adam_update(args.rnn_state, args.reps))
    return out


def rnn_adam_update(path: str, reps: int, batch: int = 100) -> dict:
    """Median time of one of the RNN recipe's Adam updates from the saved run at ``path``,
    with subnormals and flushed, on fresh batches of the run's task."""
    from recipes import rnn_pathological as rp

    saved = torch.load(path, map_location="cpu", weights_only=False)
    cfg = saved["config"]
    if cfg.get("optimizer") != "adam":
        raise SystemExit(f"--rnn-state {path}: a saved Adam run is needed, this one is {cfg.get('optimizer')!r}")
    spec = rp.spec(cfg["task"])
    model = rp.sparse_init_rnn(spec.inputs, cfg["hidden"], spec.outputs, torch.Generator().manual_seed(0))
    model.load_state_dict(saved["model"])
    params = list(model.parameters())
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    opt.load_state_dict(saved["optimizer"])
    gen = torch.Generator().manual_seed(1)

    def update():
        b = rp.generate(cfg["task"], cfg["T"], batch, gen)
        opt.zero_grad(set_to_none=True)
        _, out = rp.forward(model, b.x, None, rp.readout_steps(spec.kind))
        loss, _ = rp.task_loss(spec.kind, out, b.y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.get("clip") or float("inf"))
        opt.step()

    def ten_updates():
        for _ in range(10):
            update()

    t = interleaved({"subnormals": with_mode(False, ten_updates), "flushed": with_mode(True, ten_updates)}, reps=reps)
    torch.set_flush_denormal(False)
    slow, fast = t["subnormals"] / 10, t["flushed"] / 10
    print(f"RNN recipe, Adam update ({cfg['task']}, T = {cfg['T']}, batch {batch}, state at "
          f"{saved['train_time']:.0f} s): {slow * 1000:.1f} ms with subnormals, {fast * 1000:.1f} ms flushed, "
          f"ratio {slow / fast:.1f}")
    return {"rnn adam update, subnormals": round(slow * 1000, 2), "rnn adam update, flushed": round(fast * 1000, 2),
            "rnn adam update ratio": round(slow / fast, 2)}


if __name__ == "__main__":
    main()
