"""What the outputs' Jacobian J costs, read off the closure's graph
(``torch_hf.curvature.jacobian.graph_jacobian``) against ``vmap`` of ``jacrev`` point by point
(``PointwiseResiduals.jacobian``), and J Jᵀ by blocks (``torch_hf.dense.gram``) against
``J @ J.t()``; interleaved repetitions, medians, printed as ratios to one gradient
(one backward pass of the batched closure) on the same residuals.

On the Poisson instances of Dangel et al. (2024) (``recipes/pinns.py``):

    python benchmarks/jacobian_cost.py --threads 1
    python benchmarks/jacobian_cost.py --threads 1 --problem heat4d_116865 --reps 1   # minutes

Each row also gives the Gauss-Newton step δ = −Jᵀ(cJJᵀ + εI)⁻¹u at the initial point
(ε = GAUSS_NEWTON_DAMPING · mean diag, as the optimizer takes it) from the two J, which
agree to rounding: its norm, the network's, and how far apart the two steps are (a measure
of how ill-conditioned the undamped step is).

``--gram M N [M N ...]``: J Jᵀ by blocks against ``J @ J.t()`` on random M × N matrices
(process CPU time, interleaved, medians), e.g. ``--gram 3021 10200 2000 2600 9873 1020``.

``--sketch``: the damped residual-space step δ = −Jᵀ(cJJᵀ + sI)⁻¹u two ways on each
problem's J, the Gram matrix and a Cholesky (``residual_solve``) against CG preconditioned
with a column Nyström sketch (``sketched_residual_solve``, the ranks of ``--ranks``), for the
shifts of ``--shifts``: process CPU time, CG iterations, how far apart the two steps are and
their q's (relative). ``--tolerance`` sets CG's relative residual (the optimizer's: 1e-9 on a
deterministic objective, 1e-3 on a stochastic one, ``SKETCH_STOCHASTIC_TOLERANCE``).
``--weights PATH`` evaluates J at a network's saved ``state_dict`` instead of the initial
point (a trained network's JJᵀ has more eigenvalues above a small s):

    python benchmarks/jacobian_cost.py --threads 1 --problem heat4d_116865 --sketch   # minutes
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
from torch_hf.dense import (GAUSS_NEWTON_DAMPING, SKETCH_TOLERANCE, gram, residual_solve,  # noqa: E402
                            sketched_residual_solve)


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
    J_vmap = pointwise.jacobian(params)
    agree = float((J_vmap - J).abs().max() / J.abs().max())
    u = torch.autograd.grad(loss, r, retain_graph=True)[0].reshape(-1)
    steps = [gauss_newton_step(Jx, u) for Jx in (J, J_vmap)]
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    return {**times, "max relative difference of the two J": agree, "M": J.shape[0], "n": J.shape[1],
            "step norm": float(steps[0].norm()), "weights norm": float(theta.norm()),
            "steps apart": float((steps[0] - steps[1]).norm() / steps[1].norm())}


def gauss_newton_step(J: torch.Tensor, u: torch.Tensor, c: float = 2.0) -> torch.Tensor:
    """−Jᵀ(cJJᵀ + εI)⁻¹u with the optimizer's ε (a sum of squares: c = 2)."""
    K = c * gram(J)
    K.diagonal().add_(GAUSS_NEWTON_DAMPING * float(K.trace()) / J.shape[1])
    return -(J.t() @ torch.cholesky_solve(u.reshape(-1, 1), torch.linalg.cholesky(K)).squeeze(1))


