"""Deep autoencoders of Martens (2010), trained with HF or a first-order baseline.

    python recipes/autoencoder.py                      # CURVES, HF, default time budget
    python recipes/autoencoder.py --optimizer all      # HF, then Adam (lr 1e-3), the same budget each
    python recipes/autoencoder.py --optimizer adam --lr 1e-3
    python recipes/autoencoder.py --dataset mnist --data-dir ~/mnist
    python recipes/autoencoder.py --full               # the paper's schedule, no time budget

Architectures (mirrored decoders, logistic hidden units, linear code layer, sigmoid
cross-entropy output with the logits fed to the loss, §6.2; sparse initialization with
15 incoming weights per unit):

* CURVES 784-400-200-100-50-25-6 (data generated, see ``recipes/data.py``)
* MNIST 784-1000-500-250-30

Error as in the papers: mean over cases of the summed squared reconstruction error on
the 0..1 pixel scale. Results go to ``--out`` as JSON (``{"config", "history",
"final"}``) and a PNG of training error against wall time and epochs.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make ``recipes`` and ``torch_hf`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch_hf  # noqa: E402
from recipes.data import load_curves, load_mnist  # noqa: E402
from recipes.models import CURVES_LAYERS, MNIST_LAYERS, deep_autoencoder  # noqa: E402
from recipes.cli import add_overwrite_option, check_args, curvature_batch, refuse_overwrite, time_report  # noqa: E402
from recipes.runner import (Budget, Run, add_clock_option, add_subnormal_option, diverged, save_results,  # noqa: E402
                            subnormals_flushed)
from recipes.runner import output_paths as _output_paths  # noqa: E402

DEFAULT_TIME_BUDGET = 480.0
DEFAULT_CURVATURE_BATCH = 250
# What `--optimizer all` printed with the defaults on a 2-core x86 CPU (docs/autoencoders.md).
EXPECTED = ("Expected at 480 s (2-core x86 CPU, one thread each, docs/autoencoders.md): HF train error about 10 "
            "(840 updates), Adam about 1.6: on CURVES Adam is about 6x ahead, as the README's table says.")
LAYERS = {"curves": CURVES_LAYERS, "mnist": MNIST_LAYERS}
DEFAULTS = {  # per optimizer: batch size, learning rate
    "hf": {"batch_size": 1000, "lr": 1.0},
    "adam": {"batch_size": 200, "lr": 1e-3},
    "sgd": {"batch_size": 200, "lr": 3e-5},
}
# On a GPU larger batches cost little more per update (§7, §12): CURVES on one H200, 60 s of
# training (issue 26, docs/gpus.md), HF at 5000 / 1250 cases reached a train error of 6.28
# where 1000 / 250 reached 10.6, and Adam at batch 1000 with lr 3e-3 reached 2.06 where batch
# 200 with lr 1e-3 reached 3.01 (the best of the grid tried there).
CUDA_DEFAULTS = {
    "hf": {"batch_size": 5000, "lr": 1.0, "curvature_batch_size": 1250},
    "adam": {"batch_size": 1000, "lr": 3e-3},
}


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"Default: CURVES with HF for a {DEFAULT_TIME_BUDGET:.0f} s training-time budget (about 10 minutes "
               "in all on a 2-core CPU, data generation and evaluations included).")
    ap.add_argument("--dataset", choices=["curves", "mnist"], default="curves")
    ap.add_argument("--optimizer", choices=["hf", "adam", "sgd", "all"], default="hf",
                    help="all: HF, then Adam at its tuned learning rate (1e-3, batch 200), each with the same "
                         "budget, and a table of both")
    ap.add_argument("--time-budget", type=float, default=DEFAULT_TIME_BUDGET,
                    help=f"seconds of training (evaluation excluded); 0 for none (default {DEFAULT_TIME_BUDGET:.0f})")
    add_clock_option(ap)
    ap.add_argument("--max-iters", type=int, default=None, help="stop after this many updates")
    ap.add_argument("--full", action="store_true",
                    help="the paper's HF schedule: gradient on the whole training set, curvature on a quarter, "
                         "CG up to 250 with the progress test, lambda 45, the diagonal of each step, no time "
                         "budget, 1000 iterations unless --max-iters")
    ap.add_argument("--batch-size", type=int, default=None,
                    help="gradient minibatch (default: hf 1000, adam/sgd 200; on CUDA hf 5000 with a curvature "
                         "batch of 1250, adam 1000 with lr 3e-3, measured on an H200); 0 means the whole training set")
    ap.add_argument("--curvature-batch-size", type=int, default=None,
                    help="HF curvature minibatch, a subset of the gradient batch (§12.1; default 250, or the "
                         "gradient batch if smaller; a larger size than the gradient batch is refused)")
    ap.add_argument("--cg-max-iters", type=int, default=None, help="HF: most CG iterations (library default 250)")
    ap.add_argument("--cg-tol", type=float, default=None,
                    help="HF: relative-progress tolerance of CG (library default 5e-4; 0 runs every CG step)")
    ap.add_argument("--cg-stop", choices=["rate", "progress"], default=None,
                    help="HF: CG termination (library default rate; --full: progress, the paper's)")
    ap.add_argument("--damping", type=float, default=None,
                    help="HF: initial Tikhonov lambda (library default 1; --full: 45, the paper's)")
    ap.add_argument("--cg-decay", type=float, default=None, help="HF: zeta of the CG initialisation (§10; 0.95)")
    ap.add_argument("--preconditioner", choices=["ggn", "fisher", "none"], default="ggn",
                    help="HF: GGN-diagonal (§11.4), empirical Fisher (§11.3) or none")
    ap.add_argument("--preconditioner-decay", type=float, default=None,
                    help="HF: moving average of the diagonal estimates (library default 0.95; --full: 0, the paper's)")
    ap.add_argument("--lr", type=float, default=None, help="learning rate (adam 1e-3, sgd 3e-5 with momentum, both tuned on CURVES; HF: step multiplier 1)")
    ap.add_argument("--momentum", type=float, default=0.9, help="sgd momentum (default 0.9)")
    ap.add_argument("--weight-decay", type=float, default=2e-5, help="L2 coefficient, the same for every optimizer")
    ap.add_argument("--train-size", type=int, default=None, help="use only this many training cases")
    ap.add_argument("--test-size", type=int, default=None, help="use only this many test cases")
    ap.add_argument("--eval-every", type=float, default=None,
                    help="seconds of training between evaluations (default: budget/40, or every 10 iterations)")
    ap.add_argument("--data-dir", default=None,
                    help="MNIST: the directory holding the IDX files (train-images-idx3-ubyte[.gz], "
                         "t10k-images-idx3-ubyte[.gz]; with --download, where they are downloaded to). CURVES: "
                         "an existing directory to cache the generated data in (default $TORCH_HF_DATA or "
                         "~/.cache/torch_hf, created if missing)")
    ap.add_argument("--download", action="store_true", help="MNIST: let torchvision download the IDX files")
    ap.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    ap.add_argument("--distributed", action="store_true",
                    help="HF only: data parallelism under torchrun (gloo on CPU, NCCL on CUDA with a GPU per process, "
                         "gloo when processes share a GPU); each process holds 1/N of every gradient and "
                         "curvature batch")
    ap.add_argument("--autocast", choices=["none", "bf16", "fp16"], default="none",
                    help="HF: run the closure's forward pass under torch.autocast (CG vectors stay float32)")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls on CUDA")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    add_subnormal_option(ap)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="results",
                    help="directory for the JSON and PNG (default results/), or a .json file path")
    ap.add_argument("--tag", default=None, help="suffix of the output file names")
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_overwrite_option(ap)
    return ap


def load_data(dataset: str, data_dir: str | None, download: bool, train_size: int | None = None,
              test_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    if dataset == "curves":  # the data set is fixed (seed 0); --seed varies the training
        return load_curves(data_dir, n_train=train_size or 20000, n_test=test_size or 10000, seed=0)
    if data_dir is None:
        raise SystemExit("MNIST needs --data-dir (a directory with the IDX files; add --download to fetch them)")
    return load_mnist(data_dir, download=download)


def objective(logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The training loss of Martens (2010): sigmoid cross-entropy summed over the pixels,
    averaged over the cases (the scale the paper's λ = 45 and weight decay 2e-5 refer to;
    a per-pixel mean would make the same weight decay 784 times stronger)."""
    return F.binary_cross_entropy_with_logits(logits, x, reduction="sum") / x.shape[0]


