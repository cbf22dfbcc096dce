"""Where one HF update's time goes, phase by phase, against the arithmetic it must do.

The CURVES autoencoder of Martens (2010) (784-400-200-100-50-25-6 and back, float32) with
the recipe's separate minibatches (§12): the gradient on ``--batch`` cases, the curvature
products on ``--curvature-batch``. Printed, all medians of interleaved repetitions:

* ``gradient_s``, ``product_s``, ``forward_s``: one gradient on the gradient batch, one
  GGN product on the curvature batch, one forward pass on the gradient batch;
* ``product_floor_s``: the product's FLOPs over the float32 matrix rate measured in the same
  run (an 8192² matmul, TF32 off). A GGN product with the activations cached costs per case
  2·(2·Σ n_in·n_out) for Jv (the tangent through each layer: W·dx and dW·x) plus
  2·Σ n_in·n_out for Jᵀu's weight gradients and 2·Σ n_in·n_out − 2·n₀·n₁ for its input
  gradients (none for the input layer): elementwise work is not counted;
* on CUDA, ``product_captured``: the same product replayed from a CUDA graph
  (:mod:`torch_hf.curvature.capture`), and its relative difference from the uncaptured one;
* one ``HessianFree.step`` with the library's defaults (on CUDA with ``cuda_graphs=False``
  and with the default, capturing, the two runs' steps interleaved) (CG up to ``--cg-max-iters``) and its
  phases (``last_step.times``), the products it made, and
  ``step / (gradient + products·product + evaluations·forward)``: what the step adds above
  its necessary parts;
* with ``--profile FILE``: the profiler's table of one step (host-side time by operator;
  ``aten::_local_scalar_dense`` counts the host reads that wait for the device).

Run: ``python benchmarks/step_phases.py --device cuda`` (``--help`` for options; on CPU use
small batches, e.g. ``--batch 1000 --curvature-batch 250``).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch_hf  # noqa: E402
from benchmarks._common import interleaved, synchronizer  # noqa: E402
from torch_hf.curvature.capture import CapturedProduct  # noqa: E402
from recipes.models import CURVES_LAYERS, deep_autoencoder  # noqa: E402


def product_flops(layers: tuple[int, ...], cases: int) -> float:
    """FLOPs of one GGN product (cached activations) on ``cases`` cases of the autoencoder."""
    sizes = list(layers) + list(reversed(layers))[1:]
    macs = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    return cases * (2 * 2 * macs + 2 * macs + 2 * macs - 2 * sizes[0] * sizes[1])


def matmul_rate(device: torch.device, n: int = 8192, reps: int = 10) -> float:
    """Sustained float32 FLOP/s of an n×n×n matmul on ``device`` (TF32 off)."""
    if device.type != "cuda":
        n = 1024
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    sync = synchronizer(device)
    for _ in range(2):
        a @ b
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=5000, help="gradient minibatch (default 5000)")
    ap.add_argument("--curvature-batch", type=int, default=1250, help="curvature minibatch (default 1250)")
    ap.add_argument("--reps", type=int, default=15, help="interleaved repetitions of the parts")
    ap.add_argument("--steps", type=int, default=5, help="timed HF steps after one warm-up")
    ap.add_argument("--cg-max-iters", type=int, default=250)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--profile", default=None, help="write the profiler's table of one step here")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False
    sync = synchronizer(device)
    torch.manual_seed(0)
    from recipes.data import generate_curves

    x = torch.from_numpy(generate_curves(args.batch, seed=0)).to(device)
    xc = x[: args.curvature_batch]
    model = deep_autoencoder(CURVES_LAYERS).to(device)
    params = list(model.parameters())

    def closure_on(data, net=model):
        def closure():
            z = net(data)
            return F.binary_cross_entropy_with_logits(z, data, reduction="sum") / len(data), z
        return closure

    closure, curvature_closure = closure_on(x), closure_on(xc)
    cuda = device.type == "cuda"
    stream = torch.cuda.Stream(device) if cuda else None
    side = torch.cuda.stream(stream) if cuda else contextlib.nullcontext()
    with side:  # as HessianFree runs a capturing step: forward, products and replays on one side stream
        ggn = torch_hf.GGN(params, curvature_closure)
        v = torch.randn(ggn.numel, device=device)
        captured = CapturedProduct(ggn.mv, stream) if cuda else None

        def gradient():
            torch.autograd.grad(closure()[0], params)
            sync()

        def product():
            ggn.mv(v)
            sync()

        def product_captured():
            captured(v)
            sync()

        def forward():
            with torch.no_grad():
                closure()
            sync()

        parts = {"gradient": gradient, "product": product, "forward": forward}
        if cuda:
            parts["product_captured"] = product_captured
        med = interleaved(parts, reps=args.reps)
        if cuda:
            diff = float((captured(v) - ggn.mv(v)).norm() / ggn.mv(v).norm())
    del ggn, captured
    rate = matmul_rate(device)
    floor = product_flops(CURVES_LAYERS, args.curvature_batch) / rate

    configs = {"uncaptured": False, "captured": None} if cuda else {"cpu": None}
    start = copy.deepcopy(model.state_dict())
    runs = {}
    for name, graphs in configs.items():
        m = deep_autoencoder(CURVES_LAYERS).to(device)
        m.load_state_dict(start)
        runs[name] = (m, torch_hf.HessianFree(m.parameters(), cg_max_iters=args.cg_max_iters, cuda_graphs=graphs),
                      [])
    for i in range(args.steps + 1):  # the configurations' steps interleaved
        for name, (m, opt, steps) in runs.items():
            c, cc = closure_on(x, m), closure_on(xc, m)
            sync()
            t0 = time.perf_counter()
            opt.step(c, cc)
            sync()
            if i:
                d = opt.last_step
                p_time = med["product_captured"] if name == "captured" else med["product"]
                parts_s = med["gradient"] + d.curvature_products * p_time + d.objective_evaluations * med["forward"]
                steps.append({"step_s": time.perf_counter() - t0, "products": d.curvature_products,
                              "cg_iterations": d.cg_iterations, "evaluations": d.objective_evaluations,
                              "parts_s": parts_s, "times": dict(d.times)})
    result = {"device": str(device), "batch": args.batch, "curvature_batch": args.curvature_batch,
              "threads": torch.get_num_threads(), "seconds": med, "product_over_gradient": med["product"] / med["gradient"],
              "matmul_flops_per_s": rate, "product_floor_s": floor, "product_over_floor": med["product"] / floor,
              "steps": {}}
    if cuda:
        result.update(product_captured_over_floor=med["product_captured"] / floor,
                      captured_speedup=med["product"] / med["product_captured"],
                      captured_relative_difference=diff)
    for name, (m, opt, steps) in runs.items():
        per_iteration = statistics.median(s["times"].get("cg", 0.0) / max(s["cg_iterations"], 1) for s in steps)
        capture_state = None if opt.last_capture is None else {
            "replays": opt.last_capture.replays, "calls": opt.last_capture.calls, "failure": opt.last_capture.failure}
        result["steps"][name] = {"step_s": statistics.median(s["step_s"] for s in steps),
                                 "step_over_parts": statistics.median(s["step_s"] / s["parts_s"] for s in steps),
                                 "cg_s_per_iteration": per_iteration, "last_capture": capture_state, "steps": steps}
    opt = runs[list(runs)[-1]][1]
    model = runs[list(runs)[-1]][0]
    closure, curvature_closure = closure_on(x, model), closure_on(xc, model)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with profile(activities=acts) as prof:
            opt.step(closure, curvature_closure)
            sync()
        avg = prof.key_averages()
        with open(args.profile, "w") as fh:
            fh.write(avg.table(sort_by="self_cpu_time_total", row_limit=40))
            if device.type == "cuda":
                fh.write("\n\n" + avg.table(sort_by="self_cuda_time_total", row_limit=25))
        reads = [e for e in avg if e.key in ("aten::_local_scalar_dense", "cudaStreamSynchronize",
                                              "cudaMemcpyAsync", "cudaLaunchKernel")]
        result["profile_counts"] = {e.key: e.count for e in reads}
        result["profile_products"] = opt.last_step.curvature_products
    print(f"CURVES autoencoder on {device}, batch {args.batch} / {args.curvature_batch}, float32, "
          f"medians of {args.reps} interleaved")
    print(f"gradient {med['gradient'] * 1e3:.2f} ms  product {med['product'] * 1e3:.2f} ms  "
          f"forward {med['forward'] * 1e3:.2f} ms  product/gradient {result['product_over_gradient']:.2f}")
    print(f"float32 matmul rate {rate / 1e12:.1f} TFLOP/s: product floor {floor * 1e3:.3f} ms, "
          f"product / floor {result['product_over_floor']:.1f}")
    if cuda:
        print(f"captured product {med['product_captured'] * 1e3:.3f} ms = {result['product_captured_over_floor']:.1f}"
              f" x floor, {result['captured_speedup']:.1f}x faster than uncaptured; relative difference "
              f"{result['captured_relative_difference']:.1e}")
    for name, r in result["steps"].items():
        print(f"HF step [{name}] {r['step_s'] * 1e3:.1f} ms, step / parts {r['step_over_parts']:.2f}, CG iteration "
              f"{r['cg_s_per_iteration'] * 1e3:.2f} ms, capture {r['last_capture']}")
        for s in r["steps"]:
            print("  " + json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in s.items()
                                     if k != "times"}) + " phases " + json.dumps({k: round(t, 4) for k, t in s["times"].items()}))
    if "profile_counts" in result:
        print("profiled step:", json.dumps(result["profile_counts"]), "products", result["profile_products"])
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return result


if __name__ == "__main__":
    main()
