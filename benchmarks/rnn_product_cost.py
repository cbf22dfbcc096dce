"""Cost of one structural-damping GGN product on the pathological-task RNN, relative to
one gradient on the same batch, and what stacking the states naively would cost.

The network of ``recipes/rnn_pathological.py`` (100 tanh units, addition task, T = 100,
float32) with ``torch_hf.damping.Structural``: the closure returns all T hidden states,
so the recorded backward graph holds the un-stacking of the states. Candidates, timed
interleaved (medians):

* ``gradient``       closure + backward on the batch
* ``product``        ``GGN.mv`` with ``torch_hf.nn.unroll`` (states stacked by a
                     function whose backward is a single ``split``)
* ``product_captured`` (CUDA) the product replayed from a CUDA graph
                     (:mod:`torch_hf.curvature.capture`)
* ``product_naive``  the same product when the unroll indexes ``inputs[t]`` and stacks
                     with ``torch.stack``: the product differentiates one ``select`` per
                     step, each writing into a zero tensor of the whole sequence (O(T²))

Run: ``python benchmarks/rnn_product_cost.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved, synchronizer  # noqa: E402
from torch_hf.curvature.capture import CapturedProduct  # noqa: E402
from recipes.rnn_pathological import generate, sparse_init_rnn, task_loss  # noqa: E402


def naive_unroll(cell, inputs, h0):
    states, h = [], h0
    for t in range(inputs.shape[0]):
        h = cell(inputs[t], h)
        states.append(h)
    return torch.stack(states)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--T", type=int, default=100)
    ap.add_argument("--batch", type=int, default=250, help="the recipe's curvature batch (default 250)")
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    device = torch.device(args.device)
    sync = synchronizer(device)
    model = sparse_init_rnn(2, 100, 1, gen).to(device)
    params = list(model.parameters())
    b = generate("addition", args.T, args.batch, gen)
    bx, by = b.x.to(device), b.y.to(device)
    damping = torch_hf.damping.Structural(0.1, mu=1 / 30, batch_dim=1)

    def closure_with(unroll):
        def closure():
            h0 = torch.zeros(args.batch, 100, device=device)
            states = unroll(lambda p_t, h: torch.tanh(p_t + model["rec"](h)), model["inp"](bx), h0)
            loss, z = task_loss("regression", model["out"](states[-1:]), by)
            return loss, z, states
        return closure

    fast, naive = closure_with(torch_hf.nn.unroll), closure_with(naive_unroll)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    with torch.cuda.stream(stream) if cuda else contextlib.nullcontext():  # capture needs one side stream
        ops = {"product": torch_hf.GGN(params, fast, **damping.curvature_kwargs()),
               "product_naive": torch_hf.GGN(params, naive, **damping.curvature_kwargs())}
        v = torch.randn(ops["product"].numel, generator=gen).to(device)
        agree = float((ops["product"].mv(v) - ops["product_naive"].mv(v)).norm() / ops["product"].mv(v).norm())
        captured = CapturedProduct(ops["product"].mv, stream) if cuda else None

        def gradient():
            torch.autograd.grad(fast()[0], params)
            sync()

        def product(mv):
            def run():
                mv(v)
                sync()
            return run

        candidates = {"gradient": gradient, "product": product(ops["product"].mv),
                      "product_naive": product(ops["product_naive"].mv)}
        if cuda:
            candidates["product_captured"] = product(captured)
        med = interleaved(candidates, reps=args.reps)
        captured_diff = float((captured(v) - ops["product"].mv(v)).norm() / ops["product"].mv(v).norm()) \
            if cuda else None
    result = {"device": str(device), "T": args.T, "product_s_per_sequence_step": med["product"] / args.T, "batch": args.batch, "threads": torch.get_num_threads(), "seconds": med,
              "product_over_gradient": med["product"] / med["gradient"],
              "naive_over_product": med["product_naive"] / med["product"],
              "relative_difference_of_products": agree}
    if cuda:
        result.update(captured_s_per_sequence_step=med["product_captured"] / args.T,
                      captured_speedup=med["product"] / med["product_captured"],
                      captured_relative_difference=captured_diff, capture_failure=captured.failure)
    print(f"tanh RNN on {device}, 100 units, T={args.T}, batch {args.batch}, structural damping, "
          f"{result['threads']} thread(s); medians of {args.reps} interleaved")
    print(f"GGN product / gradient: {result['product_over_gradient']:.2f}; product "
          f"{med['product'] * 1e3:.2f} ms = {result['product_s_per_sequence_step'] * 1e6:.1f} us per sequence step")
    print(f"naive (index + torch.stack) product / product: {result['naive_over_product']:.2f}")
    if cuda:
        print(f"captured product {med['product_captured'] * 1e3:.2f} ms = "
              f"{result['captured_s_per_sequence_step'] * 1e6:.1f} us per sequence step, "
              f"{result['captured_speedup']:.1f}x faster; relative difference {captured_diff:.1e}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
