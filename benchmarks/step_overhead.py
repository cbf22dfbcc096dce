"""Overhead of a whole HF step above its necessary parts.

On the MNIST autoencoder of ``curvature_cost.py`` (batch 1000, float32), one
``HessianFree.step`` with CG capped at 50 iterations is timed against the sum of the
parts it cannot avoid, each timed alone in the same run, interleaved with the steps:

    parts = (curvature products) × median GGN.mv
          + one gradient (forward + backward)
          + (objective evaluations) × median forward pass
          + the preconditioner's estimate

so ``step / parts - 1`` is what CG's vector work, bookkeeping and host
synchronisation add (target: ratio <= 1.15). Also printed: the objective evaluations
that CG-backtracking and the line search cost per step.

Run: ``python benchmarks/step_overhead.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import mnist_autoencoder_problem, synchronizer  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--steps", type=int, default=7, help="timed HF steps (default 7)")
    ap.add_argument("--cg-max-iters", type=int, default=50)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, x, closure = mnist_autoencoder_problem(args.batch, args.device)
    params = list(model.parameters())
    sync = synchronizer(args.device)
    opt = torch_hf.HessianFree(params, cg_max_iters=args.cg_max_iters, weight_decay=2e-5,
                               damping=torch_hf.damping.Tikhonov(1.0),
                               preconditioner=torch_hf.preconditioners.GGNDiagonal(0.75))

    def timed(fn):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        return time.perf_counter() - t0, out

    def gradient():
        loss, _ = closure()
        return torch.autograd.grad(loss, params)

    def forward():
        with torch.no_grad():
            return closure()[0].item()

    opt.step(closure)  # warm-up (also moves away from the initial λ)
    rows = []
    for rep in range(args.steps):
        t_step, _ = timed(lambda: opt.step(closure))
        d = opt.last_step
        # the parts, alone, at the new parameters
        op = torch_hf.GGN(params, closure)
        v = torch.randn(op.numel, device=x.device)
        t_mv = statistics.median(timed(lambda: op.mv(v))[0] for _ in range(3))
        t_grad = statistics.median(timed(gradient)[0] for _ in range(3))
        t_fwd = statistics.median(timed(forward)[0] for _ in range(3))
        t_pre = statistics.median(timed(lambda: opt.preconditioner.estimate(op))[0] for _ in range(3))
        del op
        parts = d.curvature_products * t_mv + t_grad + d.objective_evaluations * t_fwd + t_pre
        breakdown = {
            "gradient_and_curvature": d.times["gradient_and_curvature"] - t_grad,
            "preconditioner": d.times["preconditioner"] - t_pre,
            "cg": d.times["cg"] - d.curvature_products * t_mv,
            "backtracking_and_line_search": d.times["backtracking_and_line_search"] - d.objective_evaluations * t_fwd,
        }
        rows.append(dict(excess_s=breakdown, step_s=t_step, parts_s=parts, ratio=t_step / parts, products=d.curvature_products,
                         cg_iterations=d.cg_iterations, evaluations=d.objective_evaluations,
                         backtracking_evaluations=d.backtracking_evaluations,
                         line_search_evaluations=d.line_search_evaluations, mv_s=t_mv, gradient_s=t_grad,
                         forward_s=t_fwd, preconditioner_s=t_pre, rho=d.rho, damping=d.damping, loss=d.loss_before))
        print(f"step {rep + 1}: {t_step:6.2f} s, parts {parts:6.2f} s, ratio {t_step / parts:.3f}; "
              f"{d.cg_iterations} CG its ({d.cg_stop_reason}), {d.curvature_products} products, "
              f"{d.objective_evaluations} evaluations ({d.backtracking_evaluations} backtracking + "
              f"{d.line_search_evaluations} line search), rho {d.rho:.3f}, lambda {d.damping:.3g}")
    ratio = statistics.median(r["ratio"] for r in rows)
    print("median excess over the parts, by phase (s): " + ", ".join(
        f"{k} {statistics.median(r['excess_s'][k] for r in rows):+.3f}" for k in rows[0]["excess_s"]))
    evals = statistics.mean(r["evaluations"] for r in rows)
    print(f"MNIST autoencoder, batch {args.batch}, float32, {args.device}, {torch.get_num_threads()} threads, "
          f"CG <= {args.cg_max_iters}")
    print(f"RESULT step/parts = {ratio:.3f} (median of {len(rows)} steps; target <= 1.15); "
          f"objective evaluations per step: {evals:.1f} (backtracking "
          f"{statistics.mean(r['backtracking_evaluations'] for r in rows):.1f}, line search "
          f"{statistics.mean(r['line_search_evaluations'] for r in rows):.1f})")
    result = {"batch": args.batch, "device": args.device, "ratio_median": ratio, "steps": rows}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
