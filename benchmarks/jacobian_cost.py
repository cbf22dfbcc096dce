"""What the outputs' Jacobian J costs, read off the closure's graph
(``torch_hf.curvature.jacobian.graph_jacobian``) against ``vmap`` of ``jacrev`` point by point
(``PointwiseResiduals.jacobian``), and J Jᵀ by blocks (``torch_hf.dense.gram``) against
``J @ J.t()``; interleaved repetitions, medians, printed as ratios to one gradient
(one backward pass of the batched closure) on the same residuals.

On the Poisson instances of Dangel et al. (2024) (``recipes/pinns.py``):

    python benchmarks/jacobian_cost.py --threads 1
    python benchmarks/jacobian_cost.py --threads 1 --problem heat4d_116865 --reps 1   # minutes
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks._common import interleaved  # noqa: E402
from recipes.pinns import BENCHMARK  # noqa: E402
from torch_hf.curvature.jacobian import graph_jacobian  # noqa: E402
from torch_hf.dense import gram  # noqa: E402


def measure(problem_name: str, reps: int) -> dict[str, float]:
    problem = BENCHMARK[problem_name][0]()
    model = problem.model()
    params = list(model.parameters())
    pointwise = problem.pointwise(model)
    loss, r = problem.loss(model)
    buffer = graph_jacobian(r, params)
    if buffer is None:
        raise RuntimeError(f"{problem_name}: J could not be read off the graph")
    J = buffer

    def gradient():
        torch.autograd.grad(loss, params, retain_graph=True)

    times = interleaved({
        "gradient": gradient,
        "graph J": lambda: graph_jacobian(r, params, out=buffer),
        "vmap(jacrev) J": lambda: pointwise.jacobian(params),
        "J @ J.t()": lambda: J @ J.t(),
        "gram(J)": lambda: gram(J),
    }, reps=reps, warmup=1)
    agree = float((pointwise.jacobian(params) - J).abs().max() / J.abs().max())
    return {**times, "max relative difference of the two J": agree, "M": J.shape[0], "n": J.shape[1]}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", nargs="+", default=["poisson2d_257", "poisson2d_9873"], choices=sorted(BENCHMARK))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    print("| problem (M × n) | graph J | vmap(jacrev) J | J @ J.t() | gram(J) | graph ÷ vmap | gram ÷ matmul |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.problem:
        t = measure(name, args.reps)
        g = t["gradient"]
        print(f"| {name} ({t['M']} × {t['n']}) | {t['graph J'] / g:.1f} gradients | {t['vmap(jacrev) J'] / g:.1f} "
              f"| {t['J @ J.t()'] / g:.1f} | {t['gram(J)'] / g:.1f} | {t['graph J'] / t['vmap(jacrev) J']:.2f} "
              f"| {t['gram(J)'] / t['J @ J.t()']:.2f} |  (J agree to {t['max relative difference of the two J']:.0e})")


if __name__ == "__main__":
    main()
