"""Many RNN runs: the ``--task all`` driver (a queue of one-thread processes, Adam's
learning rate tuned per task, resumable) and the summary table and plot of saved runs."""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from recipes.plot import plot_by_task
from recipes.rnn_tasks import TASKS

SCRIPT = Path(__file__).with_name("rnn_pathological.py")


# Martens & Sutskever (2011), HF with structural damping, T = 100.
PAPER_T100 = "solved"


def run_stem(task: str, T: int, optimizer: str, seed: int, tag: str | None = None) -> str:
    return f"rnn_{task}_T{T}_{optimizer}_seed{seed}" + (f"_{tag}" if tag else "")


def summarize(results: list[dict]) -> str:
    """A markdown table: per task, T and optimizer, the seeds solved, and the median CPU (or
    wall) time to solve over all of the row's seeds and that seed's updates, an unsolved seed counting as
    slower than any solved one (the upper median: over two seeds, the slower). Where the
    median seed did not solve, the cell says so and lists the solved seeds' times; where no
    seed solved, it gives the lowest final test error and, where more than 10% lower, the lowest
    reached at any evaluation (a run that came close, then fell back)."""
    groups: dict[tuple, dict[str, list[dict]]] = {}
    for r in results:
        c = r["config"]
        groups.setdefault((TASKS.index(c["task"]), c["task"], c["T"]), {}).setdefault(c["optimizer"], []).append(r)
    optimizers = sorted({o for g in groups.values() for o in g}, key=lambda o: ("hf", "adam", "sgd").index(o))
    head = "| task | T | " + " | ".join(f"{o}: solved | {o}: median time, updates to solve" for o in optimizers)
    lines = [head + " | Martens & Sutskever (2011) |", "|" + " --- |" * (3 + 2 * len(optimizers))]
    for (_, task, T), by_opt in sorted(groups.items()):
        cells = []
        for o in optimizers:
            runs = by_opt.get(o, [])
            solved = [r["final"] for r in runs if r["final"].get("status") == "solved"]
            unfinished = [r for r in runs if r["final"].get("status") == "running"]
            if not runs:
                cells += ["", ""]
                continue
            rate = f"{len(solved)}/{len(runs)}" + (f" ({len(unfinished)} running)" if unfinished else "")
            lrs = {r["config"].get("lr") for r in runs}
            if o != "hf" and None not in lrs:
                rate += " (lr " + ", ".join(f"{lr:g}" for lr in sorted(lrs)) + ")"
            middle = len(runs) // 2
            if middle < len(solved):
                # time and updates of the same (median) seed, not two separate medians
                f = sorted(solved, key=lambda f: f["time_s"])[middle]
                timing = f"{f['time_s']:,.0f} s, {f['iterations']:,}"
            elif solved:
                # a median over the solved seeds alone would flatter a 1-of-3 row
                each = ", ".join(f"{f['time_s']:,.0f} s ({f['iterations']:,})"
                                 for f in sorted(solved, key=lambda f: f["time_s"]))
                timing = f"median seed unsolved; solved at {each}"
            else:
                longest = max(runs, key=lambda r: r["final"]["time_s"])["final"]
                final = min(r["final"]["test_error"] for r in runs)
                # a run can come close and fall back to chance: name the lowest it reached
                reached = min([e["test_error"] for r in runs for e in r.get("history", [])
                               if e.get("test_error") is not None] + [final])
                timing = f"none in {longest['time_s']:,.0f} s (final test error {final:.3f}"
                timing += f"; lowest on the way {reached:.3f})" if reached < 0.9 * final else ")"
            cells += [rate, timing]
        lines.append(f"| {task} | {T} | " + " | ".join(cells) + f" | {PAPER_T100 if T == 100 else ''} |")
    return "\n".join(lines)


def plot_summary(results: list[dict], out: str | Path) -> str:
    """``recipes.plot.plot_by_task`` with the panels in this module's task order."""
    return plot_by_task(results, out, order=TASKS)


def _pending_run(path: Path, command: list[str], lr: float | None, time_budget: float,
                 max_iters: int) -> list[str] | None:
    """The command that (re)starts the run whose JSON is ``path``, or None when a finished
    run is there: solved, diverged, or its budget spent, at least ``time_budget`` /
    ``max_iters`` and at the same learning rate. A stopped run, or one with a smaller
    budget, continues from its saved state (``--resume``) where there is one."""
    import json

    if not path.exists():
        return command
    saved = json.loads(path.read_text())
    status, was = saved["final"].get("status"), saved["config"]
    if lr is not None and was.get("lr") != lr:
        return command + ["--overwrite"]  # another learning rate: start over
    short = ((status == "budget" and (was.get("time_budget") or 0) < time_budget)
             or (status == "max_iters" and (was.get("max_iters") or 0) < max_iters))
    if status in ("solved", "diverged", "budget", "max_iters") and not short:
        return None
    return command + (["--resume"] if path.with_suffix(".pt").exists() else ["--overwrite"])


def _run_queue(queue: list[list[str]], jobs: int, desc: str, quiet: bool) -> None:
    import os
    import subprocess
    import time

    from tqdm.auto import tqdm

    running: list = []
    bar = tqdm(total=len(queue), desc=desc, disable=quiet)
    while queue or running:
        while queue and len(running) < jobs:
            running.append(subprocess.Popen(queue.pop(0), env=dict(os.environ, OMP_NUM_THREADS="1"),
                                            stdout=subprocess.DEVNULL))
        time.sleep(1.0)
        for proc in [p for p in running if p.poll() is not None]:
            running.remove(proc)
            bar.update(1)
            if proc.returncode != 0:
                raise SystemExit(f"run {' '.join(proc.args[2:8])} failed with exit code {proc.returncode}")
    bar.close()


