"""What the dense exact solve costs against CG's products (torch_hf/dense.py): the
threshold of ``solver="auto"``.

On the PINN instances of Dangel et al. (2024) (``recipes/pinns.py``; tanh MLPs, 900 + 120
residuals) and on a least-squares regression, interleaved repetitions, medians:

* one GGN product (what one CG iteration costs);
* ``GGN.dense()`` (the n × n matrix from n forward columns), printed per column in products:
  the constant ``DENSE_PRODUCTS_PER_COLUMN`` of ``torch_hf/dense.py``;
* the Cholesky solve, in products;

and the break-even CG length: the dense solve is cheaper than CG once CG runs more than
this many iterations.

    python benchmarks/dense_solve.py --threads 1
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved  # noqa: E402
from recipes.pinns import DangelPoisson  # noqa: E402
from torch_hf.dense import dense_solve  # noqa: E402


def regression(width: int, n: int = 2000):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(2, width), torch.nn.Tanh(), torch.nn.Linear(width, width),
                                torch.nn.Tanh(), torch.nn.Linear(width, 1)).double()
    x = torch.rand(n, 2, dtype=torch.float64)
    y = torch.sin(3 * x).prod(1, keepdim=True)

    def closure():
        z = model(x)
        return torch.nn.functional.mse_loss(z, y), z

    return model, closure


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {"PINN 2-64-1 (257)": lambda: _pinn("mlp-tanh-64"),
             "regression 2-16-16-1 (337)": lambda: regression(16),
             "regression 2-32-32-1 (1153)": lambda: regression(32)}
    print("| problem (n) | product | dense matrix per column | Cholesky solve | break-even CG iterations |")
    print("| --- | --- | --- | --- | --- |")
    for name, build in cases.items():
        model, closure = build()
        op = torch_hf.GGN(list(model.parameters()), closure)
        v = torch.randn(op.numel, dtype=op.grad.dtype)
        B = op.dense()
        t = interleaved({"product": lambda: op.mv(v), "dense": op.dense,
                         "solve": lambda: dense_solve(B, 1e-3, 0.0, op.grad)}, args.reps, warmup=1)
        per_column = t["dense"] / t["product"] / op.numel
        solve = t["solve"] / t["product"]
        print(f"| {name} | 1 | {per_column:.2f} | {solve:.1f} | {per_column * op.numel + solve:.0f} |")


def _pinn(arch: str):
    problem = DangelPoisson(arch)
    model = problem.model()
    return model, lambda: problem.loss(model)


if __name__ == "__main__":
    main()
