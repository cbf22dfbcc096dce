"""HF with the library's defaults against tuned Adam at equal process CPU time.

Two deep autoencoders (logistic hidden units, linear code, sigmoid cross-entropy on the
logits, §6.2; sparse initialization, Martens 2010, for both optimizers):

* ``curves``: CURVES 784-400-200-100-50-25-6 (generated, ``recipes/data.py``), 20,000
  training cases, the error of Martens (2010) (summed squared error per case).
* ``manifold``: a second task of our own, not tuned on: 400-pixel images
  x = sigmoid(3·A₂ tanh(A₁ z)) of a 12-dimensional Gaussian code z through a fixed random
  two-layer map, 20,000 training cases, autoencoder 400-256-128-64-12.

HF runs the README's loop: ``torch_hf.HessianFree(model.parameters(), weight_decay=wd)``,
gradient batch 1000 and curvature batch 250 (§12.1) drawn without replacement per epoch;
``--hf key=value`` overrides a constructor argument or the batch sizes (``batch``,
``curvature_batch``) for a defaults study. Adam: batch 100, each learning rate of
``--adam-lrs`` (best of them reported). Every job runs in its own process on one thread,
``--jobs`` at a time, and counts its own process CPU time (evaluations excluded); the
training error (on 5,000 fixed training cases) and the test error are taken as each job
crosses each of ``--budgets``.

    python benchmarks/hf_vs_adam.py --problem curves --budgets 60 300 1200 --jobs 2
    python benchmarks/hf_vs_adam.py --problem manifold --budgets 30 60 120 300
    python benchmarks/hf_vs_adam.py --report results/hf_vs_adam/*.json     # tables of saved runs

Prints, per budget, HF's error, the best Adam error (and its lr), the ratio HF/Adam
(< 1: HF ahead) and HF's CG iterations per update. Each job's JSON goes to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from recipes.models import CURVES_LAYERS, deep_autoencoder  # noqa: E402
from recipes.runner import Budget, Run  # noqa: E402

PROBLEMS = ("curves", "manifold")
MANIFOLD_LAYERS = (400, 256, 128, 64, 12)
WEIGHT_DECAY = 2e-5
EVAL_CASES = 5000


def generate_manifold(n: int, seed: int = 0, code: int = 12, pixels: int = 400, width: int = 64) -> np.ndarray:
    """``n`` images in (0, 1) on a ``code``-dimensional nonlinear manifold (see the module
    docstring); the map is fixed (seed 1234), ``seed`` draws the codes."""
    maps = np.random.default_rng(1234)
    a1 = maps.standard_normal((code, width)) / math.sqrt(code)
    a2 = maps.standard_normal((width, pixels)) / math.sqrt(width)
    z = np.random.default_rng(seed).standard_normal((n, code))
    return (1.0 / (1.0 + np.exp(-3.0 * np.tanh(z @ a1 * 1.5) @ a2))).astype(np.float32)


def load_problem(problem: str) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
    """(training set, test set, encoder layer sizes)."""
    if problem == "curves":
        from recipes.data import load_curves

        train, test = load_curves(None, n_train=20000, n_test=10000, seed=0)
        layers = CURVES_LAYERS
    elif problem == "manifold":
        train, test = generate_manifold(20000, seed=0), generate_manifold(5000, seed=1)
        layers = MANIFOLD_LAYERS
    else:
        raise ValueError(f"unknown problem {problem!r}; choose from {PROBLEMS}")
    return torch.from_numpy(np.ascontiguousarray(train)), torch.from_numpy(np.ascontiguousarray(test)), layers


def loss_fn(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Sigmoid cross-entropy summed over pixels, mean over cases (Martens 2010)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def squared_error(model: torch.nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((torch.sigmoid(model(x)) - x) ** 2).sum()) / len(x)


def _parse_value(text: str):
    if text in ("None", "none"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_hf_options(items: list[str]) -> dict:
    """``key=value`` pairs; ``preconditioner=identity|ggn|fisher|kfac``, ``preconditioner_decay=<β>``,
    ``kfac_inverse_every=<k>``
    and ``damping=<λ₀>`` name objects, the rest are ``HessianFree`` keywords or ``batch``/``curvature_batch``."""
    opts = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--hf expects key=value, got {item!r}")
        key, value = item.split("=", 1)
        opts[key.strip()] = _parse_value(value.strip())
    return opts


def build_hf(params, opts: dict) -> torch_hf.HessianFree:
    kwargs = {k: v for k, v in opts.items() if k not in ("batch", "curvature_batch")}
    decay = kwargs.pop("preconditioner_decay", None)
    inverse_every = int(kwargs.pop("kfac_inverse_every", 1))
    if "preconditioner" in kwargs or decay:
        name = kwargs.pop("preconditioner", "ggn")
        if decay is None:
            decay = 0.95 if name == "kfac" else 0.0
        kwargs["preconditioner"] = {"identity": lambda: torch_hf.preconditioners.Identity(),
                                    "kfac": lambda: torch_hf.preconditioners.KFAC(decay=decay,
                                                                                 inverse_every=inverse_every),
                                    "ggn": lambda: torch_hf.preconditioners.GGNDiagonal(0.75, decay=decay),
                                    "fisher": lambda: torch_hf.preconditioners.EmpiricalFisherDiagonal(
                                        0.75, decay=decay)}[name]()
    if "damping" in kwargs:
        kwargs["damping"] = torch_hf.damping.Tikhonov(float(kwargs.pop("damping")))
    kwargs.setdefault("weight_decay", WEIGHT_DECAY)
    return torch_hf.HessianFree(params, **kwargs)


def run_job(problem: str, optimizer: str, budgets: list[float], lr: float | None = None,
            hf_options: dict | None = None, seed: int = 0, threads: int = 1, flush_denormal: bool = True) -> dict:
    """Train one optimizer on ``problem`` until the largest budget of process CPU time.

    ``flush_denormal`` sets ``torch.set_flush_denormal`` for the whole job, so Adam gets
    the same fast subnormal handling that ``HessianFree`` uses inside its steps."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush_denormal)
    x_train, x_test, layers = load_problem(problem)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = deep_autoencoder(layers, generator=gen)
    params = list(model.parameters())
    hf_options = dict(hf_options or {})
    if optimizer == "hf":
        batch, curv = hf_options.get("batch", 1000), hf_options.get("curvature_batch", 250)
        opt = build_hf(params, hf_options)
    elif optimizer == "adam":
        batch, curv = 100, None
        opt = torch.optim.Adam(params, lr=lr, weight_decay=WEIGHT_DECAY)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    n = len(x_train)
    x_eval = x_train[:EVAL_CASES]
    perm, cursor, cg_iters, pending = torch.randperm(n, generator=gen), 0, [0], sorted(budgets)

    held: list[torch.Tensor] = []

    def next_batch() -> None:  # outside the budget's clock
        nonlocal perm, cursor
        if cursor + batch > n:
            perm, cursor = torch.randperm(n, generator=gen), 0
        held[:] = [x_train[perm[cursor : cursor + batch]]]
        cursor += batch

    def update() -> dict:
        xb = held[0]
        if optimizer == "hf":
            xc = xb[:curv]

            def closure():
                z = model(xb)
                return loss_fn(z, xb), z

            def curvature_closure():
                z = model(xc)
                return loss_fn(z, xc), z

            opt.step(closure, curvature_closure if curv < batch else None)
            cg_iters[0] += opt.last_step.cg_iterations
        else:
            opt.zero_grad(set_to_none=True)
            loss_fn(model(xb), xb).backward()
            opt.step()
        return {}

    def checkpoint(updates: int, cpu: float, extra: dict) -> dict:
        return {"budget_s": pending.pop(0), "cpu_s": round(cpu, 3), "updates": updates, "epochs": updates * batch / n,
                "train_error": squared_error(model, x_eval), "test_error": squared_error(model, x_test[:EVAL_CASES]),
                "cg_per_update": cg_iters[0] / updates if optimizer == "hf" else None}

    run = Run(Budget(max(budgets), clock="cpu"), checkpoint, job_name_of(problem, optimizer, lr), progress=False)

    def more_crossed(row: dict) -> None:  # one update may cross several budgets
        while pending and run.train_time >= pending[0]:
            run.evaluate()

    status = run.loop(update, prepare=next_batch, due=lambda: bool(pending) and run.train_time >= pending[0], after_eval=more_crossed,
                      diverged=lambda: not all(bool(torch.isfinite(p).all()) for p in params))
    while status == "diverged" and pending:
        run.evaluate()
    run.close()
    return {"problem": problem, "optimizer": optimizer, "lr": lr, "hf_options": hf_options, "seed": seed,
            "flush_denormal": flush_denormal, "status": status, "checkpoints": run.history}