def evaluate_set(model: torch.nn.Module, x: torch.Tensor, chunk: int = 5000) -> tuple[float, float]:
    """(per-case summed BCE, the training loss without weight decay; reconstruction error:
    mean over cases of the summed squared error of sigmoid(logits) on the 0..1 scale)."""
    bce = err = 0.0
    with torch.no_grad():
        for start in range(0, len(x), chunk):
            xb = x[start : start + chunk]
            z = model(xb)
            bce += float(F.binary_cross_entropy_with_logits(z, xb, reduction="sum"))
            err += float(((torch.sigmoid(z) - xb) ** 2).sum())
    return bce / len(x), err / len(x)


def _config(args: argparse.Namespace) -> dict:
    cfg = vars(args).copy()
    defaults = DEFAULTS[cfg["optimizer"]]
    cuda = str(cfg.get("device") or "cpu").startswith("cuda")
    if cuda and cfg["optimizer"] in CUDA_DEFAULTS and cfg["batch_size"] is None and not cfg["full"]:
        defaults = CUDA_DEFAULTS[cfg["optimizer"]]  # batch and learning rate go together
        if cfg.get("curvature_batch_size") is None and "curvature_batch_size" in defaults:
            cfg["curvature_batch_size"] = defaults["curvature_batch_size"]
    if cfg["full"]:
        cfg.update(time_budget=0.0, batch_size=cfg["batch_size"] if cfg["batch_size"] is not None else 0,
                   cg_max_iters=250, max_iters=cfg["max_iters"] or 1000)
        for key, paper in (("damping", 45.0), ("cg_stop", "progress"), ("preconditioner_decay", 0.0)):
            if cfg[key] is None:
                cfg[key] = paper
    if cfg["batch_size"] is None:
        cfg["batch_size"] = defaults["batch_size"]
    if cfg["lr"] is None:
        cfg["lr"] = defaults["lr"]
    return cfg