def gram_against_matmul(shapes: list[int], reps: int) -> None:
    """gram(J) ÷ J @ J.t() in process CPU time on random J of the given (M, N) pairs."""
    import time

    print("| J (M × N) | J @ J.t() | gram(J) | gram ÷ matmul |")
    print("| --- | --- | --- | --- |")
    for m, n in zip(shapes[::2], shapes[1::2]):
        J = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        times: dict[str, list[float]] = {"matmul": [], "gram": []}
        for _ in range(reps):
            for name, fn in (("matmul", lambda: J @ J.t()), ("gram", lambda: gram(J))):
                t0 = time.process_time()
                fn()
                times[name].append(time.process_time() - t0)
        a, b = (sorted(times[k])[len(times[k]) // 2] for k in ("matmul", "gram"))
        print(f"| {m} × {n} | {a:.3f} s | {b:.3f} s | {b / a:.2f} |")


def sketch_against_gram(problem_name: str, shifts: list[float], ranks: list[int], weights: str | None,
                        tolerance: float = SKETCH_TOLERANCE) -> None:
    """The damped step by the Gram matrix and Cholesky against the sketched CG, process CPU time."""
    import time

    problem = BENCHMARK[problem_name][0]()
    model = problem.model()
    if weights:
        model.load_state_dict(torch.load(weights))
    params = list(model.parameters())
    loss, r = problem.loss(model)
    J = graph_jacobian(r, params)
    if J is None:
        raise RuntimeError(f"{problem_name}: J could not be read off the graph")
    u = torch.autograd.grad(loss, r)[0].reshape(-1).detach()
    grad, c = J.t() @ u, 2.0
    for s in shifts:
        t0 = time.process_time()
        exact = residual_solve(J, c, s, u, grad)
        t_gram = time.process_time() - t0
        cells = []
        for rank in ranks:
            t0 = time.process_time()
            got = sketched_residual_solve(J, c, s, u, rank, 10_000, tolerance, torch.Generator().manual_seed(0))
            t = time.process_time() - t0
            if got is None:
                cells.append(f"{t:.1f} s (not converged)")
                continue
            apart = float((got.x - exact.x).norm() / exact.x.norm())
            q_apart = abs(got.q - exact.q) / abs(exact.q)
            cells.append(f"{t:.1f} s ({got.iterations} it., {apart:.0e} apart, q {q_apart:.0e})")
        print(f"| {problem_name} ({J.shape[0]} × {J.shape[1]}) | {s:.0e} | {t_gram:.1f} s | " + " | ".join(cells) + " |")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", nargs="+", default=["poisson2d_257", "poisson2d_9873"], choices=sorted(BENCHMARK))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gram", type=int, nargs="+", metavar="M N", help="time gram(J) on random M × N matrices only")
    ap.add_argument("--sketch", action="store_true", help="the damped step by the Gram matrix against the sketched CG")
    ap.add_argument("--shifts", type=float, nargs="+", default=[1e-3, 1e-5, 1e-7], help="s for --sketch")
    ap.add_argument("--ranks", type=int, nargs="+", default=[256, 512], help="sketch ranks for --sketch")
    ap.add_argument("--weights", help="--sketch: a state_dict of the problem's network to evaluate J at")
    ap.add_argument("--tolerance", type=float, default=SKETCH_TOLERANCE,
                    help="--sketch: CG's relative residual (default %(default)s; 1e-3 is the optimizer's on "
                         "a stochastic objective)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.sketch:
        print("| problem (M × n) | s | Gram + Cholesky | " + " | ".join(f"sketch of rank {k}" for k in args.ranks) + " |")
        print("| --- | --- | --- | " + " | ".join("---" for _ in args.ranks) + " |")
        for name in args.problem:
            sketch_against_gram(name, args.shifts, args.ranks, args.weights, args.tolerance)
        return
    if args.gram:
        if len(args.gram) % 2:
            ap.error("--gram takes pairs M N")
        gram_against_matmul(args.gram, max(args.reps, 3))
        return
    print("| problem (M × n) | graph J | vmap(jacrev) J | J @ J.t() | gram(J) | graph ÷ vmap | gram ÷ matmul |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name in args.problem:
        t = measure(name, args.reps)
        g = t["gradient"]
        print(f"| {name} ({t['M']} × {t['n']}) | {t['graph J'] / g:.1f} gradients | {t['vmap(jacrev) J'] / g:.1f} "
              f"| {t['J @ J.t()'] / g:.1f} | {t['gram(J)'] / g:.1f} | {t['graph J'] / t['vmap(jacrev) J']:.2f} "
              f"| {t['gram(J)'] / t['J @ J.t()']:.2f} |  (J agree to {t['max relative difference of the two J']:.0e}; "
              f"Gauss-Newton step norm {t['step norm']:.3g} against weights {t['weights norm']:.3g}, "
              f"the two J's steps {t['steps apart']:.1e} apart)")


if __name__ == "__main__":
    main()
