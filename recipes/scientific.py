"""Scientific ML, where second order pays: a 2-D Poisson PINN and a high-precision regression.

    python recipes/scientific.py                                    # the main job: HF, Adam, L-BFGS, ~5 min
    python recipes/scientific.py --optimizer hf                     # HF alone
    python recipes/scientific.py --optimizer adam --lr 1e-3
    python recipes/scientific.py --problem regression --optimizer all --time-budget 300

Both problems are full-batch, float64, with a tanh MLP 2-32-32-1 (PyTorch's default init):

* ``pinn``: −Δu = f on the unit square, u = 0 on its boundary, f = 2π² sin(πx) sin(πy)
  (so u* = sin(πx) sin(πy)); 900 random interior and 400 boundary collocation points.
  The closure computes Δu with ``torch.autograd.grad`` of the network w.r.t. its inputs
  and returns the residual vector r = (Δu + f over √N_int, u_boundary over √N_b) as the
  outputs with loss ‖r‖² (the standard PINN loss), so HF's GGN is the Gauss-Newton
  matrix of the residuals. The score is the relative L2 error of u on a 101×101 grid.
* ``reaction_diffusion``: a nonlinear, time-dependent PINN, u_t − 0.1 u_xx + u³ = f on
  (0, 1) × (0, 1] with u* = e^{−t} sin(πx) (initial and boundary conditions from u*).
* ``schrodinger``: the nonlinear Schrödinger equation i h_t + ½ h_xx + |h|² h = 0 for
  h = u + iv, a system of two equations with a two-output network, the soliton
  h* = sech(x) e^{it/2} on (−5, 5) × (0, π/2]; HF gets the plain batched closure.
* ``regression``: fit u*(x, y) = sin(πx)·cos(πy) + ½·sin(2πxy) on [-1, 1]² from 2000
  random points; the score is the MSE on 2000 other points (``test_error``).

Optimizers: ``hf`` (torch_hf.HessianFree with the library's defaults; the PINNs hand it their
residuals point by point, ``torch_hf.residuals.PointwiseResiduals``, so from the second step
it solves each Gauss-Newton step exactly, in residual space when the residuals are fewer than
the parameters), ``engd`` (a Gauss-Newton step with fixed λ = 1e-10 and a line search,
as Dangel et al. ran ENGD), ``adam`` (``--lr``),
``lbfgs`` (``torch.optim.LBFGS`` with strong Wolfe line search, the usual second-order
baseline of the PINN literature), or ``all`` (the default): HF, Adam at 1e-3, 3e-3 and
1e-2 (its learning rate tuned over three values) and L-BFGS one after another, each with
the same budget of process CPU time on one thread, then a table of the scores and one plot.
Results go to ``--out`` as JSON (``{"config", "history", "final"}``) and a PNG of the
score against training time and against updates (log scale).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

if __package__ in (None, ""):  # run as a script: make ``recipes`` and ``torch_hf`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch_hf  # noqa: E402
from recipes.cli import add_overwrite_option, check_args, refuse_overwrite, time_report  # noqa: E402
from recipes.pinns import BENCHMARK, published_table  # noqa: E402
from recipes.plot import plot_results  # noqa: E402
from recipes.runner import (Budget, Run, add_clock_option, add_subnormal_option, diverged,  # noqa: E402
                            subnormals_flushed, write_json)
from recipes.runner import output_paths as _output_paths  # noqa: E402

DEFAULT_TIME_BUDGET = 120.0
ADAM_LRS = (1e-3, 3e-3, 1e-2)
SCORE = {"regression": "test MSE", "pinn": "relative L2 error", "reaction_diffusion": "relative L2 error",
         "schrodinger": "relative L2 error"}
# What the default job printed on a 2-core CPU (docs/scientific.md has the command and the run).
EXPECTED = ("Expected at 120 s (2-core x86 CPU, docs/scientific.md): HF about 5e-7, L-BFGS about 2.8e-4 (it "
            "stalls after about 45 s), Adam 5e-3 to 1e-2: HF some 500x below L-BFGS and 10,000x below Adam.")


def mlp(width: int = 32, depth: int = 2, generator_seed: int = 0, outputs: int = 1) -> nn.Sequential:
    """tanh MLP 2-width-…-width-``outputs`` in float64 with PyTorch's default initialisation."""
    torch.manual_seed(generator_seed)
    layers: list[nn.Module] = []
    sizes = [2] + [width] * depth
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b), nn.Tanh()]
    layers.append(nn.Linear(sizes[-1], outputs))
    return nn.Sequential(*layers).double()