def hf_options(cfg: dict) -> dict:
    """``HessianFree`` keywords for the options given; the library's defaults for the rest."""
    out: dict = {}
    for key in ("cg_max_iters", "cg_tol", "cg_stop", "cg_decay"):
        if cfg.get(key) is not None:
            out[key] = cfg[key]
    if cfg.get("damping") is not None:
        out["damping"] = torch_hf.damping.Tikhonov(cfg["damping"])
    name, decay = cfg.get("preconditioner", "ggn"), cfg.get("preconditioner_decay")
    if name != "ggn" or decay is not None:
        kwargs = {} if decay is None else {"decay": decay}
        out["preconditioner"] = {"ggn": lambda: torch_hf.preconditioners.GGNDiagonal(0.75, **kwargs),
                                 "fisher": lambda: torch_hf.preconditioners.EmpiricalFisherDiagonal(0.75, **kwargs),
                                 "none": torch_hf.preconditioners.Identity}[name]()
    return out


def run(cfg: dict, progress: bool = True) -> dict | None:
    """Train as ``cfg`` says (the parsed CLI as a dict); returns the results dict (``None``
    on the processes other than rank 0 of a ``--distributed`` run). On CPU every optimizer
    trains with subnormals flushed to zero unless ``cfg["keep_subnormals"]``
    (``recipes.runner.subnormals_flushed``; ``final["subnormals_flushed"]`` records it)."""
    flush = torch.device(cfg["device"]).type == "cpu" and not cfg.get("keep_subnormals")
    with subnormals_flushed(flush) as flushing:
        result = _train(cfg, progress)
    if result is not None:
        result["final"]["subnormals_flushed"] = flushing
    return result


