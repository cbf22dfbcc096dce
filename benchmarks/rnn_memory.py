"""Memory and time of one GGN product on a long tanh RNN, with and without √T checkpointing.

A 100-unit tanh RNN unrolled over T = 1000 steps (``torch_hf.nn.unroll``), squared-error
loss on the last state's readout, float32. Variants:

* ``plain``              every step's activations cached for the products (§7.1 caching)
* ``checkpoint``         segments of ⌈√T⌉ steps, ``GGN(..., recompute=True)``: only the
                         state entering each segment is kept; each product recomputes
                         (forward-mode J v, then a checkpointed reverse pass for Jᵀ w)
* ``checkpoint_cached``  checkpointed unroll but cached products (for contrast: the
                         double-backward graph of the cached GGN holds every recomputed
                         activation, so checkpointing alone saves nothing during CG)

Memory: the peak tensor memory of building the operator and doing one product, above
what was live before (CPU: from the profiler's allocation events; CUDA: peak allocated).
Time: both operators are built in one process and their products timed interleaved
(medians); printed as checkpoint / plain.

Run: ``python benchmarks/rnn_memory.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved, synchronizer  # noqa: E402


def problem(T: int, batch: int, hidden: int, device: str, seed: int = 0):
    torch.manual_seed(seed)
    inp = torch.nn.Linear(2, hidden).to(device)
    rec = torch.nn.Linear(hidden, hidden, bias=False).to(device)
    out = torch.nn.Linear(hidden, 1).to(device)
    x = torch.randn(T, batch, 2, device=device)
    y = torch.randn(batch, 1, device=device)
    params = [*inp.parameters(), *rec.parameters(), *out.parameters()]

    def cell(xt, h):
        return torch.tanh(inp(xt) + rec(h))

    def make_closure(checkpoint):
        def closure():
            h = torch_hf.nn.unroll(cell, x, torch.zeros(batch, hidden, device=device), checkpoint=checkpoint,
                                   return_states=False)
            z = out(h)
            return F.mse_loss(z, y), z

        return closure

    return params, make_closure


def peak_bytes(fn, device: str) -> int:
    """Peak tensor memory allocated while ``fn`` runs, above what was live before.

    CUDA: the caching allocator's peak. CPU: replayed from the profiler's allocation and
    free events (the process's resident size is useless here: the C allocator keeps
    freed pages)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.events() if e.self_cpu_memory_usage), key=lambda e: e.time_range.start)
    current = peak = 0
    for e in events:
        current += e.self_cpu_memory_usage
        peak = max(peak, current)
    return peak


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=100)
    ap.add_argument("--hidden", type=int, default=100)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    params, make_closure = problem(args.T, args.batch, args.hidden, args.device)
    v = torch.randn(sum(p.numel() for p in params), device=args.device)
    variants = {"plain": (None, False), "checkpoint": ("sqrt", True), "checkpoint_cached": ("sqrt", False)}
    mem = {}
    for name, (checkpoint, recompute) in variants.items():
        def build_and_multiply():
            torch_hf.GGN(params, make_closure(checkpoint), recompute=recompute).mv(v)

        mem[name] = peak_bytes(build_and_multiply, args.device)

    sync = synchronizer(args.device)
    ops = {"plain": torch_hf.GGN(params, make_closure(None)),
           "checkpoint": torch_hf.GGN(params, make_closure("sqrt"), recompute=True)}
    agree = float((ops["plain"].mv(v) - ops["checkpoint"].mv(v)).norm() / ops["plain"].mv(v).norm())

    def product(name):
        def run():
            ops[name].mv(v)
            sync()
        return run

    med = interleaved({k: product(k) for k in ops}, reps=args.reps)
    result = {"T": args.T, "batch": args.batch, "hidden": args.hidden, "device": args.device,
              "peak_mib": {k: round(b / 2**20, 2) for k, b in mem.items()},
              "memory_ratio_plain_over_checkpoint": mem["plain"] / max(mem["checkpoint"], 1),
              "product_s": med, "time_ratio_checkpoint_over_plain": med["checkpoint"] / med["plain"],
              "relative_difference_of_products": agree}
    print(f"T={args.T}, {args.hidden} units, batch {args.batch}, {args.device}")
    print(f"peak memory of building the operator + one product: plain {result['peak_mib']['plain']} MiB, "
          f"checkpointed {result['peak_mib']['checkpoint']} MiB -> ratio "
          f"{result['memory_ratio_plain_over_checkpoint']:.2f} (checkpointed unroll with cached products: "
          f"{result['peak_mib']['checkpoint_cached']} MiB)")
    print(f"product time checkpointed / plain: {result['time_ratio_checkpoint_over_plain']:.3f} "
          f"(medians of {args.reps} interleaved)")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