class Problem:
    """A full-batch problem: ``residuals(model)`` (what the loss squares) and ``score(model)``."""

    name: str

    def terms(self, model: nn.Module) -> tuple[Tensor, ...]:  # pragma: no cover - abstract
        """The residual terms, each weighing as the mean of its squares."""
        raise NotImplementedError

    def residuals(self, model: nn.Module) -> Tensor:
        """The scaled residual vector r, loss = ‖r‖² (:func:`torch_hf.residuals.residual_loss`)."""
        return self.loss(model)[1]

    def score(self, model: nn.Module) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    def loss(self, model: nn.Module) -> tuple[Tensor, Tensor]:
        """``(loss, outputs)`` for HF: the outputs are the residuals, the loss ‖r‖²
        (a squared-error matching loss, §6.2, so L'' = 2I in closed form)."""
        return torch_hf.residuals.residual_loss(*self.terms(model))


class Regression(Problem):
    """Least squares on a smooth 2-D function; residuals (u(x) − u*(x))/√N."""

    name = "regression"

    def __init__(self, n_train: int = 2000, n_test: int = 2000, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x_train = torch.rand(n_train, 2, generator=gen, dtype=torch.float64) * 2 - 1
        self.x_test = torch.rand(n_test, 2, generator=gen, dtype=torch.float64) * 2 - 1
        self.y_train, self.y_test = self.target(self.x_train), self.target(self.x_test)

    @staticmethod
    def target(x: Tensor) -> Tensor:
        return torch.sin(math.pi * x[:, 0]) * torch.cos(math.pi * x[:, 1]) + 0.5 * torch.sin(2 * math.pi * x[:, 0] * x[:, 1])

    def terms(self, model: nn.Module) -> tuple[Tensor, ...]:
        return (model(self.x_train).squeeze(-1) - self.y_train,)

    def train_mse(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(((model(self.x_train).squeeze(-1) - self.y_train) ** 2).mean())

    def score(self, model: nn.Module) -> float:
        with torch.no_grad():
            return float(((model(self.x_test).squeeze(-1) - self.y_test) ** 2).mean())


def laplacian(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(u, Δu)`` at the points ``x`` (N × 2): :func:`torch_hf.residuals.laplacian`."""
    return torch_hf.residuals.laplacian(model, x)


class Poisson(Problem):
    """−Δu = 2π² sin(πx) sin(πy) on (0, 1)², u = 0 on the boundary; u* = sin(πx) sin(πy)."""

    name = "pinn"

    def __init__(self, n_interior: int = 900, n_boundary: int = 400, grid: int = 101, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x_int = torch.rand(n_interior, 2, generator=gen, dtype=torch.float64)
        side = n_boundary // 4
        t = torch.rand(4, side, generator=gen, dtype=torch.float64)
        zeros, ones = torch.zeros(side, dtype=torch.float64), torch.ones(side, dtype=torch.float64)
        self.x_bnd = torch.cat([torch.stack(p, 1) for p in
                                ((t[0], zeros), (t[1], ones), (zeros, t[2]), (ones, t[3]))])
        self.f_int = 2 * math.pi**2 * self.exact(self.x_int)
        g = torch.linspace(0, 1, grid, dtype=torch.float64)
        self.x_eval = torch.cartesian_prod(g, g)
        self.u_eval = self.exact(self.x_eval)

    @staticmethod
    def exact(x: Tensor) -> Tensor:
        return torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])

    def terms(self, model: nn.Module) -> tuple[Tensor, ...]:
        _, lap = laplacian(model, self.x_int)
        return lap + self.f_int, model(self.x_bnd).squeeze(-1)

    def pointwise(self, model: nn.Module) -> torch_hf.residuals.PointwiseResiduals:
        """The same residuals point by point (a closure that also gives their Jacobian)."""
        return torch_hf.residuals.PointwiseResiduals(model, [
            (lambda u, x, f: torch_hf.residuals.laplacian_at(u, x) + f, self.x_int, self.f_int),
            (lambda u, x: u(x), self.x_bnd)])

    def score(self, model: nn.Module) -> float:
        with torch.no_grad():
            u = model(self.x_eval).squeeze(-1)
        return float((u - self.u_eval).norm() / self.u_eval.norm())


class ReactionDiffusion(Problem):
    """A nonlinear, time-dependent PINN: u_t − ν u_xx + u³ = f on x ∈ (0, 1), t ∈ (0, 1], with
    u(x, 0) = sin(πx) and u(0, t) = u(1, t) = 0; f is made so that u* = e^{−t} sin(πx)
    (ν = 0.1). The inputs are (x, t); the residual terms are the PDE at 1,000 random
    interior points, the initial condition at 100 and the boundary at 100 (each a mean
    square, :func:`torch_hf.residuals.residual_loss`); the score is the relative L2 error
    of u on a 101 × 101 grid of (x, t)."""

    name = "reaction_diffusion"
    nu = 0.1

    def __init__(self, n_interior: int = 1000, n_initial: int = 100, n_boundary: int = 100, grid: int = 101,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.x_int = torch.rand(n_interior, 2, generator=gen, dtype=torch.float64)
        x0 = torch.rand(n_initial, generator=gen, dtype=torch.float64)
        self.x_init = torch.stack([x0, torch.zeros_like(x0)], 1)
        tb = torch.rand(n_boundary, generator=gen, dtype=torch.float64)
        self.x_bnd = torch.stack([(torch.arange(n_boundary) % 2).double(), tb], 1)
        x, t = self.x_int[:, 0], self.x_int[:, 1]
        s = torch.sin(math.pi * x)
        self.f_int = torch.exp(-t) * s * (self.nu * math.pi**2 - 1) + torch.exp(-3 * t) * s**3
        g = torch.linspace(0, 1, grid, dtype=torch.float64)
        self.x_eval = torch.cartesian_prod(g, g)
        self.u_eval = self.exact(self.x_eval)

    @staticmethod
    def exact(xt: Tensor) -> Tensor:
        return torch.exp(-xt[:, 1]) * torch.sin(math.pi * xt[:, 0])

    def terms(self, model: nn.Module) -> tuple[Tensor, ...]:
        xt = self.x_int.detach().requires_grad_(True)
        u = model(xt).squeeze(-1)
        du = torch_hf.residuals.gradient(u, xt)
        (d2u,) = torch.autograd.grad(du[:, 0].sum(), xt, create_graph=True)
        pde = du[:, 1] - self.nu * d2u[:, 0] + u**3 - self.f_int
        initial = model(self.x_init).squeeze(-1) - torch.sin(math.pi * self.x_init[:, 0])
        return pde, initial, model(self.x_bnd).squeeze(-1)

    def pointwise(self, model: nn.Module) -> torch_hf.residuals.PointwiseResiduals:
        """The same residuals point by point (a closure that also gives their Jacobian)."""
        nu = self.nu

        def pde(u, xt, f):
            du = torch.func.grad(u)(xt)
            return du[1] - nu * torch.func.hessian(u)(xt)[0, 0] + u(xt) ** 3 - f

        return torch_hf.residuals.PointwiseResiduals(model, [
            (pde, self.x_int, self.f_int),
            (lambda u, xt: u(xt) - torch.sin(math.pi * xt[0]), self.x_init),
            (lambda u, xt: u(xt), self.x_bnd)])

    def score(self, model: nn.Module) -> float:
        with torch.no_grad():
            u = model(self.x_eval).squeeze(-1)
        return float((u - self.u_eval).norm() / self.u_eval.norm())


class Schrodinger(Problem):
    """A system of two nonlinear, time-dependent equations: the focusing nonlinear
    Schrödinger equation i h_t + ½ h_xx + |h|² h = 0 for h = u + iv on x ∈ (−5, 5),
    t ∈ (0, π/2], with the soliton h* = sech(x) e^{it/2} (initial and boundary values from
    it). The network maps (x, t) to (u, v); the residual terms are the equation's real and
    imaginary parts at 2,000 random interior points, the initial values (u, v) at 200 points
    and the boundary values at 200: each interior point gives two outputs, so HF reads J off
    the graph term by term (:mod:`torch_hf.curvature.jacobian`). No point-by-point closure:
    HF gets the plain batched closure a user writes. Score: the relative L2 error of
    (u, v) on a 101 × 101 grid."""

    name = "schrodinger"
    outputs = 2

    def __init__(self, n_interior: int = 2000, n_initial: int = 200, n_boundary: int = 200, grid: int = 101,
                 seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        self.lo = torch.tensor([-5.0, 0.0], dtype=torch.float64)
        self.span = torch.tensor([10.0, math.pi / 2], dtype=torch.float64)
        self.x_int = self.lo + self.span * torch.rand(n_interior, 2, generator=gen, dtype=torch.float64)
        x0 = -5 + 10 * torch.rand(n_initial, generator=gen, dtype=torch.float64)
        self.x_init = torch.stack([x0, torch.zeros_like(x0)], 1)
        tb = math.pi / 2 * torch.rand(n_boundary, generator=gen, dtype=torch.float64)
        self.x_bnd = torch.stack([10 * (torch.arange(n_boundary) % 2).double() - 5, tb], 1)
        self.h_init, self.h_bnd = self.exact(self.x_init), self.exact(self.x_bnd)
        gx = torch.linspace(-5, 5, grid, dtype=torch.float64)
        gt = torch.linspace(0, math.pi / 2, grid, dtype=torch.float64)
        self.x_eval = torch.cartesian_prod(gx, gt)
        self.h_eval = self.exact(self.x_eval)

    @staticmethod
    def exact(xt: Tensor) -> Tensor:
        """(u, v) of the soliton, N × 2."""
        sech = 1 / torch.cosh(xt[:, 0])
        return torch.stack([sech * torch.cos(xt[:, 1] / 2), sech * torch.sin(xt[:, 1] / 2)], 1)

    def terms(self, model: nn.Module) -> tuple[Tensor, ...]:
        grad = torch_hf.residuals.gradient
        xt = self.x_int.detach().requires_grad_(True)
        h = model(xt)
        u, v = h[:, 0], h[:, 1]
        du, dv = grad(u, xt), grad(v, xt)
        uxx, vxx = grad(du[:, 0], xt)[:, 0], grad(dv[:, 0], xt)[:, 0]
        sq = u**2 + v**2
        return (-dv[:, 1] + 0.5 * uxx + sq * u, du[:, 1] + 0.5 * vxx + sq * v,
                model(self.x_init) - self.h_init, model(self.x_bnd) - self.h_bnd)

    def score(self, model: nn.Module) -> float:
        with torch.no_grad():
            h = model(self.x_eval)
        return float((h - self.h_eval).norm() / self.h_eval.norm())


PROBLEMS: dict[str, Callable[..., Problem]] = {"regression": Regression, "pinn": Poisson,
                                              "reaction_diffusion": ReactionDiffusion, "schrodinger": Schrodinger}
TITLES = {"regression": "smooth 2-D regression", "pinn": "2-D Poisson PINN",
          "reaction_diffusion": "reaction-diffusion PINN (nonlinear, time-dependent)",
          "schrodinger": "nonlinear Schrödinger PINN (a system, two outputs)"}
# The instances of Dangel et al. (2024), recipes/pinns.py; each brings its own network.
for _name, (_factory, _params, _budget) in BENCHMARK.items():
    PROBLEMS[_name] = _factory
    SCORE[_name] = "L2 error (RMS)"
    TITLES[_name] = f"Dangel et al. (2024) {_name.replace('_', ', D = ')}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=f"Default: the PINN with every optimizer, {DEFAULT_TIME_BUDGET:.0f} s of CPU "
                                        f"time each on one thread. {EXPECTED}")
    ap.add_argument("--problem", choices=sorted(PROBLEMS), default="pinn")
    ap.add_argument("--optimizer", choices=["hf", "adam", "lbfgs", "engd", "all"], default="all",
                    help="'all' (default): HF, Adam at lr 1e-3/3e-3/1e-2 and L-BFGS, one after another")
    ap.add_argument("--preconditioner", choices=["default", "none"], default="default",
                    help="HF: the library's default (GGN diagonal, §11.4) or none; the PINN's per-case diagonal "
                         "is not available (its weights are shared across the Laplacian's passes), so the "
                         "estimate is a whole-batch one")
    ap.add_argument("--cg-stop", choices=["auto", "progress", "rate"], default="auto",
                    help="HF: CG's termination (default auto, the library's: progress once the objective is seen to be "
                         "deterministic, rate otherwise)")
    ap.add_argument("--solver", choices=["auto", "cg", "dense"], default="auto",
                    help="HF: how the step is solved (default auto, the library's: the dense exact solve for a small "
                         "deterministic problem once CG costs more, CG otherwise)")
    ap.add_argument("--damping", type=float, default=None, help="HF: initial lambda (library default 1)")
    ap.add_argument("--lr", type=float, default=None, help="Adam's learning rate (default 1e-3); L-BFGS: 1")
    ap.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                    help=f"seconds of training per optimizer, evaluations excluded (default {DEFAULT_TIME_BUDGET:.0f})")
    add_clock_option(ap, default="cpu")
    ap.add_argument("--max-iters", type=int, default=None, help="stop after this many updates")
    ap.add_argument("--eval-every", type=float, default=None, help="seconds between evaluations (default budget/60)")
    ap.add_argument("--resample-every", type=int, default=None,
                    help="Dangel et al.'s problems: draw the points afresh every N updates (heat4d_116865: 1 by "
                         "default, their HF and L-BFGS runs; their KFAC runs used 100)")
    ap.add_argument("--points", type=int, default=None,
                    help="interior collocation points of pinn / reaction_diffusion / schrodinger (default 900 / 1000 / 2000)")
    ap.add_argument("--closure", choices=("pointwise", "batched"), default="pointwise",
                    help="HF: a closure that also offers the residuals' Jacobian point by point where the "
                         "problem has it (default), or the plain batched closure a user writes with "
                         "residual_loss (J is then read off its graph once the objective is deterministic)")
    ap.add_argument("--width", type=int, default=32, help="hidden units per layer (default 32)")
    ap.add_argument("--depth", type=int, default=2, help="hidden layers (default 2)")
    ap.add_argument("--jobs", type=int, default=2,
                    help="--optimizer all: runs at a time, each in its own process on --threads threads (default 2; "
                         "with --clock cpu each run's budget is its own CPU time, so runs side by side stay fair)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch.set_num_threads (default 1: with --clock cpu, every optimizer gets the same "
                         "CPU time on one core)")
    add_subnormal_option(ap)
    ap.add_argument("--seed", type=int, default=0, help="the network's initialisation (the data are fixed)")
    ap.add_argument("--data-seed", type=int, default=None,
                    help="Dangel et al.'s problems: draw the points (and evaluation points) from this seed, "
                         "another instance of the same problem (default: theirs, the stream after the "
                         "network's initialisation; the network is theirs either way)")
    ap.add_argument("--exact-targets", action="store_true",
                    help="Dangel et al.'s problems: the targets at their float32 points computed in float64 "
                         "(theirs: in float32, whose rounding holds the Poisson error near 6e-8; "
                         "benchmarks/pinn_data_floor.py)")
    ap.add_argument("--out", default="results", help="directory for the JSON and PNG, or a .json file path")
    ap.add_argument("--tag", default=None, help="suffix of the output file names")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite_option(ap)
    ap.add_argument("--table", nargs="+", metavar="JSON", default=None,
                    help="print a markdown table of the score at 60 s and 300 s from these result files, and exit")
    return ap


def _check(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_args(ap, args, positive=("max_iters", "points", "resample_every", "width", "depth", "threads", "lr",
                                   "eval_every", "jobs", "damping"),
               non_negative=("time_budget",))
    if args.time_budget == 0 and not args.max_iters:
        ap.error("give a positive --time-budget or --max-iters")
    for flag, given in (("--resample-every", args.resample_every), ("--data-seed", args.data_seed is not None),
                        ("--exact-targets", args.exact_targets)):
        if given and args.problem not in BENCHMARK:
            ap.error(f"{flag} applies to Dangel et al.'s problems ({', '.join(sorted(BENCHMARK))}), "
                     f"not {args.problem}")


def make_optimizer(name: str, model: nn.Module, lr: float | None, preconditioner: str = "default",
                   cg_stop: str = "auto", damping: float | None = None, solver: str = "auto") -> torch.optim.Optimizer:
    if name == "hf":  # the library's defaults
        pre = torch_hf.preconditioners.Identity() if preconditioner == "none" else None
        lam = None if damping is None else torch_hf.damping.Tikhonov(damping)
        return torch_hf.HessianFree(model.parameters(), damping=lam, preconditioner=pre, cg_stop=cg_stop,
                                    solver=solver)
    if name == "engd":
        # ENGD as Dangel et al. ran it (a Gauss-Newton step with a tiny fixed damping and a
        # line search on the step length), built from the library's parts: the dense exact
        # solve, λ fixed at 1e-10, no CG, Armijo backtracking by halves over 30 lengths.
        return torch_hf.HessianFree(model.parameters(), solver="dense", damping=torch_hf.damping.Tikhonov(
            1e-10 if damping is None else damping, adapt=None), preconditioner=torch_hf.preconditioners.Identity(),
            cg_decay=0.0, line_search_beta=0.5, line_search_max_evals=30, line_search_c=1e-4)
    if name == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr if lr is not None else 1e-3)
    if name == "lbfgs":
        # 20 iterations per step() call, 50 pairs of history, strong Wolfe: the PINN literature's setting.
        return torch.optim.LBFGS(model.parameters(), lr=lr if lr is not None else 1.0, max_iter=20,
                                 history_size=50, line_search_fn="strong_wolfe",
                                 tolerance_grad=0.0, tolerance_change=0.0)
    raise ValueError(f"unknown optimizer {name!r}")


def run(cfg: dict, progress: bool = True) -> dict:
    """Train one optimizer as ``cfg`` says (the parsed CLI as a dict); returns the results dict.
    Every optimizer trains with subnormals flushed to zero unless ``cfg["keep_subnormals"]``
    (``recipes.runner.subnormals_flushed``; ``final["subnormals_flushed"]`` records it)."""
    with subnormals_flushed(not cfg.get("keep_subnormals")) as flushing:
        result = _train(cfg, progress)
    result["final"]["subnormals_flushed"] = flushing
    return result


def run_many(cfgs: list[dict], jobs: int, progress: bool = True) -> list[dict]:
    """:func:`run` for each config, ``jobs`` at a time in separate processes (one bar each),
    results in the order of ``cfgs``. One job runs in this process."""
    if jobs <= 1 or len(cfgs) <= 1:
        return [run(cfg, progress) for cfg in cfgs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(cfgs)), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run, dict(cfg, bar_position=i), progress) for i, cfg in enumerate(cfgs)]
        return [f.result() for f in futures]


def _train(cfg: dict, progress: bool) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    kwargs = {"n_interior": cfg["points"]} if cfg.get("points") else {}
    if cfg.get("data_seed") is not None:
        kwargs["data_seed"] = cfg["data_seed"]
    if cfg.get("exact_targets"):
        kwargs["exact_targets"] = True
    problem = PROBLEMS[cfg["problem"]](**kwargs)
    problem.batched_closure = cfg.get("closure") == "batched"
    if cfg.get("resample_every"):
        problem.resample_every = cfg["resample_every"]
    # A benchmark instance brings its network (architecture and seeds as published).
    model = problem.model() if hasattr(problem, "model") else mlp(cfg.get("width", 32), cfg.get("depth", 2),
                                                                   cfg.get("seed", 0), getattr(problem, "outputs", 1))
    opt = make_optimizer(cfg["optimizer"], model, cfg.get("lr"), cfg.get("preconditioner", "default"),
                         cfg.get("cg_stop") or "auto", cfg.get("damping"), cfg.get("solver") or "auto")
    budget = cfg.get("time_budget") or 0.0
    evals = [0]  # loss evaluations (L-BFGS makes several per step())

    def evaluate(it: int, train_time: float, extra: dict) -> dict:
        with torch.enable_grad():  # the PINN's residuals differentiate w.r.t. the inputs
            train_loss = float(problem.loss(model)[0].detach())
        # "epoch": full-batch passes, i.e. loss evaluations (HF's trial points, L-BFGS's line search)
        row = {"iter": it, "time_s": round(train_time, 4), "epoch": evals[0], "train_loss": train_loss,
               "train_error": train_loss, "test_error": problem.score(model)}
        if isinstance(problem, Regression):
            row["train_error"] = problem.train_mse(model)
        return {**row, **extra}

    run = Run(Budget(budget, cfg.get("max_iters"), cfg.get("clock"),
                     cfg.get("eval_every") or (budget / 60 if budget > 0 else None)),
              evaluate, f"{cfg['problem']} {_run_name(cfg)}", progress, cfg.get("bar_position"),
              postfix=lambda row: {"score": f"{row['test_error']:.3g}"})
    run.evaluate()
    status = run.loop(lambda: _update(cfg["optimizer"], opt, problem, model, evals),
                      diverged=lambda: diverged(model.parameters()))
    cfg_out = {k: v for k, v in cfg.items() if k not in ("no_progress", "bar_position")}
    cfg_out["score"] = SCORE[cfg["problem"]]
    return run.result(cfg_out, status, parameters=sum(p.numel() for p in model.parameters()),
                      torch_threads=torch.get_num_threads())


def _update(name: str, opt: torch.optim.Optimizer, problem: Problem, model: nn.Module, evals: list[int]) -> dict:
    """One update of optimizer ``name`` on the full batch; the fields it adds to the next
    evaluation row (HF's ρ, λ and CG iterations)."""
    if hasattr(problem, "advance"):  # a problem that draws fresh points every few steps
        problem.advance()

    # HF and ENGD get a closure that offers the residuals' Jacobian (its ``jacobian``, point by
    # point), which the optimizer takes as a wish for the exact solve whatever the regime; it
    # reads J off the batched closure's graph, and falls back to the point-by-point J.
    pointwise = problem.pointwise(model) if name in ("hf", "engd") and hasattr(problem, "pointwise") \
        and not getattr(problem, "batched_closure", False) else None

    def closure():
        evals[0] += 1
        if name in ("hf", "engd"):
            return problem.loss(model)
        opt.zero_grad(set_to_none=True)
        loss = problem.loss(model)[0]
        loss.backward()
        return loss

    if pointwise is not None:
        closure.jacobian = pointwise.jacobian
    if name in ("hf", "engd"):
        opt.step(closure)
        d = opt.last_step
        return {"rho": d.rho, "damping": d.damping, "cg_iterations": d.cg_iterations, "accepted": d.accepted,
                "solver": d.solver, "regime": d.regime}
    if name == "lbfgs":
        opt.step(closure)
    else:
        closure()
        opt.step()
    return {}


def score_at(result: dict, seconds: float) -> float:
    """The score of the last evaluation at or before ``seconds`` of training."""
    rows = [r for r in result["history"] if r["time_s"] <= seconds]
    return rows[-1]["test_error"] if rows else math.nan


def _run_name(cfg: dict) -> str:
    name = cfg["optimizer"] + (f" lr {cfg.get('lr') or 1e-3:g}" if cfg["optimizer"] == "adam" else "")
    if cfg["optimizer"] == "hf":
        name += " (no preconditioner)" if cfg.get("preconditioner") == "none" else ""
        name += f" (cg_stop {cfg['cg_stop']})" if cfg.get("cg_stop") not in (None, "auto") else ""
        name += f" (solver {cfg['solver']})" if cfg.get("solver") not in (None, "auto") else ""
        name += f" (lambda0 {cfg['damping']:g})" if cfg.get("damping") is not None else ""
    name += f" (data seed {cfg['data_seed']})" if cfg.get("data_seed") is not None else ""
    return name + (" (float64 targets)" if cfg.get("exact_targets") else "")


def summary_table(results: list[dict], budgets: tuple[float, ...] = (60.0, 300.0)) -> str:
    """Markdown: one row per run, the score at each budget (the last evaluation at or before
    it), the updates made, and each score at the last budget over HF's (``× HF``: above 1,
    HF is ahead)."""
    hf = [r for r in results if r["config"]["optimizer"] == "hf"]
    several = len({r["config"]["problem"] for r in results}) > 1  # else the title names the problem
    head = ("| problem " if several else "") + "| optimizer | " + " | ".join(f"at {b:g} s" for b in budgets) \
        + " | updates | × HF |"
    rows = [head, "|" + " --- |" * (3 + several + len(budgets))]
    for r in results:
        c = r["config"]
        cells = " | ".join(f"{score_at(r, b):.2e}" for b in budgets)
        base = [h for h in hf if h["config"]["problem"] == c["problem"]]
        ratio = score_at(r, budgets[-1]) / score_at(base[0], budgets[-1]) if base else math.nan
        rows.append((f"| {c['problem']} ({c['score']}) " if several else "")
                    + f"| {_run_name(c)} | {cells} | {r['final']['iterations']} | {ratio:.3g} |")
    return "\n".join(rows)


def verdict(results: list[dict], budget: float) -> str:
    """One sentence: HF's score at ``budget`` against the best of the other runs."""
    hf = [r for r in results if r["config"]["optimizer"] == "hf"]
    others = [r for r in results if r["config"]["optimizer"] != "hf"]
    if not hf or not others:
        return ""
    mine = score_at(hf[0], budget)
    best = min(others, key=lambda r: score_at(r, budget) if math.isfinite(score_at(r, budget)) else math.inf)
    theirs = score_at(best, budget)
    if not (math.isfinite(mine) and math.isfinite(theirs)) or mine <= 0:
        return f"At {budget:g} s: HF {mine:.2e}, best other ({_run_name(best['config'])}) {theirs:.2e}."
    how = f"{theirs / mine:.3g}× below" if mine < theirs else f"{mine / theirs:.3g}× above"
    return (f"At {budget:g} s: HF's {best['config']['score']} is {mine:.2e}, {how} the best other optimizer's "
            f"({_run_name(best['config'])}, {theirs:.2e}).")


def output_paths(cfg: dict) -> tuple[Path, Path]:
    """``--out`` is a directory, or a ``.json`` file (the PNG goes beside it)."""
    stem = f"scientific_{cfg['problem']}_{cfg['optimizer']}"
    if cfg["optimizer"] == "adam":
        stem += f"_lr{cfg.get('lr') or 1e-3:g}"
    if cfg["optimizer"] == "hf" and cfg.get("preconditioner") == "none":
        stem += "_nopre"
    if cfg["optimizer"] == "hf" and cfg.get("cg_stop") not in (None, "auto"):
        stem += f"_{cfg['cg_stop']}"
    if cfg["optimizer"] == "hf" and cfg.get("solver") not in (None, "auto"):
        stem += f"_{cfg['solver']}"
    if cfg["optimizer"] == "hf" and cfg.get("damping") is not None:
        stem += f"_lambda{cfg['damping']:g}"
    if cfg.get("data_seed") is not None:
        stem += f"_data{cfg['data_seed']}"
    if cfg.get("exact_targets"):
        stem += "_f64targets"
    if cfg.get("tag"):
        stem += f"_{cfg['tag']}"
    return _output_paths(cfg["out"], stem)


def main(argv=None) -> list[dict]:
    ap = build_parser()
    args = ap.parse_args(argv)
    if args.table:
        results = [json.loads(Path(p).read_text()) for p in args.table]
        print(summary_table(results))
        return results
    _check(ap, args)
    base = vars(args).copy()
    if args.optimizer == "all":
        if Path(args.out).suffix == ".json":
            ap.error("--optimizer all writes one file per run: give --out a directory")
        runs = [dict(base, optimizer="hf", lr=None)] + [dict(base, optimizer="adam", lr=lr) for lr in ADAM_LRS] \
            + [dict(base, optimizer="lbfgs", lr=None)]
    else:
        runs = [base]
    png = output_paths(dict(base, optimizer="all" if len(runs) > 1 else base["optimizer"]))[1]
    # a bad --out, or results of an earlier run, stop the job now, not after the runs
    refuse_overwrite(ap, [p for cfg in runs for p in output_paths(cfg)] + [png], args.overwrite)
    results, paths = run_many(runs, args.jobs, progress=not args.no_progress), []
    for cfg, result in zip(runs, results):
        json_path, _ = output_paths(cfg)
        write_json(result, json_path)
        paths.append(str(json_path))
        f = result["final"]
        print(f"{cfg['problem']} {_run_name(cfg)}: {f['iterations']} updates, {SCORE[cfg['problem']]} "
              f"{f['test_error']:.3e}, train loss {f['train_loss']:.3e} ({time_report(f, cfg['time_budget'], cfg['clock'])})"
              f" -> {json_path}")
    title = f"{TITLES[args.problem]}: {SCORE[args.problem]}"
    plot_results(paths, str(png), title=title, metric="test_error", dashed=None, x2=("iter", "updates"),
                 ylabel=SCORE[args.problem])
    budget = args.time_budget or max(r["final"]["time_s"] for r in results)
    print(f"\n{title}, at equal {'CPU' if args.clock == 'cpu' else 'wall'} time:")
    print(summary_table(results, budgets=tuple(round(budget * k, 3) for k in (1 / 6, 1 / 2, 1))))
    line = verdict(results, budget)
    if line:
        print(line)
    if args.problem in BENCHMARK:
        print("\nAgainst the published figures of Dangel et al. (2024), theirs on a GPU, ours on this CPU:")
        print(published_table(results, score_at))
    if args.problem == "pinn" and len(runs) > 1 and args.time_budget == DEFAULT_TIME_BUDGET and not args.max_iters:
        print(EXPECTED)
    print(f"plot -> {png}")
    return results


if __name__ == "__main__":
    main()
