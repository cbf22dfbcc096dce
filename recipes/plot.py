"""Plot recipe results: training (solid) and test (dashed) error against wall time and
against epochs, one curve per result file; or, with ``--by-task``, the RNN recipe's runs
as one panel per task (test error against time, every seed and optimizer).

    python recipes/plot.py results/*.json --out results/comparison.png
    python recipes/plot.py docs/results/rnn/*.json --by-task --out results/rnn.png
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable, ContextManager, Sequence


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


def add_clock_option(ap: argparse.ArgumentParser, default: str = "wall") -> None:
    """The recipes' ``--clock`` option: what a ``--time-budget`` counts."""
    ap.add_argument("--clock", choices=["wall", "cpu"], default=default,
                    help="what the budget counts: wall time, or this process's CPU time (fair when other jobs "
                         f"share the machine; use with --threads; default {default})")


def budget_clock(name: str | None) -> Callable[[], float]:
    """The timer a ``--clock`` value names (default wall time)."""
    return time.process_time if name == "cpu" else time.perf_counter


def add_subnormal_option(ap: argparse.ArgumentParser) -> None:
    """The recipes' ``--keep-subnormals`` option (see :func:`subnormals_flushed`)."""
    ap.add_argument("--keep-subnormals", action="store_true",
                    help="CPU: leave torch's default subnormal-float handling for the whole run. By default "
                         "subnormals are flushed to zero for every optimizer, as HessianFree does inside its "
                         "steps; without that, a baseline whose tiny gradients turn subnormal runs several "
                         "times slower per update (benchmarks/subnormals.py)")


def subnormals_flushed(enabled: bool) -> ContextManager[bool]:
    """Flush subnormal floats to zero (``torch.set_flush_denormal``) inside the block when
    ``enabled``, and restore the caller's mode afterwards. Yields whether flushing is in force.
    The same context ``HessianFree(flush_denormal=True)`` wraps its steps in.

    A recipe that compares optimizers on CPU time runs every optimizer under this: HessianFree
    flushes inside its steps by default, and a baseline left with subnormals (a saturated RNN's
    vanishing gradients, Adam's second moments of them) would be charged x86's slow path, 5.7x
    per Adam update measured in the RNN recipe, for no difference in the arithmetic that matters."""
    from torch_hf.optimizer import _denormals_flushed

    return _denormals_flushed(enabled)


def output_paths(out: str | Path, stem: str) -> tuple[Path, Path]:
    """Where a recipe writes: ``out`` is a directory (``<out>/<stem>.json`` and ``.png``) or a
    ``.json`` file path (the PNG goes beside it). Raises ``SystemExit`` with the reason when
    ``out`` names something of the other kind."""
    out = Path(out)
    if out.suffix.lower() == ".json":
        if out.is_dir():
            raise SystemExit(f"--out {out}: that is a directory; give a .json file path or a directory")
        return out, out.with_suffix(".png")
    if out.exists() and not out.is_dir():
        raise SystemExit(f"--out {out}: that is a file; give a directory or a .json file path")
    return out / f"{stem}.json", out / f"{stem}.png"


def check_args(ap: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str] = (),
               non_negative: Sequence[str] = ()) -> None:
    """Reject option values that would run but mean nothing (``ap.error`` names the option):
    ``positive`` and ``non_negative`` list attribute names (``None`` values are skipped);
    ``--device`` must be available here."""
    for names, ok, what in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0")):
        for name in names:
            value = getattr(args, name, None)
            if value is not None and not ok(value):
                ap.error(f"--{name.replace('_', '-')} must be {what}, got {value}")
    device = getattr(args, "device", None)
    if device is not None:
        import torch

        try:
            kind = torch.device(device).type
        except RuntimeError as exc:
            ap.error(f"--device {device}: {exc}")
        if kind == "cuda" and not torch.cuda.is_available():
            ap.error(f"--device {device}: CUDA is not available on this machine (torch {torch.__version__}); "
                     "use --device cpu")
        if kind == "mps" and not torch.backends.mps.is_available():
            ap.error(f"--device {device}: MPS is not available on this machine; use --device cpu")


def progress_bar(enabled: bool, budget: float, max_iters: int | None, desc: str, position: int | None = None):
    """The recipes' tqdm bar: seconds of the training budget (evaluations and setup are not
    counted, so the bar can read 60/60 s after longer on the clock), or updates without a
    budget (``None`` when ``enabled`` is false). ``position``: the line of a bar among
    several drawn side by side."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s training [{elapsed}{postfix}]" if budget > 0 else None
    return tqdm(total=budget if budget > 0 else max_iters, unit="s" if budget > 0 else "it", desc=desc,
                dynamic_ncols=True, bar_format=fmt, position=position)


def write_json(result: dict, json_path: str | Path) -> None:
    """Write a recipe's results dict (also used for the partial results of a running job)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))


def save_results(result: dict, json_path: str | Path, png_path: str | Path, title: str, **plot_kwargs) -> None:
    """Write a recipe's results JSON and its PNG (``plot_kwargs`` go to :func:`plot_results`)."""
    write_json(result, json_path)
    plot_results([str(json_path)], str(png_path), title=title, **plot_kwargs)


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
