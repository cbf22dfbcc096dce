"""What every recipe's command line does alike: reject option values that mean nothing,
refuse to overwrite earlier results, refuse batch sizes that cannot be used as given, and
say in words what a run did (where the time went).
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Iterable, Sequence


def add_overwrite_option(ap: argparse.ArgumentParser) -> None:
    """``--overwrite``: without it, a run whose result files exist stops before training."""
    ap.add_argument("--overwrite", action="store_true",
                    help="replace result files of an earlier run with the same name (without it the recipe "
                         "stops before training; --tag NAME writes beside them instead)")


def refuse_overwrite(ap: argparse.ArgumentParser, paths: Iterable[str | Path], overwrite: bool) -> None:
    """``ap.error`` (one line, exit 2) when a result file exists and ``overwrite`` is false."""
    if overwrite:
        return
    existing = [str(p) for p in paths if Path(p).exists()]
    if existing:
        ap.error(f"{existing[0]} exists from an earlier run"
                 + (f" (and {len(existing) - 1} more)" if len(existing) > 1 else "")
                 + ": pass --overwrite to replace it, or --tag NAME / --out DIR to write beside it")


def curvature_batch(ap: argparse.ArgumentParser, requested: int | None, batch: int, default: int) -> int:
    """The HF curvature batch (§12.1), a subset of the gradient batch: ``requested`` as
    given, or ``default`` capped at the gradient batch when not given; a requested size
    larger than the gradient batch is refused (``ap.error``) rather than quietly cut."""
    if requested is None:
        return min(default, batch)
    if requested > batch:
        ap.error(f"--curvature-batch-size {requested} is larger than the gradient batch ({batch}): the curvature "
                 "batch is a subset of the gradient batch (§12.1); give a size <= the gradient batch")
    return requested


def time_report(final: dict, budget: float, clock: str | None) -> str:
    """Where a run's time went, in one sentence: the training time the budget counts, why
    it may exceed the budget (an update is never cut short), and the time the budget does
    not count (evaluations, setup)."""
    what = "CPU" if clock == "cpu" else "wall"
    train = final.get("time_s", 0.0)
    parts = [f"{train:.0f} s of training ({what} time)"]
    if budget > 0 and train - budget > max(0.05 * budget, 1.0):
        last = final.get("last_update_s")
        parts[0] += (f", {train - budget:.0f} s past the {budget:g} s budget: an update is never cut short"
                     + (f", and the last one took {last:.0f} s" if last else ""))
    if final.get("evaluation_s") is not None:
        parts.append(f"{final['evaluation_s']:.0f} s of evaluation, which the budget does not count")
    if final.get("elapsed_s") is not None:
        parts.append(f"{final['elapsed_s']:.0f} s wall time in all")
    return "; ".join(parts)


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