def _train(cfg: dict, progress: bool) -> dict | None:
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    device = torch.device(cfg["device"])
    if cfg.get("tf32"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    rank, world = 0, 1
    if cfg.get("distributed"):
        device, rank, world = _init_distributed(cfg, device)
        progress = progress and rank == 0
    x_train, x_test = _load(cfg, rank, world, device)
    n = len(x_train)
    gen = torch.Generator().manual_seed(cfg["seed"])
    torch.manual_seed(cfg["seed"])
    model = deep_autoencoder(LAYERS[cfg["dataset"]], generator=gen).to(device)
    batch, curv_batch = _batch_sizes(cfg, n, rank, world)
    opt = _optimizer(cfg, model)
    budget = cfg["time_budget"] or 0.0
    eval_every = cfg.get("eval_every") or (budget / 40 if budget > 0 else None)
    cases = [0]

    def evaluate(it: int, train_time: float, extra: dict) -> dict:
        train_loss, train_error = evaluate_set(model, x_train)
        row = {"iter": it, "time_s": round(train_time, 3), "epoch": cases[0] / n, "train_loss": train_loss,
               "train_error": train_error, "test_error": evaluate_set(model, x_test)[1]}
        return {**row, **extra}

    run = Run(Budget(budget, cfg.get("max_iters"), cfg.get("clock"), eval_every), evaluate,
              f"{cfg['dataset']} {cfg['optimizer']}", progress, first_eval=-math.inf,
              postfix=lambda row: {"train_err": f"{row['train_error']:.3f}", "test_err": f"{row['test_error']:.3f}"})
    if rank == 0:
        run.evaluate()
    update = _updater(cfg, model, opt, x_train, batch, curv_batch, gen, rank, world, device, cases)
    # rank 0 evaluates and writes the results; without --eval-every, HF every update, the baselines every 10
    due = (lambda: rank == 0 and run.due()) if eval_every is not None else \
        (lambda: rank == 0 and (run.iterations % 10 == 0 or cfg["optimizer"] == "hf"))
    status = run.loop(update, due=due, stop=lambda local: _stop(local, world),  # rank 0's clock decides for all
                      diverged=lambda: diverged(model.parameters()))
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
        if rank != 0:
            run.close()
            return None
    cfg_out = {k: v for k, v in cfg.items() if k not in ("no_progress",)}
    if cfg["optimizer"] == "hf":  # the sizes used, as the JSON's readers expect them
        cfg_out["curvature_batch_size"] = curv_batch
    cfg_out.update(gradient_batch=batch, curvature_batch=curv_batch if cfg["optimizer"] == "hf" else None)
    return run.result(cfg_out, status, parameters=sum(p.numel() for p in model.parameters()), train_cases=n,
                      test_cases=len(x_test), torch_threads=torch.get_num_threads())


def _load(cfg: dict, rank: int, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The training and test sets on ``device``; rank 0 generates and caches the data
    first, the others then read the cache."""
    if rank == 0:
        train_np, test_np = load_data(cfg["dataset"], cfg.get("data_dir"), cfg.get("download", False),
                                      cfg.get("train_size"), cfg.get("test_size"))
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
        if rank != 0:
            train_np, test_np = load_data(cfg["dataset"], cfg.get("data_dir"), False,
                                          cfg.get("train_size"), cfg.get("test_size"))
    if cfg.get("train_size"):
        train_np = train_np[: cfg["train_size"]]
    if cfg.get("test_size"):
        test_np = test_np[: cfg["test_size"]]
    return (torch.from_numpy(np.ascontiguousarray(train_np)).to(device),
            torch.from_numpy(np.ascontiguousarray(test_np)).to(device))


def _batch_sizes(cfg: dict, n: int, rank: int, world: int) -> tuple[int, int]:
    """The gradient and curvature batches used (the whole set when more is asked, said once)."""
    batch = n if cfg["batch_size"] in (0, None) or cfg["batch_size"] >= n else cfg["batch_size"]
    if cfg["batch_size"] not in (0, None) and cfg["batch_size"] > n and rank == 0:
        print(f"--batch-size {cfg['batch_size']} is more than the {n} training cases: each update uses the whole "
              "training set (recorded as gradient_batch)")
    if cfg["full"] and cfg["optimizer"] == "hf":
        curv_batch = max(1, n // 4)
    else:  # an explicit size above the gradient batch was refused by main(); here only the whole-set case caps it
        curv_batch = min(cfg.get("curvature_batch_size") or DEFAULT_CURVATURE_BATCH, batch)
    if world > 1 and (batch % world or curv_batch % world):
        raise SystemExit(f"--distributed: the gradient batch ({batch}) and curvature batch ({curv_batch}) must be "
                         f"multiples of the number of processes ({world})")
    return batch, curv_batch


def _optimizer(cfg: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    wd = cfg["weight_decay"]
    if cfg["optimizer"] == "hf":
        return torch_hf.HessianFree(model.parameters(), lr=cfg["lr"], weight_decay=wd, **hf_options(cfg))
    if cfg["optimizer"] == "adam":  # on CUDA the fused kernel, the fastest Adam torch has there
        fused = True if next(model.parameters()).is_cuda else None
        return torch.optim.Adam(model.parameters(), lr=cfg["lr"], weight_decay=wd, fused=fused)
    return torch.optim.SGD(model.parameters(), lr=cfg["lr"], momentum=cfg["momentum"], weight_decay=wd)


def _updater(cfg: dict, model: torch.nn.Module, opt: torch.optim.Optimizer, x_train: torch.Tensor, batch: int,
             curv_batch: int, gen: torch.Generator, rank: int, world: int, device: torch.device,
             cases: list[int]) -> Callable[[], dict]:
    """One update on the next minibatch (this process's shard of it under --distributed);
    returns HF's diagnostics for the next evaluation row."""
    # the epoch's permutation lives on the device: no host-to-device copy (a stall on CUDA) per update
    n, state = len(x_train), {"perm": torch.randperm(len(x_train), generator=gen).to(device), "cursor": 0}
    autocast = {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.get("autocast") or "none"]

    def next_batch() -> torch.Tensor:
        if batch == n:
            return x_train
        if state["cursor"] + batch > n:
            state["perm"], state["cursor"] = torch.randperm(n, generator=gen).to(device), 0
        idx = state["perm"][state["cursor"] : state["cursor"] + batch]
        state["cursor"] += batch
        return x_train[idx]

    def forward(x: torch.Tensor) -> torch.Tensor:
        if autocast is None:
            return model(x)
        with torch.autocast(device.type, dtype=autocast):
            return model(x).float()  # the loss and L'' in float32

    def update() -> dict:
        xb = next_batch()
        extra: dict = {}
        if cfg["optimizer"] == "hf":
            if world > 1:  # this process's shard of both batches; the optimizer averages over shards
                xb_local = xb[rank * (batch // world):(rank + 1) * (batch // world)]
                xc = xb_local[: curv_batch // world]
            else:
                xb_local, xc = xb, xb[:curv_batch]

            def closure():
                z = forward(xb_local)
                return objective(z, xb_local), z

            def curvature_closure():
                z = forward(xc)
                return objective(z, xc), z

            opt.step(closure, curvature_closure if curv_batch < batch else None)
            d = opt.last_step
            extra = {"rho": d.rho, "damping": d.damping, "cg_iterations": d.cg_iterations,
                     "cg_stop_reason": d.cg_stop_reason, "chosen_iteration": d.chosen_iteration,
                     "line_search_alpha": d.line_search_alpha}
        else:
            opt.zero_grad(set_to_none=True)
            objective(model(xb), xb).backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        cases[0] += len(xb)
        return extra

    return update


def distributed_placement(device_type: str, local_rank: int, local_world: int, gpus: int) -> tuple[int | None, str]:
    """(this process's GPU index, backend) under torchrun: on CUDA one GPU per process and
    NCCL when the node has a GPU for each of its ``local_world`` processes; with fewer GPUs
    the processes share them round-robin over gloo (gloo all-reduces CUDA tensors; NCCL
    refuses two ranks on one device). On CPU: (None, "gloo")."""
    if device_type != "cuda":
        return None, "gloo"
    if gpus < 1:
        raise SystemExit("--distributed --device cuda: no CUDA device is visible")
    if local_world <= gpus:
        return local_rank, "nccl"
    return local_rank % gpus, "gloo"


def _init_distributed(cfg: dict, device: torch.device) -> tuple[torch.device, int, int]:
    """Join the torchrun group (:func:`distributed_placement` picks the GPU and backend)."""
    import torch.distributed as dist

    if cfg["optimizer"] != "hf":
        raise SystemExit("--distributed runs HF (the baselines would need DistributedDataParallel)")
    if "RANK" not in os.environ:
        raise SystemExit("--distributed: launch with torchrun --nproc_per_node=N recipes/autoencoder.py --distributed")
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    index, backend = distributed_placement(device.type, local_rank, local_world, gpus)
    if index is not None:
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
        if backend == "gloo" and local_rank == 0:
            print(f"--distributed: {local_world} processes share {gpus} GPU(s); gloo all-reduces their CUDA tensors")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return device, dist.get_rank(), dist.get_world_size()


def _stop(local: bool, world: int) -> bool:
    if world == 1:
        return local
    import torch.distributed as dist

    flag = torch.tensor([1.0 if local else 0.0])
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def output_paths(cfg: dict) -> tuple[Path, Path]:
    stem = f"autoencoder_{cfg['dataset']}_{cfg['optimizer']}_seed{cfg['seed']}"
    if cfg.get("tag"):
        stem += f"_{cfg['tag']}"
    return _output_paths(cfg["out"], stem)


def _check_data(ap: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """``--data-dir`` as its help says, or a one-line error naming what is missing."""
    if args.dataset == "curves":
        if args.data_dir is not None and not Path(args.data_dir).expanduser().is_dir():
            ap.error(f"--data-dir {args.data_dir}: no such directory (for CURVES it is the cache directory of the "
                     "generated data; create it, or leave the option out to use ~/.cache/torch_hf)")
        return
    if args.data_dir is None:
        ap.error("--dataset mnist needs --data-dir, the directory holding the MNIST IDX files "
                 "(add --download to let torchvision fetch them there)")
    if args.download:
        return
    from recipes.data import _find

    try:
        for stem in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
            _find(Path(args.data_dir).expanduser(), stem)
    except FileNotFoundError as exc:
        ap.error(str(exc))


def main(argv=None) -> dict | list[dict] | None:
    ap = build_parser()
    args = ap.parse_args(argv)
    check_args(ap, args, positive=("curvature_batch_size", "cg_max_iters", "max_iters", "train_size", "test_size",
                                   "eval_every", "threads", "lr"),
               non_negative=("batch_size", "time_budget", "cg_tol", "damping", "cg_decay", "momentum",
                             "weight_decay", "preconditioner_decay"))
    _check_data(ap, args)
    if args.optimizer == "all":
        if args.distributed:
            ap.error("--distributed runs HF only: give --optimizer hf")
        if args.lr is not None:
            ap.error("--optimizer all runs each optimizer at its own default learning rate: leave out --lr")
        if Path(args.out).suffix.lower() == ".json":
            ap.error("--optimizer all writes one file per run: give --out a directory")
    names = ["hf", "adam"] if args.optimizer == "all" else [args.optimizer]
    cfgs = [_config(argparse.Namespace(**dict(vars(args), optimizer=name))) for name in names]
    for cfg in cfgs:
        if cfg["optimizer"] == "hf" and not cfg["full"] and cfg["batch_size"]:
            curvature_batch(ap, cfg["curvature_batch_size"], cfg["batch_size"], DEFAULT_CURVATURE_BATCH)
    # a bad --out, or results of an earlier run, stop now, not after the run
    refuse_overwrite(ap, [p for cfg in cfgs for p in output_paths(cfg)], args.overwrite)
    results = []
    for cfg in cfgs:
        result = run(cfg, progress=not args.no_progress)
        if result is None:  # not rank 0 of a distributed run
            return None
        json_path, png_path = output_paths(cfg)
        save_results(result, json_path, png_path,
                     title=f"{cfg['dataset'].upper()} autoencoder, {cfg['optimizer']}: reconstruction error")
        f = result["final"]
        print(f"{cfg['optimizer']} on {cfg['dataset']}: {f['iterations']} updates, train error {f['train_error']:.4f}, "
              f"test error {f['test_error']:.4f} ({time_report(f, cfg['time_budget'], cfg.get('clock'))}) "
              f"-> {json_path}, {png_path}")
        results.append(result)
    if len(results) == 1:
        return results[0]
    hf, adam = (r["final"] for r in results)
    print(f"\n| {args.dataset} | updates | train error | test error |\n| --- | --- | --- | --- |")
    for name, f in (("HF (library defaults)", hf), ("Adam, lr 1e-3", adam)):
        print(f"| {name} | {f['iterations']} | {f['train_error']:.4g} | {f['test_error']:.4g} |")
    ratio = hf["train_error"] / adam["train_error"]
    print(f"HF's train error is {ratio:.3g}× Adam's" + (" (HF ahead)" if ratio < 1 else " (Adam ahead)"))
    if args.dataset == "curves" and args.time_budget == DEFAULT_TIME_BUDGET and not args.max_iters:
        print(EXPECTED)
    return results


if __name__ == "__main__":
    main()
