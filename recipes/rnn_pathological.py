"""The pathological long-range problems of Hochreiter & Schmidhuber (1997), as Martens &
Sutskever (2011) used them: a tanh RNN with 100 hidden units trained by HF with
structural damping (§8.4), or by Adam / momentum SGD, through one CLI.

    python recipes/rnn_pathological.py --task addition --T 100
    python recipes/rnn_pathological.py --task temporal_order --T 100 --input-scale 0.1
    python recipes/rnn_pathological.py --task temporal_order --T 100 --input-scale 0.1 --optimizer adam
    python recipes/rnn_pathological.py --task all --T 100 --time-budget 3600 --clock cpu --out results/rnn
    python recipes/rnn_pathological.py --task all --lrs 3e-4 1e-3 3e-3 --out results/rnn  # Adam's lr tuned per task
    python recipes/rnn_pathological.py --summary results/rnn/*.json      # the table of saved runs
    python recipes/rnn_pathological.py --task xor --time-budget 3600 --resume   # continue a stopped run
    python recipes/rnn_pathological.py --saddle results/rnn_xor_T100_hf_seed2.pt  # gradient noise, Hessian extremes, reach
    python recipes/rnn_pathological.py --help

The tasks, their data and the network (sparse initialization, input scale) are defined
in :mod:`recipes.rnn_tasks`; a task is solved at < 1% test error.
HF: GGN with structural damping (μ = 1/30 of λ by default), no preconditioner (§11), CG
up to 300 iterations.

Writes JSON (``{"config", "history", "final"}``, the test error being the task's success
metric), a PNG of the test error against training time and against training sequences,
and ``<stem>.pt``, the state ``--resume`` continues from (rewritten at every evaluation).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch_hf  # noqa: E402
from recipes.cli import add_overwrite_option, check_args, curvature_batch, refuse_overwrite, time_report  # noqa: E402
from recipes.rnn_saddle import SADDLE_STEPS, input_reach, saddle_report  # noqa: E402,F401
from recipes.rnn_summary import PAPER_T100, pick_lr, plot_summary, run_all, run_stem, summarize  # noqa: E402,F401
from recipes.rnn_tasks import (DEFAULT_INPUT_SCALE, ORDER_WINDOWS, TASKS, Batch, TaskSpec, forward,  # noqa: E402,F401
                               generate, readout_steps, sparse_init_rnn, spec, task_error, task_loss)
from recipes.runner import (Budget, Run, add_clock_option, add_subnormal_option, diverged, output_paths,  # noqa: E402
                            save_results, subnormals_flushed, write_json)

DEFAULT_TIME_BUDGET = 600.0
# HF settings that differ per task (the CLI's options override them). XOR's target has no
# first-order dependence on either marked bit (XOR = a + b − 2ab: E[(y − ½) a] = 0), so at
# the chance plateau the expected gradient is a second-order effect that a small gradient
# batch buries in sampling noise: measured at the plateau, signal/noise ≈ 1 at 4,000
# sequences (0.7 on seed 1), and 300 CG iterations on 250 sequences fit that noise (the
# test loss rose above ln 2). 4,000 / 1,000 with the rate rule's shorter CG solved seed 0
# only; 16,000 / 1,000 (signal/noise ≈ 2) solved seeds 1 and 2, which had sat at ln 2 for
# an hour each at 4,000, and not seed 0 in an hour (docs/rnns.md): 2 of 3 against 1. The
# other tasks keep 1,000 / 250 and the progress test.
HF_TASK_DEFAULTS = {"xor": {"batch_size": 16000, "curvature_batch_size": 1000, "cg_stop": "rate"}}
HF_DEFAULTS = {"curvature_batch_size": 250, "cg_stop": "progress"}
# On a GPU the batch is nearly free: a step of the 100-unit RNN is a few small kernels whose
# launches, not their arithmetic, set the time (at T = 200 and 4,000 sequences a forward pass
# is 16 GFLOP, 0.3 ms at an H100's float32 rate, against ~1,000 launches of ~5 µs), so the
# other tasks take four times the CPU's batches there, the ratio that solved XOR seed 0
# where 1,000 / 250 did not (docs/rnns.md). XOR keeps its own.
HF_CUDA_DEFAULTS = {"batch_size": 4000, "curvature_batch_size": 1000}
# What a default run gives on a 2-core x86 CPU (docs/rnns.md, one thread, CPU time).
EXPECTED = ("Expected at T=100 (docs/rnns.md): HF solves addition in 700-2,000 s of CPU time (3 of 3 seeds), "
            "Adam (lr 3e-4) on 1 seed of 3 in an hour; a shorter budget ends unsolved.")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        usage="%(prog)s [--task TASK] [--optimizer OPT] [options]",  # the options are listed by group below
        description="Long-range RNN tasks (Hochreiter & Schmidhuber 1997) trained by HF with structural damping "
                    "(§8.4) or by Adam / SGD.\n\n"
                    "    python recipes/rnn_pathological.py --task addition                  # HF, 600 s\n"
                    "    python recipes/rnn_pathological.py --task addition --optimizer all  # HF, then Adam\n"
                    "    python recipes/rnn_pathological.py --task all --time-budget 3600 --clock cpu --out results/rnn\n"
                    "    python recipes/rnn_pathological.py --summary results/rnn/*.json     # the table of saved runs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Tasks: {', '.join(TASKS)}; a task is solved at < 1% test error. {EXPECTED} The tasks, the "
               "initialization and the outputs: python -m pydoc recipes.rnn_tasks; the measured tables: "
               "docs/rnns.md.")
    run = ap.add_argument_group("one run")
    run.add_argument("--task", choices=TASKS + ("all",), default="addition", metavar="TASK",
                     help="one of the tasks below (default addition), or all: --tasks x --optimizers x --seeds")
    run.add_argument("--T", type=int, default=100, help="sequence length (default 100, at least 12)")
    run.add_argument("--optimizer", choices=["hf", "adam", "sgd", "all"], default="hf",
                     help="hf (default), adam, sgd, or all: HF, then Adam, the same budget each")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                     help=f"seconds of training, evaluations excluded; 0 for none (default {DEFAULT_TIME_BUDGET:.0f})")
    add_clock_option(run)
    run.add_argument("--max-iters", type=int, default=None, help="stop after this many updates")
    run.add_argument("--batch-size", type=int, default=None,
                     help="gradient batch (hf 1000, on CUDA 4000, xor 16000; adam/sgd 100)")
    run.add_argument("--hidden", type=int, default=100, help="hidden units (default 100)")
    run.add_argument("--input-scale", type=float, default=DEFAULT_INPUT_SCALE,
                     help=f"scale of the initial input weights (default {DEFAULT_INPUT_SCALE}; 1 is the paper's)")
    run.add_argument("--test-size", type=int, default=1000)
    run.add_argument("--eval-every", type=float, default=None, help="seconds between evaluations (default budget/50)")
    run.add_argument("--device", default="cpu")
    run.add_argument("--threads", type=int, default=None)
    add_subnormal_option(run)
    run.add_argument("--out", default="results", help="directory of the results (default results/)")
    run.add_argument("--tag", default=None, help="suffix of the result file names")
    run.add_argument("--no-progress", action="store_true")
    add_overwrite_option(run)
    run.add_argument("--resume", action="store_true",
                     help="continue the run saved in <stem>.pt beside the JSON up to this call's budget; the "
                          "settings that shape training must match")
    hf = ap.add_argument_group("HF")
    hf.add_argument("--curvature-batch-size", type=int, default=None,
                    help="curvature batch, at most the gradient batch (§12.1; 250, on CUDA and for xor 1000)")
    hf.add_argument("--cg-max-iters", type=int, default=300)
    hf.add_argument("--cg-tol", type=float, default=5e-4)
    hf.add_argument("--cg-stop", choices=["progress", "rate"], default=None,
                    help="CG termination (default progress, §4; xor: rate)")
    hf.add_argument("--damping", type=float, default=0.1, help="initial lambda (default 0.1)")
    hf.add_argument("--mu", type=float, default=1 / 30, help="structural damping ratio (default 1/30; 0: none)")
    hf.add_argument("--damping-min", type=float, default=None, help="floor on lambda (default none)")
    hf.add_argument("--trust-radius", type=float, default=None, help="Steihaug-Toint truncation of CG (§8.6)")
    hf.add_argument("--curvature", choices=["ggn", "hessian"], default=None, help="default ggn (§6); hessian (§5)")
    hf.add_argument("--preconditioner", choices=["none", "ggn"], default="none",
                    help="none (default; §11: RNNs gain little) or the GGN diagonal^0.75")
    hf.add_argument("--checkpoint", action="store_true",
                    help="sqrt(T) checkpointed unroll with recomputed curvature products (§7.1)")
    base = ap.add_argument_group("Adam and SGD")
    base.add_argument("--lr", type=float, default=None, help="adam 1e-3, sgd 1e-2")
    base.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (default 0.9)")
    base.add_argument("--clip", type=float, default=1.0, help="gradient-norm clipping (default 1; 0: none)")
    many = ap.add_argument_group("many runs (--task all) and saved runs")
    many.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS), metavar="TASK",
                      help="the tasks (default all seven)")
    many.add_argument("--optimizers", nargs="+", choices=["hf", "adam", "sgd"], default=["hf", "adam"],
                      help="the optimizers (default hf adam)")
    many.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="the seeds (default 0 1 2)")
    many.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each (default 2)")
    many.add_argument("--lrs", nargs="+", type=float, default=None,
                      help="tune Adam's/SGD's learning rate per task over these on the first seed first")
    many.add_argument("--tune-budget", type=float, default=300.0, help="each tuning run's budget (default 300 s)")
    many.add_argument("--summary", nargs="+", default=None, metavar="JSON",
                      help="print the table of saved runs (and write --out/summary.png), and exit")
    many.add_argument("--saddle", default=None, metavar="STATE_PT",
                      help="print where a saved HF run stands (gradient noise, Hessian extremes), and exit")
    many.add_argument("--reach", action="store_true",
                      help="print each task's input sensitivity 95 steps back at initialization, and exit")
    return ap


# Settings a resumed run may change: how long, how often it reports, where, on how many threads,
# and how fast the CPU treats subnormals (a speed setting, as the thread count is).
RESUMABLE_CHANGES = frozenset({"time_budget", "max_iters", "eval_every", "out", "threads", "no_progress", "resume",
                               "device", "keep_subnormals", "overwrite"})


def run(cfg: dict, progress: bool = True, on_evaluate=None, state_path: str | Path | None = None) -> dict:
    """Train as ``cfg`` says (the parsed CLI as a dict) and return the results dict.

    ``on_evaluate(partial_results)`` is called after every evaluation (the CLI writes
    the JSON there, so a run that is killed keeps what it measured). Ctrl-C or SIGTERM
    stops training at the next update with status ``"interrupted"``. With ``state_path``
    the model, optimizer, data stream and clock are saved there at every evaluation, and
    ``cfg["resume"]`` continues from that file: the resumed run takes the same updates,
    bit for bit, as one that was never stopped (its budget counts the time already spent).

    On CPU every optimizer trains with subnormals flushed to zero unless
    ``cfg["keep_subnormals"]`` (``final["subnormals_flushed"]`` records it): HessianFree flushes
    inside its steps anyway, and a baseline left on x86's subnormal path pays several times per
    update once its gradients vanish (5.7x measured, docs/rnns.md), which an equal-CPU-time comparison would charge to it.
    """
    flush = torch.device(cfg["device"]).type == "cpu" and not cfg.get("keep_subnormals")
    with subnormals_flushed(flush) as flushing:
        result = _train(cfg, progress, on_evaluate, state_path)
    result["final"]["subnormals_flushed"] = flushing
    return result


def _train(cfg: dict, progress: bool, on_evaluate, state_path: str | Path | None) -> dict:
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    task, T, kind = cfg["task"], cfg["T"], spec(cfg["task"]).kind
    s = spec(task)
    gen = torch.Generator().manual_seed(cfg["seed"])
    test = generate(task, T, cfg["test_size"], torch.Generator().manual_seed(10_000 + cfg["seed"]))
    test = Batch(test.x.to(device), test.y.to(device))
    model = sparse_init_rnn(s.inputs, cfg["hidden"], s.outputs, gen,
                            input_scale=cfg.get("input_scale", DEFAULT_INPUT_SCALE)).to(device)
    params = list(model.parameters())
    _fill_defaults(cfg)
    checkpoint = "sqrt" if cfg.get("checkpoint") else None
    opt = _optimizer(cfg, params, checkpoint)
    cases = [0]

    def evaluate(it: int, train_time: float, extra: dict) -> dict:
        with torch.no_grad():
            _, out = forward(model, test.x, readout=readout_steps(kind))
            loss, z = task_loss(kind, out, test.y)
        train_loss = extra.pop("train_loss", None)
        # the data are fresh every update, so "epoch" counts thousands of training sequences
        row = {"iter": it, "time_s": round(train_time, 3), "epoch": cases[0] / 1000,
               "train_loss": None if train_loss is None else float(train_loss.detach()),
               "test_loss": float(loss), "test_error": task_error(kind, z, test.y)}
        return {**row, **extra}

    budget = cfg["time_budget"] or 0.0
    run = Run(Budget(budget, cfg.get("max_iters"), cfg.get("clock"),
                     cfg.get("eval_every") or (budget / 50 if budget > 0 else None)),
              evaluate, f"{task} T={T} {cfg['optimizer']}", progress,
              postfix=lambda row: {"test_err": f"{row['test_error']:.3f}"})
    if cfg.get("resume"):
        cases[0] = _resume(cfg, state_path, device, model, opt, gen, run)
    else:
        run.evaluate()

    def save_state(status: str) -> None:
        _save_state(state_path, {"config": dict(cfg), "model": model.state_dict(), "optimizer": opt.state_dict(),
                                 "generator": gen.get_state(), "cases": cases[0], **run.snapshot(), "status": status})

    def after_eval(row: dict) -> str | None:
        solved = row["test_error"] < 0.01
        save_state("solved" if solved else "running")
        if on_evaluate is not None:
            on_evaluate({"config": dict(cfg), "history": run.history,
                         "final": dict(row, iterations=run.iterations, status="running")})
        return "solved" if solved else None

    batches: list[Batch] = []

    def prepare() -> None:  # fresh data for each update, outside the budget's clock
        b = generate(task, T, cfg["batch_size"], gen)
        batches[:] = [Batch(b.x.to(device), b.y.to(device))]

    def update() -> dict:
        extra = _update(cfg, opt, params, model, batches[0], checkpoint, kind)
        cases[0] += cfg["batch_size"]
        return extra

    with _stop_on_signals(run):
        status = run.loop(update, prepare=prepare, after_eval=after_eval, diverged=lambda: diverged(params))
    if run.history[-1]["iter"] != run.iterations:
        run.evaluate()
        save_state(status)
    solved_at = run.history[-1]["time_s"] if status == "solved" else None
    return run.result(dict(cfg), status, solved=status == "solved", solved_at_s=solved_at,
                      torch_threads=torch.get_num_threads())


def hf_batch_defaults(task: str, device: str | None) -> dict:
    """HF's default gradient and curvature batches (and CG rule) for ``task`` on ``device``."""
    cuda = HF_CUDA_DEFAULTS if str(device or "cpu").startswith("cuda") else {}
    return {"batch_size": 1000, **HF_DEFAULTS, **cuda, **HF_TASK_DEFAULTS.get(task, {})}


