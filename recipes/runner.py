"""What every recipe's training run shares, so that a recipe keeps only its problem (data,
model, loss, error): the loop against a time budget in wall or process CPU time, the
evaluation schedule, the progress bar, resuming, subnormal flushing, and where the JSON
and PNG go.

    run = Run(Budget(seconds=60, clock="cpu"), evaluate, desc="pinn hf")
    status = run.loop(update)                # update() -> the row's extra fields
    result = run.result(config, **final_fields)

``update`` is timed by the budget's clock; evaluations and anything in ``prepare`` are not.
"""
from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ContextManager

__all__ = ["Budget", "Run", "add_clock_option", "budget_clock", "add_subnormal_option", "subnormals_flushed",
           "progress_bar", "output_paths", "write_json"]


def budget_clock(name: str | None) -> Callable[[], float]:
    """The timer a ``--clock`` value names (default wall time)."""
    return time.process_time if name == "cpu" else time.perf_counter


@dataclass
class Budget:
    """How long a run trains: ``seconds`` of training by ``clock`` ("wall" or "cpu"; 0: no
    time limit) and at most ``max_iters`` updates; an evaluation every ``eval_every``
    seconds of training (``None``: after every update)."""

    seconds: float = 0.0
    max_iters: int | None = None
    clock: str | None = "wall"
    eval_every: float | None = None

    def __post_init__(self) -> None:
        if not self.seconds > 0 and not self.max_iters:
            raise SystemExit("give a --time-budget or --max-iters")


class Run:
    """One optimizer's training run: the clock, the history of evaluations and the
    counters, carried over from a saved run by ``resume`` (a dict of :meth:`snapshot`)."""

    def __init__(self, budget: Budget, evaluate: Callable[[int, float, dict], dict], desc: str,
                 progress: bool = True, position: int | None = None, first_eval: float = 0.0,
                 postfix: Callable[[dict], dict] | None = None) -> None:
        self.budget, self.evaluate_fn, self.postfix = budget, evaluate, postfix
        self.clock = budget_clock(budget.clock)
        self.history: list[dict] = []
        self.train_time, self.iterations, self.last_eval = 0.0, 0, first_eval
        self.last_update, self.evaluation_time, self.started = 0.0, 0.0, time.perf_counter()
        self.stop_requested = False
        self.bar = progress_bar(progress, budget.seconds, budget.max_iters, desc, position)

    def resume(self, saved: dict) -> None:
        """Continue from :meth:`snapshot`'s dict: the clock, the counters and the history."""
        self.train_time, self.iterations, self.last_eval = saved["train_time"], saved["it"], saved["last_eval"]
        self.history.extend(saved["history"])
        if self.bar is not None:
            self.bar.update(min(self.train_time, self.budget.seconds) if self.budget.seconds > 0 else self.iterations)

    def snapshot(self) -> dict:
        return {"train_time": self.train_time, "it": self.iterations, "last_eval": self.last_eval,
                "history": self.history}

    def evaluate(self, extra: dict | None = None) -> dict:
        """Evaluate now (the time it takes is not training time) and append the row."""
        t = time.perf_counter()
        row = self.evaluate_fn(self.iterations, self.train_time, dict(extra or {}))
        self.history.append(row)
        self.evaluation_time += time.perf_counter() - t
        if self.bar is not None and self.postfix is not None:
            self.bar.set_postfix(**self.postfix(row))
        return row

    def due(self) -> bool:
        every = self.budget.eval_every
        return every is None or self.train_time - self.last_eval >= every

    def loop(self, update: Callable[[], dict], *, prepare: Callable[[], None] | None = None,
             due: Callable[[], bool] | None = None, after_eval: Callable[[dict], str | None] | None = None,
             stop: Callable[[bool], bool] | None = None, diverged: Callable[[], bool] | None = None) -> str:
        """Train until the budget is spent: ``prepare()`` (untimed), ``update()`` (timed;
        returns extra fields for the next evaluation row), an evaluation when ``due()``
        (default: every ``eval_every`` seconds of training) after which ``after_eval(row)``
        may end the run with a status ("solved"). ``stop(local)`` turns this process's
        budget verdict into the group's (rank 0's clock decides). Returns the status:
        "budget", "max_iters", "interrupted", "diverged" or ``after_eval``'s."""
        budget, due = self.budget, due or self.due
        while True:
            if budget.max_iters and self.iterations >= budget.max_iters:
                return "max_iters"
            spent = budget.seconds > 0 and self.train_time >= budget.seconds
            if stop(spent) if stop is not None else spent:
                return "budget"
            if self.stop_requested:
                return "interrupted"
            if prepare is not None:
                prepare()
            t0 = self.clock()
            extra = update()
            self.last_update = self.clock() - t0
            self.train_time += self.last_update
            self.iterations += 1
            if self.bar is not None:
                step = min(self.last_update, max(budget.seconds - self.bar.n, 0)) if budget.seconds > 0 else 1
                self.bar.update(step)
            if due():
                row = self.evaluate(extra)
                self.last_eval = self.train_time
                status = after_eval(row) if after_eval is not None else None
                if status:
                    return status
            if diverged is not None and diverged():
                return "diverged"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def result(self, config: dict, status: str, **final: object) -> dict:
        """``{"config", "history", "final"}``: the last evaluation row (one is made if the
        last update has none) with the counters, the status and where the time went."""
        self.close()
        if not self.history or self.history[-1]["iter"] != self.iterations:
            self.evaluate()
        out = dict(self.history[-1])
        out.update(iterations=self.iterations, status=status, last_update_s=self.last_update,
                   evaluation_s=self.evaluation_time, elapsed_s=time.perf_counter() - self.started)
        out.update(final)
        return {"config": config, "history": self.history, "final": out}


def diverged(params) -> bool:
    """A parameter is not finite (the run has diverged)."""
    return not all(math.isfinite(float(p.detach().abs().max())) for p in params)


def add_clock_option(ap: argparse.ArgumentParser, default: str = "wall") -> None:
    """The recipes' ``--clock`` option: what a ``--time-budget`` counts."""
    ap.add_argument("--clock", choices=["wall", "cpu"], default=default,
                    help="what the budget counts: wall time, or this process's CPU time (fair when other jobs "
                         f"share the machine; use with --threads; default {default})")


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


def write_json(result: dict, json_path: str | Path) -> None:
    """Write a recipe's results dict (also used for the partial results of a running job)."""
    json_path = Path(json_path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(result, indent=1))


def save_results(result: dict, json_path: str | Path, png_path: str | Path, title: str, **plot_kwargs) -> None:
    """Write a recipe's results JSON and its PNG (``plot_kwargs`` go to ``recipes.plot.plot_results``)."""
    from recipes.plot import plot_results

    write_json(result, json_path)
    plot_results([str(json_path)], str(png_path), title=title, **plot_kwargs)
