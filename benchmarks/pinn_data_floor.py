"""The error floor that the data of a Poisson instance of Dangel et al. (2024) set, whatever
the optimizer.

Their data loader draws the points in float32 and computes the targets in float32 before
casting to float64 (``recipes/pinns.py`` does the same): f = 2π² sin(πx) sin(πy) carries
rounding errors of about 1e-6, and u = sin(πx) sin(πy) on the faces x = 1 and y = 1 is
sin(float32(π)) · sin(π·) ≈ −8.7e-8 · sin(π·) instead of 0. A fit to these targets is a fit
to a slightly different problem, so its L2 error against u* cannot fall much below what the
perturbation moves the solution by.

This script measures that floor without any network or optimizer: it minimises the
benchmark's own loss ½·mean(r_Ω²) + ½·mean(r_∂Ω²), on the instance's own points, over the
linear space of tensor-product Legendre polynomials of degree ≤ p in x and in y
((p + 1)² coefficients; p = 15 gives 256, the 257-parameter network's size), exactly (a
least-squares solve in float64), once with the instance's float32 targets and once with
the same points' targets computed in float64. With float64 targets the fit's error falls to
about 1e-12 (the space holds u* to that accuracy), so what the float32 targets leave is the
data's floor, not the model's:

    python benchmarks/pinn_data_floor.py                          # poisson2d_257, seconds
    python benchmarks/pinn_data_floor.py --problem poisson2d_9873 --degrees 10 15 20

The score is the benchmark's: the root mean square of u − u* over the instance's 9,000
evaluation points (absolute).
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from numpy.polynomial import legendre

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from recipes.pinns import BENCHMARK, DangelPoisson, best_published  # noqa: E402


def legendre_basis(x: np.ndarray, degree: int, derivative: int = 0) -> np.ndarray:
    """P_k(2x − 1) for k = 0…degree (or its ``derivative``-th derivative in x), shape (len(x), degree + 1)."""
    # the identity's columns are P_0…P_degree; legder differentiates them all (d/dx = 2 d/dt)
    coefficients = legendre.legder(np.eye(degree + 1), derivative) * 2.0 ** derivative
    return legendre.legval(2.0 * x - 1.0, coefficients).T


def tensor(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise outer products: the tensor-product basis from the x and y bases."""
    return np.einsum("ni,nj->nij", a, b).reshape(len(a), -1)


def polynomial_fit(problem: DangelPoisson, degree: int, targets: str) -> tuple[float, float]:
    """The exact minimiser of the instance's loss over polynomials of degree ≤ ``degree`` in each
    variable, with its ``targets`` ("float32": the instance's; "float64": the same points'
    targets in float64); returns (loss, L2 error)."""
    xi, xb = problem.x_int.numpy(), problem.x_bnd.numpy()
    if targets == "float32":
        f, g = problem.f_int.numpy(), problem.g_bnd.numpy()
    else:
        f, g = problem.forcing(problem.x_int).numpy(), problem.exact(problem.x_bnd).numpy()
    bx, by = legendre_basis(xi[:, 0], degree), legendre_basis(xi[:, 1], degree)
    laplacian = tensor(legendre_basis(xi[:, 0], degree, 2), by) + tensor(bx, legendre_basis(xi[:, 1], degree, 2))
    boundary = tensor(legendre_basis(xb[:, 0], degree), legendre_basis(xb[:, 1], degree))
    wi, wb = 1.0 / np.sqrt(2 * len(xi)), 1.0 / np.sqrt(2 * len(xb))  # the loss's ½·mean as a sum of squares
    a = np.vstack([-laplacian * wi, boundary * wb])
    b = np.concatenate([f * wi, g * wb])
    coefficients, *_ = np.linalg.lstsq(a, b, rcond=None)
    loss = float(((a @ coefficients - b) ** 2).sum())
    xe = problem.x_eval.numpy()
    u = tensor(legendre_basis(xe[:, 0], degree), legendre_basis(xe[:, 1], degree)) @ coefficients
    return loss, float(np.sqrt(((u - problem.u_eval.numpy()) ** 2).mean()))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    poisson = sorted(k for k in BENCHMARK if k.startswith("poisson2d"))
    ap.add_argument("--problem", choices=poisson, default="poisson2d_257")
    ap.add_argument("--degrees", type=int, nargs="+", default=[10, 12, 14, 15, 17])
    ap.add_argument("--data-seed", type=int, default=None,
                    help="another instance (as recipes/scientific.py --data-seed); default: theirs")
    args = ap.parse_args(argv)
    if any(p < 2 for p in args.degrees):
        ap.error("--degrees must be at least 2 (the Laplacian of a linear polynomial is 0)")
    factory, _, _ = BENCHMARK[args.problem]
    problem = factory(**({} if args.data_seed is None else {"data_seed": args.data_seed}))
    best, figure = best_published(args.problem)
    print(f"{args.problem}: {problem.n_interior} interior + {problem.n_boundary} boundary points; "
          f"published best {best} {figure:.2g}")
    print("| degree | coefficients | float32 targets: loss | L2 error | float64 targets: loss | L2 error |")
    print("| --- | --- | --- | --- | --- | --- |")
    rows = []
    for p in args.degrees:
        (l32, e32), (l64, e64) = (polynomial_fit(problem, p, t) for t in ("float32", "float64"))
        rows.append({"degree": p, "coefficients": (p + 1) ** 2, "float32": [l32, e32], "float64": [l64, e64]})
        print(f"| {p} | {(p + 1) ** 2} | {l32:.2e} | {e32:.2e} | {l64:.2e} | {e64:.2e} |")
    return rows


if __name__ == "__main__":
    main()