def _fill_defaults(cfg: dict) -> None:
    """The per-optimizer and per-task defaults of the options left unset."""
    task_defaults = hf_batch_defaults(cfg["task"], cfg.get("device")) if cfg["optimizer"] == "hf" \
        else {"batch_size": 100, **HF_DEFAULTS}
    for key, value in task_defaults.items():
        if cfg.get(key) is None:
            cfg[key] = value
    if cfg["optimizer"] != "hf" and cfg.get("lr") is None:
        cfg["lr"] = 1e-3 if cfg["optimizer"] == "adam" else 1e-2


def _optimizer(cfg: dict, params: list[torch.Tensor], checkpoint: str | None) -> torch.optim.Optimizer:
    if cfg["optimizer"] == "hf":
        adapt = torch_hf.damping.LevenbergMarquardt(min_value=cfg.get("damping_min") or 1e-12)
        damping = (torch_hf.damping.Structural(cfg["damping"], mu=cfg["mu"], batch_dim=1, adapt=adapt)
                   if cfg["mu"] > 0 else torch_hf.damping.Tikhonov(cfg["damping"], adapt=adapt))
        pre = (torch_hf.preconditioners.GGNDiagonal(0.75) if cfg.get("preconditioner") == "ggn"
               else torch_hf.preconditioners.Identity())
        return torch_hf.HessianFree(params, damping=damping, preconditioner=pre, cg_max_iters=cfg["cg_max_iters"],
                                    cg_tol=cfg["cg_tol"], cg_stop=cfg["cg_stop"],
                                    curvature=cfg.get("curvature") or "ggn", trust_radius=cfg.get("trust_radius"),
                                    recompute=bool(checkpoint))
    if cfg["optimizer"] == "adam":
        return torch.optim.Adam(params, lr=cfg["lr"])
    return torch.optim.SGD(params, lr=cfg["lr"], momentum=cfg["momentum"])


