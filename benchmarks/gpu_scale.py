"""HF at scale on one device: the MNIST autoencoder of Martens (2010) at several batch sizes.

For each batch size (default 1k, 10k, 60k; gradient and curvature on the same batch),
with and without activation offload (§7.1, ``HessianFree(offload_activations=True)``):

* ``ratio``        median GGN.mv time / median gradient time (interleaved, same batch)
* ``step_s``       median wall time of one HF step with CG fixed at ``--cg-iters`` iterations
* ``cases_per_s``  batch / step_s
* ``peak_mib``     peak device memory during one HF step (CUDA only)

Written for the GPU lent by the ``device`` tool; it also runs on CPU with small batches
(``--device cpu --batches 500 1000``) to check the script. Prints a table and JSON.

Run: ``python benchmarks/gpu_scale.py --device cuda`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved, mnist_autoencoder_problem, synchronizer  # noqa: E402


def measure(batch: int, device: str, offload: bool, reps: int, steps: int, cg_iters: int, tf32: bool) -> dict:
    sync = synchronizer(device)
    model, x, closure = mnist_autoencoder_problem(batch=batch, device=device)
    params = list(model.parameters())
    cuda = torch.device(device).type == "cuda"

    def gradient():
        loss, _ = closure()
        torch.autograd.grad(loss, params)
        sync()

    ctx = torch_hf.nn.OffloadActivations() if offload else torch.autograd.graph.saved_tensors_hooks(
        lambda t: t, lambda t: t)
    with ctx:
        op = torch_hf.GGN(params, closure)
    v = torch.randn(op.numel, device=device)

    def product():
        op.mv(v)
        sync()

    med = interleaved({"gradient": gradient, "product": product}, reps=reps)
    del op
    opt = torch_hf.HessianFree(params, damping=torch_hf.damping.Tikhonov(45.0), cg_max_iters=cg_iters, cg_tol=0.0,
                               cg_check_every=cg_iters, offload_activations=offload)
    step_times, peaks = [], []
    for i in range(steps + 1):
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        sync()
        t0 = time.perf_counter()
        opt.step(closure)
        sync()
        if i > 0:  # the first step warms up
            step_times.append(time.perf_counter() - t0)
            if cuda:
                peaks.append(torch.cuda.max_memory_allocated() / 2**20)
    step_s = statistics.median(step_times)
    return {"batch": batch, "offload": offload, "tf32": tf32, "gradient_s": med["gradient"],
            "product_s": med["product"], "ratio": med["product"] / med["gradient"], "step_s": step_s,
            "cases_per_s": batch / step_s, "peak_mib": max(peaks) if peaks else None,
            "cg_iterations": opt.last_step.cg_iterations}


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batches", type=int, nargs="+", default=[1000, 10000, 60000])
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions of gradient vs product")
    ap.add_argument("--steps", type=int, default=3, help="timed HF steps per configuration (after one warm-up)")
    ap.add_argument("--cg-iters", type=int, default=20, help="CG iterations per step (fixed: cg_tol=0)")
    ap.add_argument("--no-offload", action="store_true", help="skip the offload variant")
    ap.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (CUDA)")
    ap.add_argument("--json", default=None, help="also write the rows to this file")
    args = ap.parse_args(argv)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}; float32{' + TF32' if args.tf32 else ''}")
    print(f"{'batch':>7} {'offload':>7} {'mv/grad':>8} {'step s':>8} {'cases/s':>10} {'peak MiB':>9}")
    rows = []
    for batch in args.batches:
        for offload in ((False,) if args.no_offload else (False, True)):
            try:
                row = measure(batch, args.device, offload, args.reps, args.steps, args.cg_iters, args.tf32)
            except torch.cuda.OutOfMemoryError:
                row = {"batch": batch, "offload": offload, "error": "out of memory"}
                torch.cuda.empty_cache()
                print(f"{batch:>7} {str(offload):>7}  out of memory")
                rows.append(row)
                continue
            rows.append(row)
            peak = f"{row['peak_mib']:.0f}" if row["peak_mib"] is not None else "-"
            print(f"{batch:>7} {str(offload):>7} {row['ratio']:>8.3f} {row['step_s']:>8.3f} "
                  f"{row['cases_per_s']:>10.0f} {peak:>9}")
    out = {"device": name, "rows": rows}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