def job_name_of(problem: str, optimizer: str, lr: float | None) -> str:
    return f"{problem} {optimizer}" + (f" lr {lr:g}" if lr is not None else "")


def job_name(job: dict) -> str:
    suffix = f"_seed{job['seed']}" + ("" if job.get("flush_denormal", True) else "_subnormals")
    if job["optimizer"] == "adam":
        return f"{job['problem']}_adam_lr{job['lr']:g}{suffix}"
    tag = "_".join(f"{k}{v}" for k, v in sorted(job["hf_options"].items())) or "defaults"
    return f"{job['problem']}_hf_{tag}{suffix}"


def report(results: list[dict]) -> str:
    """Markdown tables, one per problem: HF configurations against the best Adam."""
    lines = []
    for problem in sorted({r["problem"] for r in results}):
        runs = [r for r in results if r["problem"] == problem]
        adam = [r for r in runs if r["optimizer"] == "adam"]
        budgets = sorted({c["budget_s"] for r in runs for c in r["checkpoints"]})
        lines.append(f"\n{problem}: training error (summed squared error per case) at equal process CPU time")
        head = "| run | " + " | ".join(f"{b:g} s" for b in budgets) + " |"
        lines += [head, "|" + " --- |" * (len(budgets) + 1)]

        def at(r, b):
            return next((c for c in r["checkpoints"] if c["budget_s"] == b), None)

        best = {}
        for b in budgets:
            cands = [(at(r, b)["train_error"], r["lr"]) for r in adam if at(r, b)]
            best[b] = min(cands) if cands else None
        for r in runs:
            name = job_name(r).removeprefix(problem + "_")
            cells = []
            for b in budgets:
                c = at(r, b)
                if c is None:
                    cells.append("")
                    continue
                cell = f"{c['train_error']:.3g}"
                if r["optimizer"] == "hf" and best[b]:
                    cell += f" (×{c['train_error'] / best[b][0]:.2f}, CG {c['cg_per_update']:.1f}, {c['updates']} upd)"
                cells.append(cell)
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("| best Adam (lr) | " + " | ".join(
            f"{best[b][0]:.3g} ({best[b][1]:g})" if best[b] else "" for b in budgets) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problem", choices=PROBLEMS, default="curves")
    ap.add_argument("--budgets", type=float, nargs="+", default=[60, 300, 1200],
                    help="seconds of process CPU time at which both are measured (default 60 300 1200)")
    ap.add_argument("--adam-lrs", type=float, nargs="*", default=[3e-4, 1e-3, 3e-3])
    ap.add_argument("--hf", nargs="*", default=[], metavar="KEY=VALUE",
                    help="HF options (default: the library's defaults), e.g. cg_max_iters=10 batch=500")
    ap.add_argument("--no-hf", action="store_true", help="run only Adam")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep-subnormals", action="store_true",
                    help="leave torch's default subnormal handling in every job (HessianFree still flushes "
                         "inside its steps unless --hf flush_denormal=0)")
    ap.add_argument("--jobs", type=int, default=2, help="jobs at a time, one thread each (default 2)")
    ap.add_argument("--out", default="results/hf_vs_adam")
    ap.add_argument("--report", nargs="+", default=None, metavar="JSON", help="print the tables of saved runs")
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)  # internal: run one job (JSON spec)
    args = ap.parse_args(argv)
    if args.report:
        results = [json.loads(Path(p).read_text()) for p in args.report]
        print(report(results))
        return results
    if args.job:
        job = json.loads(args.job)
        result = run_job(**job)
        Path(job_out := args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(job_out).write_text(json.dumps(result, indent=1))
        return [result]
    if any(b <= 0 for b in args.budgets) or args.jobs < 1:
        ap.error("budgets and --jobs must be positive")
    hf_options = parse_hf_options(args.hf)
    jobs = [] if args.no_hf else [dict(problem=args.problem, optimizer="hf", hf_options=hf_options)]
    jobs += [dict(problem=args.problem, optimizer="adam", lr=lr) for lr in args.adam_lrs]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    queue, running, results = list(jobs), [], []
    from tqdm.auto import tqdm

    bar = tqdm(total=len(jobs), desc="jobs")
    while queue or running:
        while queue and len(running) < args.jobs:
            job = dict(queue.pop(0), budgets=args.budgets, seed=args.seed, flush_denormal=not args.keep_subnormals)
            path = out / f"{job_name(job)}.json"
            cmd = [sys.executable, os.path.abspath(__file__), "--job", json.dumps(job), "--out", str(path)]
            running.append((subprocess.Popen(cmd, env=dict(os.environ, OMP_NUM_THREADS="1")), path))
        time.sleep(1.0)
        for proc, path in list(running):
            if proc.poll() is not None:
                running.remove((proc, path))
                bar.update(1)
                if proc.returncode != 0:
                    raise SystemExit(f"job {path.name} failed with exit code {proc.returncode}")
                results.append(json.loads(path.read_text()))
    bar.close()
    print(report(results))
    return results


if __name__ == "__main__":
    main()
