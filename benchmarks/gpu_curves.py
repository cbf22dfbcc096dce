"""HF against Adam tuned over learning rate and batch size on CURVES, at equal wall time on
one GPU, in about one device call (issue 26: HF's training error at 60 s and at 4 min).

Timing the whole Adam grid alone on the GPU would cost six times the longest budget. Adam's
update takes the same time at every learning rate and every step of a run (a fixed batch;
evaluations are outside the budget), so its error after ``t`` seconds of training is its
error after ``rate × t`` updates, where ``rate`` is its steady update rate measured alone.
The run therefore:

1. probes Adam's rate alone for each batch size (``--probe-seconds`` of training; the rate
   of the last three quarters, so that warm-up counts for nothing: generous to Adam);
2. trains HF alone for the longest budget (``recipes/autoencoder.py --device cuda``, the
   recipe's GPU batches unless given) and reads its error at each budget from its history
   (the last evaluation at or before the budget);
3. trains each Adam configuration (``--adam-lrs`` × ``--adam-batches``, ``fused=True`` on
   CUDA) for ``rate × budget`` updates, ``--parallel`` of them at a time: sharing the GPU
   slows them, but it cannot change the error after a given number of updates. The error
   at each budget is the evaluation nearest to ``rate × budget`` updates (evaluations every
   ``--eval-every`` seconds of training; the final one is at the longest budget exactly).
   A run stopped by its guard (``--guard`` seconds of wall time: it trains for at most 30 s
   less, then writes its results; it is killed at the guard) is reported with the updates
   it reached.

Steps 1 and 2 need the GPU alone (``--stage solo``); step 3 may share it, for instance with
the test suite (``--stage grid`` reads the solo stage's results from ``--out``), which is how
``benchmarks/gpu_session.sh`` fits the comparison into one lent GPU session.

Prints per budget HF's error, each Adam's, the best Adam and the ratio HF / best Adam
(< 1: HF ahead); writes ``summary.json`` and ``curves.png`` (training error against time)
to ``--out`` with every run's JSON.

    python benchmarks/gpu_curves.py --device cuda --budgets 60 240 --out results/gpu_curves
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

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "autoencoder.py"


def steady_rate(history: list[dict], skip: float = 0.25) -> float:
    """Updates per second of training over the rows after the first ``skip`` of the run."""
    rows = [r for r in history if r.get("time_s") is not None]
    if len(rows) < 2 or rows[-1]["time_s"] <= 0:
        raise ValueError("a rate needs at least two evaluations after some training")
    start = next(r for r in rows if r["time_s"] >= skip * rows[-1]["time_s"])
    if start is rows[-1]:
        start = rows[0]
    return (rows[-1]["iter"] - start["iter"]) / (rows[-1]["time_s"] - start["time_s"])


def row_at_time(history: list[dict], seconds: float) -> dict:
    """The last evaluation at or before ``seconds`` of training."""
    rows = [r for r in history if r["time_s"] <= seconds + 1e-9]
    if not rows:
        raise ValueError(f"no evaluation at or before {seconds} s")
    return rows[-1]


def row_at_updates(history: list[dict], updates: float) -> dict:
    """The evaluation nearest to ``updates`` updates."""
    return min(history, key=lambda r: abs(r["iter"] - updates))


def recipe_command(out: Path, tag: str, args: argparse.Namespace, *options: str) -> list[str]:
    common = ["--device", args.device, "--no-progress", "--overwrite", "--out", str(out), "--tag", tag,
              "--seed", str(args.seed)]
    for flag, value in (("--train-size", args.train_size), ("--test-size", args.test_size),
                        ("--data-dir", args.data_dir)):
        if value is not None:
            common += [flag, str(value)]
    return [sys.executable, str(RECIPE), *common, *options]


def run_all(commands: dict[str, list[str]], parallel: int, guard: float, logs: Path) -> None:
    """Run the commands, ``parallel`` at a time, each killed after ``guard`` s of wall time."""
    pending, running = list(commands.items()), []
    while pending or running:
        while pending and len(running) < parallel:
            name, cmd = pending.pop(0)
            log = open(logs / f"{name}.log", "w")
            running.append((name, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log,
                            time.perf_counter()))
        time.sleep(0.2)
        for item in list(running):
            name, proc, log, t0 = item
            if proc.poll() is None and time.perf_counter() - t0 > guard:
                proc.kill()
                proc.wait()
            if proc.poll() is not None:
                log.close()
                running.remove(item)


def load(out: Path, optimizer: str, tag: str, seed: int) -> dict | None:
    path = out / f"autoencoder_curves_{optimizer}_seed{seed}_{tag}.json"
    return json.loads(path.read_text()) if path.exists() else None


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budgets", type=float, nargs="+", default=[60.0, 240.0], help="seconds of training")
    ap.add_argument("--adam-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    ap.add_argument("--adam-batches", type=int, nargs="+", default=[200, 1000])
    ap.add_argument("--hf-batch", type=int, default=None, help="HF gradient batch (default: the recipe's)")
    ap.add_argument("--hf-curvature-batch", type=int, default=None, help="HF curvature batch (default: the recipe's)")
    ap.add_argument("--probe-seconds", type=float, default=20.0)
    ap.add_argument("--eval-every", type=float, default=1.0, help="seconds of training between evaluations")
    ap.add_argument("--parallel", type=int, default=6, help="Adam runs at a time")
    ap.add_argument("--guard", type=float, default=420.0, help="wall seconds after which an Adam run is stopped")
    ap.add_argument("--train-size", type=int, default=None)
    ap.add_argument("--test-size", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", choices=["all", "solo", "grid"], default="all",
                    help="solo: the probes and HF (the runs that must have the GPU alone); grid: the Adam grid "
                         "and the report, from the solo stage's results in --out (it may share the GPU with "
                         "other work); all: both")
    ap.add_argument("--out", default="results/gpu_curves")
    args = ap.parse_args(argv)
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    if args.data_dir is not None:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    longest = max(args.budgets)
    t_start = time.perf_counter()

    solo = args.stage in ("all", "solo")
    # 1. Adam's steady rate, alone, per batch size (the learning rate does not change it)
    rates = {}
    for batch in args.adam_batches:
        tag = f"probe_b{batch}"
        if solo:
            run_all({tag: recipe_command(out, tag, args, "--optimizer", "adam", "--lr", str(args.adam_lrs[0]),
                                         "--batch-size", str(batch), "--time-budget", str(args.probe_seconds),
                                         "--eval-every", str(args.probe_seconds / 8))}, 1,
                    10 * args.probe_seconds + 120, out / "logs")
        probe = load(out, "adam", tag, args.seed)
        if probe is None:
            raise SystemExit(f"the Adam probe at batch {batch} wrote no result: see {out}/logs/{tag}.log" if solo else
                             f"no Adam probe at batch {batch} in {out}: the grid stage needs the solo stage's results")
        rates[batch] = steady_rate(probe["history"])

    # 2. HF alone
    if solo:
        hf_options = ["--optimizer", "hf", "--time-budget", str(longest), "--eval-every", str(args.eval_every)]
        if args.hf_batch is not None:
            hf_options += ["--batch-size", str(args.hf_batch)]
        if args.hf_curvature_batch is not None:
            hf_options += ["--curvature-batch-size", str(args.hf_curvature_batch)]
        run_all({"hf": recipe_command(out, "hf", args, *hf_options)}, 1, longest * 3 + 120, out / "logs")
    hf = load(out, "hf", "hf", args.seed)
    if hf is None:
        raise SystemExit(f"the HF run wrote no result: see {out}/logs/hf.log" if solo else
                         f"no HF run in {out}: the grid stage needs the solo stage's results")
    if args.stage == "solo":
        print(f"solo stage done in {time.perf_counter() - t_start:.0f} s: Adam's rates alone "
              + ", ".join(f"batch {b}: {r:.0f} updates/s" for b, r in rates.items())
              + f"; HF {hf['final']['iterations']} updates, final train error {hf['final']['train_error']:.3f}")
        return {"adam_rates": rates}

    # 3. the Adam grid by update counts, several at a time
    grid = {f"adam_lr{lr:g}_b{batch}": (lr, batch) for batch in args.adam_batches for lr in args.adam_lrs}
    commands = {tag: recipe_command(out, tag, args, "--optimizer", "adam", "--lr", str(lr), "--batch-size", str(batch),
                                    "--max-iters", str(math.ceil(rates[batch] * longest)),
                                    "--time-budget", f"{max(args.guard - 30.0, 1.0):g}",  # stop with its results
                                    "--eval-every", str(args.eval_every), "--threads", "1")
                for tag, (lr, batch) in grid.items()}
    run_all(commands, args.parallel, args.guard, out / "logs")
    adam = {tag: res for tag in grid if (res := load(out, "adam", tag, args.seed)) is not None}

    summary: dict = {"device": args.device, "budgets": args.budgets, "adam_rates": rates, "budget_rows": [],
                     "hf": {"batch": hf["config"]["gradient_batch"], "curvature_batch": hf["config"]["curvature_batch"],
                            "updates": hf["final"]["iterations"]},
                     "adam": {}, "wall_s": None}
    for tag, (lr, batch) in grid.items():
        summary["adam"][tag] = {"lr": lr, "batch": batch, "target_updates": math.ceil(rates[batch] * longest),
                                "updates": adam[tag]["final"]["iterations"] if tag in adam else None}
    for budget in args.budgets:
        hf_row = row_at_time(hf["history"], budget)
        entry = {"budget_s": budget, "hf_train_error": hf_row["train_error"], "hf_test_error": hf_row["test_error"],
                 "hf_time_s": hf_row["time_s"], "hf_updates": hf_row["iter"], "adam": {}}
        for tag, res in adam.items():
            want = rates[grid[tag][1]] * budget
            row = row_at_updates(res["history"], want)
            entry["adam"][tag] = {"train_error": row["train_error"], "test_error": row["test_error"],
                                  "updates": row["iter"], "equal_time_updates": round(want),
                                  # stopped by the guard short of its equal-time updates: an upper bound on its error
                                  "cut_short": res["final"]["iterations"] < math.ceil(want)}
        if entry["adam"]:
            best = min(entry["adam"], key=lambda k: entry["adam"][k]["train_error"])
            entry["best_adam"] = best
            entry["ratio_hf_over_best_adam"] = entry["hf_train_error"] / entry["adam"][best]["train_error"]
        summary["budget_rows"].append(entry)
    summary["wall_s"] = round(time.perf_counter() - t_start, 1)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(report(summary))
    try:
        plot(out, hf, adam, grid, rates, summary)
    except ImportError:
        pass
    return summary


def report(summary: dict) -> str:
    lines = ["Adam's steady rates alone: " + ", ".join(f"batch {b}: {r:.0f} updates/s"
                                                      for b, r in summary["adam_rates"].items()),
             f"HF: batch {summary['hf']['batch']} / {summary['hf']['curvature_batch']}",
             "| budget | HF train error (updates) | best Adam (lr, batch, updates) | HF / Adam |", "| --- | --- | --- | --- |"]
    for e in summary["budget_rows"]:
        if "best_adam" in e:
            a = e["adam"][e["best_adam"]]
            cfg = summary["adam"][e["best_adam"]]
            adam = (f"{a['train_error']:.3f} (lr {cfg['lr']:g}, batch {cfg['batch']}, {a['updates']} of "
                    f"{a['equal_time_updates']}{', cut short' if a['cut_short'] else ''})")
            ratio = f"{e['ratio_hf_over_best_adam']:.2f}"
        else:
            adam, ratio = "no run", "-"
        lines.append(f"| {e['budget_s']:g} s | {e['hf_train_error']:.3f} ({e['hf_updates']}) | {adam} | {ratio} |")
    lines.append("every Adam at each budget (train error, updates reached of equal-time updates):")
    for e in summary["budget_rows"]:
        lines.append(f"  {e['budget_s']:g} s: " + "; ".join(f"{k} {v['train_error']:.3f} ({v['updates']}/"
                                                            f"{v['equal_time_updates']})" for k, v in e["adam"].items()))
    return "\n".join(lines)


def plot(out: Path, hf: dict, adam: dict, grid: dict, rates: dict, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot([r["time_s"] for r in hf["history"]], [r["train_error"] for r in hf["history"]], "k-", lw=2,
            label=f"HF {summary['hf']['batch']} / {summary['hf']['curvature_batch']}")
    for tag, res in adam.items():
        lr, batch = grid[tag]
        ax.plot([r["iter"] / rates[batch] for r in res["history"]], [r["train_error"] for r in res["history"]],
                lw=1, label=f"Adam lr {lr:g}, batch {batch}")
    ax.set_xlabel("seconds of training (Adam: updates / its rate alone)")
    ax.set_ylabel("training error")
    ax.set_yscale("log")
    ax.set_title(f"CURVES on {summary['device']}, equal time")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
