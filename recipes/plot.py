"""Plot recipe results: training (solid) and test (dashed) error against wall time and
against epochs, one curve per result file; or, with ``--by-task``, the RNN recipe's runs
as one panel per task (test error against time, every seed and optimizer).

    python recipes/plot.py results/*.json --out results/comparison.png
    python recipes/plot.py docs/results/rnn/*.json --by-task --out results/rnn.png
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Sequence


def _label(result: dict, path: str) -> str:
    cfg = result.get("config", {})
    name = cfg.get("optimizer", Path(path).stem)
    extra = f" lr={cfg['lr']:g}" if cfg.get("optimizer") in ("adam", "sgd") and cfg.get("lr") is not None else ""
    if cfg.get("optimizer") == "hf" and cfg.get("preconditioner") == "none":
        extra += " (no preconditioner)"
    if cfg.get("optimizer") == "hf" and cfg.get("gradient_batch"):
        extra = f" {cfg['gradient_batch']}/{cfg.get('curvature_batch') or cfg['gradient_batch']}"
    if cfg.get("task"):  # RNN results: several tasks may share one plot
        extra += f" {cfg['task']}" + (f" seed {cfg['seed']}" if cfg.get("seed") else "")
    return f"{name}{extra}"


def plot_results(paths: Sequence[str], out: str, title: str | None = None, metric: str = "train_error",
                 dashed: str | None = "test_error", x2: tuple[str, str] | None = None,
                 ylabel: str | None = None) -> str:
    """Write a PNG with ``metric`` (solid) and ``dashed`` (if not ``None``) against training
    time and, on the right, against ``x2 = (history key, axis label)``: by default epochs
    (thousands of sequences for the RNN recipe's fresh data); updates (``"iter"``) are drawn
    on a logarithmic axis, since optimizers differ in them by orders of magnitude.
    ``ylabel`` names what ``metric`` measures (default: its key, with the dashed one's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    clocks, fresh_data = set(), True
    for i, path in enumerate(paths):
        with open(path) as fh:
            result = json.load(fh)
        clocks.add(result.get("config", {}).get("clock") or "wall")
        fresh_data &= "task" in result.get("config", {})  # the RNN recipe draws new sequences per update
        rows = [r for r in result["history"] if r.get(metric) is not None]
        if not rows:
            continue
        color = f"C{i}"
        label = _label(result, path)
        for ax, key in zip(axes, ("time_s", x2[0] if x2 else "epoch")):
            ax.plot([r[key] for r in rows], [r[metric] for r in rows], color=color,
                    label=label if ylabel else f"{label} {metric.split('_')[0]}")
            test = [r for r in rows if dashed is not None and r.get(dashed) is not None]
            if test:
                ax.plot([r[key] for r in test], [r[dashed] for r in test], color=color, ls="--",
                        label=f"{label} {dashed.split('_')[0]}")
    clock = {"wall": "wall", "cpu": "CPU"}.get(clocks.pop(), "") if len(clocks) == 1 else "wall or CPU"
    seen = x2[1] if x2 else "training sequences (thousands)" if fresh_data else "epochs"
    if ylabel is None:
        ylabel = metric.replace("_", " ")
        if dashed is not None:
            ylabel = f"{ylabel} (solid), {dashed.replace('_', ' ')} (dashed)"
    if x2 and x2[0] == "iter":
        axes[1].set_xscale("symlog", linthresh=1)
    for ax, xlabel in zip(axes, (f"training {clock} time (s)", seen)):
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        values = [y for line in ax.get_lines() for y in line.get_ydata()]
        if values and min(values) > 0:
            ax.set_yscale("log")
        else:  # an error of exactly 0 (a solved task) has no place on a log axis
            ax.set_yscale("symlog", linthresh=1e-3)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_by_task(results: Sequence[dict], out: str | Path, order: Sequence[str] = ()) -> str:
    """One panel per (task, T) of the RNN recipe's results: test error against training
    time, HF solid, Adam dashed, SGD dotted, one line per run; the grey line is the 1%
    "solved" threshold. Panels follow ``order`` (task names), then first appearance."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("no results to plot")
    rank = {task: i for i, task in enumerate(order)}
    for r in results:  # tasks not in ``order`` rank after it, by first appearance
        rank.setdefault(r["config"]["task"], len(rank))
    keys = sorted({(r["config"]["task"], r["config"]["T"]) for r in results}, key=lambda k: (rank[k[0]], k[1]))
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.9 * rows), squeeze=False)
    styles = {"hf": ("C0", "-"), "adam": ("C1", "--"), "sgd": ("C2", ":")}
    clocks = {r["config"].get("clock") or "wall" for r in results}
    clock = clocks.pop() if len(clocks) == 1 else "wall or CPU"
    for ax, (task, T) in zip(axes.flat, keys):
        labelled = set()
        for r in results:
            c = r["config"]
            if (c["task"], c["T"]) != (task, T):
                continue
            color, ls = styles.get(c["optimizer"], ("C3", "-."))
            h = r["history"]
            ax.plot([x["time_s"] for x in h], [x["test_error"] for x in h], color=color, ls=ls, lw=1.2,
                    label=None if c["optimizer"] in labelled else c["optimizer"])
            labelled.add(c["optimizer"])
        ax.axhline(0.01, color="gray", lw=0.6)
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.set_ylim(0, 1.05)  # errors are fractions: no negative half of the symlog axis
        ax.set_title(f"{task}, T={T}", fontsize=9)
        ax.set_xlabel(f"training {clock} time (s)", fontsize=8)
        ax.set_ylabel("test error", fontsize=8)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return str(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("results", nargs="+", help="result JSON files written by a recipe")
    ap.add_argument("--out", default="results/comparison.png")
    ap.add_argument("--title", default=None)
    ap.add_argument("--metric", default="train_error")
    ap.add_argument("--by-task", action="store_true",
                    help="RNN recipe results: one panel per task and T, test error against time, HF and Adam "
                         "runs of every seed together (what rnn_pathological.py --summary draws)")
    args = ap.parse_args(argv)
    if args.by_task:
        results = [json.loads(Path(p).read_text()) for p in args.results]
        print(plot_by_task(results, args.out))
        return
    print(plot_results(args.results, args.out, args.title, args.metric,
                       dashed=None if args.metric == "test_error" else "test_error"))


if __name__ == "__main__":
    main()