def _update(cfg: dict, opt: torch.optim.Optimizer, params: list[torch.Tensor], model, b: Batch,
            checkpoint: str | None, kind: str) -> dict:
    """One update on the batch ``b``; the next evaluation row's extra fields (the loss on
    ``b``, as a tensor read only when the row is made, and HF's diagnostics)."""
    def closure_for(batch: Batch, structural: bool):
        def closure():
            states, out = forward(model, batch.x, checkpoint, readout_steps(kind))
            loss, z = task_loss(kind, out, batch.y)
            return (loss, z, states) if structural else (loss, z)
        return closure

    if cfg["optimizer"] == "hf":
        nc = min(cfg["curvature_batch_size"], cfg["batch_size"])
        c = Batch(b.x[:, :nc], b.y[:nc])
        structural = cfg["mu"] > 0
        loss = opt.step(closure_for(b, structural), closure_for(c, structural) if nc < cfg["batch_size"] else None)
        d = opt.last_step
        return {"rho": d.rho, "damping": d.damping, "cg_iterations": d.cg_iterations, "train_loss": loss}
    opt.zero_grad(set_to_none=True)
    loss, _ = closure_for(b, False)()
    loss.backward()
    if cfg["clip"]:
        torch.nn.utils.clip_grad_norm_(params, cfg["clip"])
    opt.step()
    return {"train_loss": loss}


