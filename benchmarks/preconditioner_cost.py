"""What each preconditioner costs, in GGN products on the same curvature batch.

On the CURVES autoencoder (784-400-200-100-50-25-6 and mirror, sparse initialization) and
on ``manifold`` (400-256-128-64-12, ``benchmarks/hf_vs_adam.py``), ``--batch`` curvature
cases, float32 with subnormals flushed: the per-step ``update`` and the per-CG-iteration
``solve`` of ``GGNDiagonal`` and ``KFAC`` (every-step and every-5th-step eigendecompositions),
timed interleaved with one GGN product (medians), and printed as multiples of it.

    python benchmarks/preconditioner_cost.py --threads 1
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
from benchmarks.hf_vs_adam import load_problem  # noqa: E402
from recipes.models import deep_autoencoder  # noqa: E402


def costs(problem: str, batch: int, reps: int) -> dict[str, float]:
    """Median times of each candidate divided by one GGN product's."""
    train, _, layers = load_problem(problem)
    model = deep_autoencoder(layers, generator=torch.Generator().manual_seed(0))
    params = list(model.parameters())
    x = train[:batch]

    def closure():
        z = model(x)
        return F.binary_cross_entropy_with_logits(z, x, reduction="sum") / len(x), z

    op = torch_hf.GGN(params, closure)
    v = torch.randn(op.numel, generator=torch.Generator().manual_seed(1))
    diag = torch_hf.preconditioners.GGNDiagonal(0.75)
    kfac1 = torch_hf.preconditioners.KFAC(inverse_every=1)
    kfac5 = torch_hf.preconditioners.KFAC(inverse_every=5)
    for pre in (diag, kfac1, kfac5):
        pre.update(op, 1.0)
    t = interleaved({"product": lambda: op.mv(v),
                     "GGNDiagonal update": lambda: diag.update(op, 1.0),
                     "GGNDiagonal solve": lambda: diag.solve(v),
                     "KFAC update, eigh every step": lambda: kfac1.update(op, 1.0),
                     "KFAC update, eigh every 5th (mean)": lambda: [kfac5.update(op, 1.0) for _ in range(5)],
                     "KFAC solve": lambda: kfac5.solve(v)}, reps=reps)
    t["KFAC update, eigh every 5th (mean)"] /= 5
    return {k: s / t["product"] for k, s in t.items()}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", nargs="+", default=["curves", "manifold"])
    ap.add_argument("--batch", type=int, default=250)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = {}
    try:
        for problem in args.problems:
            ratios = costs(problem, args.batch, args.reps)
            print(f"{problem}, {args.batch} curvature cases, threads {torch.get_num_threads()} "
                  "(median time / one GGN product):")
            for name, r in ratios.items():
                print(f"  {name:36s} {r:6.2f}")
            out[problem] = {k: round(r, 3) for k, r in ratios.items()}
    finally:
        torch.set_flush_denormal(False)
    return out


if __name__ == "__main__":
    main()
