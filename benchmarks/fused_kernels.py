"""What the twice-differentiable kernels cost HF on a transformer (curvature evaluation only).

Fused attention (flash / memory-efficient SDPA), cuDNN RNNs and compiled code have no
double backward, so HF's curvature operator evaluates the closure with the math SDPA
backend, no cuDNN and compiled code run eagerly (``torch_hf.curvature.twice_differentiable_kernels``)
while trial points keep the fast kernels. This measures, on an ``nn.TransformerEncoder``
(float32, default settings but dropout 0), interleaved and reported as medians relative to
one gradient with the default kernels:

* ``gradient_fused``   forward + backward with the default (fused) kernels — the unit
* ``gradient_math``    the same under the twice-differentiable kernels
* ``ggn_build_math``   what HF does per step: ``torch_hf.GGN(...)`` (forward, gradient and the
  recorded backward) under those kernels
* ``ggn_mv``           one GGN product on that operator
* ``forward_fused`` / ``forward_math``  a trial-point forward under ``no_grad``

Run: ``python benchmarks/fused_kernels.py`` (``--help`` for options).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved, synchronizer  # noqa: E402
from torch_hf.curvature import twice_differentiable_kernels  # noqa: E402


def transformer_problem(batch: int, seq: int, d_model: int, layers: int, device: str):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model, max(1, d_model // 32), 4 * d_model, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.TransformerEncoder(layer, layers, enable_nested_tensor=False),
                          nn.Linear(d_model, 16)).to(device)
    x = torch.randn(batch, seq, d_model, device=device)
    t = torch.randint(0, 16, (batch, seq), device=device)

    def closure():
        z = model(x)
        return F.cross_entropy(z.reshape(-1, 16), t.reshape(-1)), z

    return model, closure


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--reps", type=int, default=11, help="interleaved repetitions (default 11)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None, help="also write the figures to this file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, closure = transformer_problem(args.batch, args.seq, args.d_model, args.layers, args.device)
    params = list(model.parameters())
    sync = synchronizer(args.device)
    with twice_differentiable_kernels():
        op = torch_hf.GGN(params, closure, safe_kernels=True)
    v = torch.randn(op.numel, device=args.device)

    def gradient():
        loss, _ = closure()
        torch.autograd.grad(loss, params)
        sync()

    def gradient_math():
        with twice_differentiable_kernels():
            gradient()

    def ggn_build_math():
        torch_hf.GGN(params, closure, safe_kernels=True)
        sync()

    def ggn_mv():
        op.mv(v)
        sync()

    def forward():
        with torch.no_grad():
            closure()
        sync()

    def forward_math():
        with twice_differentiable_kernels():
            forward()

    times = interleaved({"gradient_fused": gradient, "gradient_math": gradient_math, "ggn_build_math": ggn_build_math,
                         "ggn_mv": ggn_mv, "forward_fused": forward, "forward_math": forward_math}, args.reps)
    unit = times["gradient_fused"]
    ratios = {k: v / unit for k, v in times.items()}
    print(f"transformer encoder, {args.layers} layers, d_model {args.d_model}, batch {args.batch} x seq {args.seq}, "
          f"{args.device}, {torch.get_num_threads()} threads, median of {args.reps}")
    for name, r in ratios.items():
        print(f"  {name:<16} {r:6.2f} x gradient_fused   ({times[name] * 1e3:8.1f} ms)")
    print(f"  curvature evaluation with math kernels / gradient with fused kernels: "
          f"{ratios['ggn_build_math']:.2f}; trial forward math / fused: "
          f"{times['forward_math'] / times['forward_fused']:.2f}")
    result = {"config": vars(args), "seconds": times, "ratio_to_gradient_fused": ratios}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