def _resume(cfg: dict, state_path: str | Path | None, device: torch.device, model, opt, gen: torch.Generator,
            run: Run) -> int:
    """Load the saved run into ``model``, ``opt``, ``gen`` and ``run``; returns the cases seen.
    Settings that shape training must match the saved ones."""
    if state_path is None or not Path(state_path).exists():
        raise SystemExit(f"--resume: no saved state at {state_path}")
    saved = torch.load(state_path, map_location=device, weights_only=False)
    changed = sorted(k for k in set(saved["config"]) | set(cfg) if k not in RESUMABLE_CHANGES
                     and saved["config"].get(k) != cfg.get(k))
    if changed:
        raise SystemExit("--resume: the saved run used other settings for "
                         + ", ".join(f"{k} ({saved['config'].get(k)!r}, now {cfg.get(k)!r})" for k in changed))
    if saved["status"] == "solved":
        raise SystemExit(f"--resume: the saved run already solved the task at {saved['train_time']:.0f} s")
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    gen.set_state(saved["generator"])
    run.resume(saved)
    return saved["cases"]


def _save_state(state_path: str | Path | None, state: dict) -> None:
    if state_path is None:
        return
    tmp = Path(str(state_path) + ".tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, tmp)
    tmp.replace(state_path)  # a run killed while saving keeps the previous state


@contextlib.contextmanager
def _stop_on_signals(run: Run):
    """Ctrl-C or SIGTERM ends the run at the next update (status "interrupted")."""
    def request_stop(signum, frame):
        run.stop_requested = True

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def main(argv=None) -> dict | list[dict]:
    ap = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = ap.parse_args(argv)
    check_args(ap, args, positive=("T", "hidden", "input_scale", "max_iters", "batch_size", "curvature_batch_size",
                                   "cg_max_iters", "test_size", "eval_every", "threads", "lr", "jobs",
                                   "trust_radius"),
               non_negative=("time_budget", "cg_tol", "damping", "mu", "momentum", "clip", "tune_budget"))
    if args.T < 12:
        ap.error(f"--T must be at least 12 (the tasks place their markers in fixed fractions of T), got {args.T}")
    if args.saddle:
        report = saddle_report(args.saddle)
        print(", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in report.items()
                        if k != "along_negative"))
        for row in report["along_negative"]:
            print("along the most negative direction: " + ", ".join(f"{k} {v:.3g}" for k, v in row.items()))
        return report
    if args.reach:
        rows = {}
        for task in args.tasks:
            rows[task] = {scale: [input_reach(task, scale, seed, T=args.T) for seed in args.seeds]
                          for scale in (1.0, DEFAULT_INPUT_SCALE)}
            print(f"{task:20s} " + " | ".join(f"scale {scale:g}: " + " ".join(f"{r:.0e}" for r in v)
                                              for scale, v in rows[task].items()))
        return rows
    if args.summary:
        import json

        results = [json.loads(Path(p).read_text()) for p in args.summary]
        print(summarize(results))
        if Path(args.out).suffix.lower() != ".json":
            print(plot_summary(results, Path(args.out) / "summary.png"))
        return results
    if args.task == "all":
        if args.optimizer == "all":
            ap.error("--task all takes its optimizers from --optimizers")
        return run_all(args, argv)
    if args.optimizer == "all" and args.resume:
        ap.error("--resume continues one run: give --optimizer hf or adam")
    cfgs = []
    for name in (("hf", "adam") if args.optimizer == "all" else (args.optimizer,)):
        cfg = dict(vars(args), optimizer=name, lr=None if name == "hf" else args.lr)
        for key in ("tasks", "optimizers", "seeds", "jobs", "summary", "lrs", "tune_budget"):
            cfg.pop(key)
        if name == "hf" and args.curvature_batch_size is not None:
            defaults = hf_batch_defaults(args.task, args.device)
            curvature_batch(ap, args.curvature_batch_size, args.batch_size or defaults["batch_size"],
                            defaults["curvature_batch_size"])
        cfgs.append(cfg)
    paths = [output_paths(c["out"], run_stem(c["task"], c["T"], c["optimizer"], c["seed"], c["tag"])) for c in cfgs]
    if not args.resume:  # --resume continues the files that are there
        refuse_overwrite(ap, [p for pair in paths for p in (*pair, pair[0].with_suffix(".pt"))], args.overwrite)
    results = []
    for cfg, (json_path, png_path) in zip(cfgs, paths):
        result = run(cfg, progress=not args.no_progress,
                     on_evaluate=lambda partial, path=json_path: write_json(partial, path),
                     state_path=json_path.with_suffix(".pt"))
        save_results(result, json_path, png_path, title=f"{cfg['task']} T={cfg['T']}, "
                     f"{cfg['optimizer']}: test error", metric="test_error", dashed=None)
        print(f"{cfg['optimizer']} on {cfg['task']} T={cfg['T']}: {outcome(result['final'])} after "
              f"{result['final']['iterations']} updates ({time_report(result['final'], cfg['time_budget'], cfg['clock'])})"
              f" -> {json_path}, {png_path}")
        results.append(result)
    if len(results) > 1 or args.time_budget == DEFAULT_TIME_BUDGET:
        print(EXPECTED)
    return results[0] if len(results) == 1 else results


def outcome(final: dict) -> str:
    """Solved or not, in words, with the criterion."""
    if final.get("status") == "solved":
        return f"solved at {final['solved_at_s']:.0f} s (test error {final['test_error']:.4f} < 0.01)"
    why = {"diverged": "diverged", "interrupted": "interrupted", "max_iters": "--max-iters reached"}
    return (f"not solved: test error {final['test_error']:.4f}, needs < 0.01"
            + (f" ({why[final['status']]})" if final.get("status") in why else ""))


if __name__ == "__main__":
    main()