def pick_lr(runs: list[dict]) -> float:
    """The learning rate of the best of ``runs`` (one task, one optimizer, one seed, one
    budget): the earliest solved, else the lowest final test loss (a diverged run never wins)."""
    def score(r: dict) -> tuple:
        f = r["final"]
        if f.get("status") == "solved":
            return (0, f["time_s"])
        loss = f.get("test_loss")
        return (1, loss if f.get("status") != "diverged" and loss is not None and math.isfinite(loss) else math.inf)
    if not runs:
        raise ValueError("pick_lr needs at least one run")
    return min(runs, key=score)["config"]["lr"]


def run_all(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    """``--task all``: every (task, optimizer, seed) as its own process on one thread,
    ``--jobs`` at a time. A run whose JSON says it finished (solved, diverged, or its budget
    spent, at least this call's ``--time-budget`` / ``--max-iters``) is kept; one that was
    stopped or had a smaller budget continues from its saved state (``--resume``) where there is one, and
    starts over where there is not, so a killed driver picks up where it stopped. Writes
    ``summary.md`` and ``summary.png`` into ``--out``.

    With ``--lrs``, Adam's (and SGD's) learning rate is tuned per task first: the first
    seed runs at every rate for ``--tune-budget`` seconds (into ``--out``/tune, one JSON
    each, ``tune.md`` the table), the best by ``pick_lr`` is kept, and every seed then runs
    at it with the full budget."""
    import json

    out = Path(args.out)
    if out.suffix.lower() == ".json":
        raise SystemExit("--task all writes one JSON per run: give --out a directory")
    if args.lrs and args.lr is not None:
        raise SystemExit("--lrs tunes the learning rate: leave out --lr")
    if args.lrs and min(args.lrs) <= 0:
        raise SystemExit(f"--lrs must all be > 0, got {args.lrs}")
    out.mkdir(parents=True, exist_ok=True)
    # The options every run shares: argv without the driver's own.
    own = {"--task", "--tasks", "--optimizers", "--seeds", "--jobs", "--optimizer", "--seed", "--out", "--threads",
           "--resume", "--lrs", "--tune-budget", "--tag", "--overwrite"}
    shared, skip = [], False
    for a in argv:
        if skip and not a.startswith("--"):
            continue
        skip = a.split("=")[0] in own
        if not skip:
            shared.append(a)

    def command(task: str, opt: str, seed: int, where: Path, lr: float | None, tag: str | None, *extra: str):
        return ([sys.executable, str(SCRIPT), "--task", task, "--optimizer", opt, "--seed", str(seed),
                 "--threads", "1", "--out", str(where), "--no-progress", *shared, *extra]
                + (["--lr", repr(lr)] if lr is not None else []) + (["--tag", tag] if tag else []))

    tuned = [o for o in args.optimizers if o != "hf"] if args.lrs else []
    best: dict[tuple[str, str], float] = {}
    max_iters = args.max_iters or 0
    if tuned:
        tune_dir = out / "tune"

        def tune_tag(lr: float) -> str:
            return "_".join(filter(None, [args.tag, f"lr{lr:g}"]))

        def tune_path(task: str, opt: str, lr: float) -> Path:
            return tune_dir / f"{run_stem(task, args.T, opt, args.seeds[0], tune_tag(lr))}.json"

        queue = []
        for task in args.tasks:
            for opt in tuned:
                for lr in args.lrs:
                    cmd = command(task, opt, args.seeds[0], tune_dir, lr, tune_tag(lr),
                                  "--time-budget", str(args.tune_budget))
                    pending = _pending_run(tune_path(task, opt, lr), cmd, lr, args.tune_budget, max_iters)
                    if pending:
                        queue.append(pending)
        _run_queue(queue, args.jobs, "tuning runs", args.no_progress)
        rows = ["| task | optimizer | learning rate | after the tuning budget | chosen |", "|" + " --- |" * 5]
        for task in args.tasks:
            for opt in tuned:
                runs = [json.loads(tune_path(task, opt, lr).read_text()) for lr in args.lrs]
                best[task, opt] = pick_lr(runs)
                for r in runs:
                    f = r["final"]
                    how = (f"solved at {f['time_s']:,.0f} s" if f.get("status") == "solved"
                           else f"test loss {f.get('test_loss', math.nan):.4g}, error {f['test_error']:.3f}")
                    rows.append(f"| {task} | {opt} | {r['config']['lr']:g} | {how} | "
                                f"{'yes' if r['config']['lr'] == best[task, opt] else ''} |")
        (out / "tune.md").write_text("\n".join(rows) + "\n")
    queue = []
    for task in args.tasks:
        for opt in args.optimizers:
            lr = best.get((task, opt))
            for seed in args.seeds:
                pending = _pending_run(out / f"{run_stem(task, args.T, opt, seed, args.tag)}.json",
                                       command(task, opt, seed, out, lr, args.tag), lr, args.time_budget or 0,
                                       max_iters)
                if pending:
                    queue.append(pending)
    _run_queue(queue, args.jobs, "runs", args.no_progress)
    results = [json.loads(p.read_text()) for p in sorted(out.glob(f"rnn_*_T{args.T}_*.json"))]
    table = summarize(results)
    (out / "summary.md").write_text(table + "\n")
    plot_summary(results, out / "summary.png")
    print(table)
    return results
