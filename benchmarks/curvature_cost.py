"""Cost of one GGN-vector product relative to one gradient, on the same batch.

The MNIST autoencoder of Martens (2010): 784-1000-500-250-30-250-500-1000-784,
logistic hidden units, linear code layer, sigmoid cross-entropy output; float32, CPU.
All candidates are timed interleaved (one of each per round) and reported as medians:

* ``gradient``           forward + backward (``torch.autograd.grad``), the unit
* ``ggn_mv``             torch_hf.GGN.mv on cached activations (the library's path)
* ``ggn_mv_autograd_L``  the same with L'' by double backward instead of the closed form
* ``func_mv``            torch.func.linearize + torch.func.vjp, also cached (the alternative)
* ``uncached_mv``        a fresh forward pass per product (what caching saves)

Run: ``python benchmarks/curvature_cost.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.func import functional_call, linearize, vjp

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved, mnist_autoencoder_problem, synchronizer  # noqa: E402
from recipes.models import MNIST_LAYERS  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions (default 15)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model, x, closure = mnist_autoencoder_problem(args.batch, args.device)
    params = list(model.parameters())

    def closure_generic_loss():  # an unreduced loss averaged by hand is not recognised: L'' by autograd
        z = model(x)
        return F.binary_cross_entropy_with_logits(z, x, reduction="none").mean(), z

    ggn = torch_hf.GGN(params, closure)
    assert ggn.matching_loss is not None
    ggn_generic = torch_hf.GGN(params, closure_generic_loss)
    assert ggn_generic.matching_loss is None
    v = torch.randn(ggn.numel, device=device)

    names = [n for n, _ in model.named_parameters()]
    detached = {n: p.detach() for n, p in model.named_parameters()}
    z, jvp_fn = linearize(lambda d: functional_call(model, d, (x,)), detached)
    _, vjp_fn = vjp(lambda d: functional_call(model, d, (x,)), detached)
    p = torch.sigmoid(z)
    curv = p * (1 - p) / z.numel()
    sizes = [q.numel() for q in params]

    def func_mv():
        parts = dict(zip(names, (t.view_as(q) for t, q in zip(v.split(sizes), params))))
        g = vjp_fn(jvp_fn(parts) * curv)[0]
        return torch.cat([g[n].reshape(-1) for n in names])

    def gradient():
        loss, _ = closure()
        return torch.autograd.grad(loss, params)

    err = float((func_mv() - ggn.mv(v)).norm() / ggn.mv(v).norm())
    err_generic = float((ggn_generic.mv(v) - ggn.mv(v)).norm() / ggn.mv(v).norm())
    sync = synchronizer(device)

    def timed(fn):
        def run():
            fn()
            sync()
        return run

    medians = interleaved(
        {
            "gradient": timed(gradient),
            "ggn_mv": timed(lambda: ggn.mv(v)),
            "ggn_mv_autograd_L": timed(lambda: ggn_generic.mv(v)),
            "func_mv": timed(func_mv),
            "uncached_mv": timed(lambda: torch_hf.GGN(params, closure).mv(v)),
        },
        reps=args.reps,
    )
    ratios = {k: medians[k] / medians["gradient"] for k in medians}
    print(f"MNIST autoencoder {'-'.join(map(str, list(MNIST_LAYERS) + list(MNIST_LAYERS[-2::-1])))}, "
          f"batch {args.batch}, float32, {device}, {torch.get_num_threads()} threads, {args.reps} interleaved reps")
    print(f"{'candidate':<20} {'median ms':>10} {'/ gradient':>11}")
    for k in medians:
        print(f"{k:<20} {1e3 * medians[k]:>10.1f} {ratios[k]:>11.3f}")
    print(f"(func_mv agrees with ggn_mv to {err:.1e}; autograd L'' to {err_generic:.1e})")
    print(f"RESULT product/gradient = {ratios['ggn_mv']:.3f} (target <= 1.25); uncached = {ratios['uncached_mv']:.3f}")
    result = {"batch": args.batch, "device": str(device), "threads": torch.get_num_threads(),
              "median_s": medians, "ratio_to_gradient": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return result


if __name__ == "__main__":
    main()
