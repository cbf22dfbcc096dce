"""Cost of one structural-damping GGN product on the pathological-task RNN, relative to
one gradient on the same batch, and what stacking the states naively would cost.

The network of ``recipes/rnn_pathological.py`` (100 tanh units, addition task, T = 100,
float32) with ``torch_hf.damping.Structural``: the closure returns all T hidden states,
so the recorded backward graph holds the un-stacking of the states. Candidates, timed
interleaved (medians):

* ``gradient``       closure + backward on the batch
* ``product``        ``GGN.mv`` with ``torch_hf.nn.unroll`` (states stacked by a
                     function whose backward is a single ``split``)
* ``product_naive``  the same product when the unroll indexes ``inputs[t]`` and stacks
                     with ``torch.stack``: the product differentiates one ``select`` per
                     step, each writing into a zero tensor of the whole sequence (O(T²))

Run: ``python benchmarks/rnn_product_cost.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved  # noqa: E402
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
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    model = sparse_init_rnn(2, 100, 1, gen)
    params = list(model.parameters())
    b = generate("addition", args.T, args.batch, gen)
    damping = torch_hf.damping.Structural(0.1, mu=1 / 30, batch_dim=1)

    def closure_with(unroll):
        def closure():
            h0 = torch.zeros(args.batch, 100)
            states = unroll(lambda p_t, h: torch.tanh(p_t + model["rec"](h)), model["inp"](b.x), h0)
            loss, z = task_loss("regression", model["out"](states[-1:]), b.y)
            return loss, z, states
        return closure

    fast, naive = closure_with(torch_hf.nn.unroll), closure_with(naive_unroll)
    ops = {"product": torch_hf.GGN(params, fast, **damping.curvature_kwargs()),
           "product_naive": torch_hf.GGN(params, naive, **damping.curvature_kwargs())}
    v = torch.randn(ops["product"].numel, generator=gen)
    agree = float((ops["product"].mv(v) - ops["product_naive"].mv(v)).norm() / ops["product"].mv(v).norm())

    def gradient():
        torch.autograd.grad(fast()[0], params)

    med = interleaved({"gradient": gradient, "product": lambda: ops["product"].mv(v),
                       "product_naive": lambda: ops["product_naive"].mv(v)}, reps=args.reps)
    result = {"T": args.T, "batch": args.batch, "threads": torch.get_num_threads(), "seconds": med,
              "product_over_gradient": med["product"] / med["gradient"],
              "naive_over_product": med["product_naive"] / med["product"],
              "relative_difference_of_products": agree}
    print(f"tanh RNN, 100 units, T={args.T}, batch {args.batch}, structural damping, "
          f"{result['threads']} thread(s); medians of {args.reps} interleaved")
    print(f"GGN product / gradient: {result['product_over_gradient']:.2f}")
    print(f"naive (index + torch.stack) product / product: {result['naive_over_product']:.2f}")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
