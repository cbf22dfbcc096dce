"""torch_hf.curvature.capture: products replayed from a CUDA graph.

On CPU the bookkeeping is checked with a stand-in graph (warm-up, capture, replay, the
result copied out, the fallback and its one log line); the CUDA rows check that the
replayed product and the HF steps that use it equal the uncaptured ones."""
from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

import torch_hf
from torch_hf.curvature import capture
from torch_hf.curvature.capture import CapturedProduct

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _problem(device="cpu", dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(),
                                torch.nn.Linear(16, 4)).to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(64, 6, generator=g, dtype=dtype).to(device)
    y = torch.randint(0, 4, (64,), generator=g).to(device)

    def closure():
        z = model(x)
        return F.cross_entropy(z, y), z

    return model, closure


class _StandInGraph:
    """What replay does, on CPU: the recorded product run again on the static input."""

    def __init__(self, mv, static_input, out):
        self.mv, self.static_input, self.out = mv, static_input, out

    def replay(self):
        self.out.copy_(self.mv(self.static_input))


class _CPUCapture(CapturedProduct):
    def _capture(self, static_input):
        out = self._mv(static_input)
        return _StandInGraph(self._mv, static_input, out), out


def test_first_product_warms_up_then_the_graph_serves_the_rest_with_the_same_results():
    model, closure = _problem()
    ggn = torch_hf.GGN(model.parameters(), closure)
    captured = _CPUCapture(ggn.mv, stream=None)
    vs = [torch.randn(ggn.numel, dtype=torch.float64) for _ in range(4)]
    outs = [captured(v) for v in vs]
    assert captured.calls == 4 and captured.replays == 3 and captured.failure is None
    for v, out in zip(vs, outs):  # each result is its own tensor, not the graph's output overwritten later
        assert torch.equal(out, ggn.mv(v))
    assert outs[1].data_ptr() != outs[2].data_ptr()


def test_a_product_that_cannot_be_captured_runs_uncaptured_and_says_why_once(caplog, monkeypatch):
    monkeypatch.setattr(capture, "_reported", set())
    model, closure = _problem()
    ggn = torch_hf.GGN(model.parameters(), closure)

    class Failing(CapturedProduct):
        def _capture(self, static_input):
            raise RuntimeError("operation not permitted when stream is capturing")

    v = torch.randn(ggn.numel, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="torch_hf"):
        for _ in range(2):  # two operators (two steps) meeting the same failure: one log line
            failing = Failing(ggn.mv, stream=None)
            results = [failing(v) for _ in range(3)]
            assert all(torch.equal(r, ggn.mv(v)) for r in results)
            assert failing.replays == 0 and "not permitted when stream is capturing" in failing.failure
    assert sum("could not be captured" in r.getMessage() for r in caplog.records) == 1


def test_cuda_graphs_option_is_checked_and_does_nothing_on_cpu():
    model, closure = _problem()
    with pytest.raises(TypeError, match="cuda_graphs"):
        torch_hf.HessianFree(model.parameters(), cuda_graphs="yes")
    opt = torch_hf.HessianFree(model.parameters(), cuda_graphs=True, cg_max_iters=10)
    opt.step(closure)
    assert opt.last_capture is None and opt._stream is None


@CUDA
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_replayed_product_equals_the_uncaptured_one(dtype, curvature):
    model, closure = _problem("cuda", dtype)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        if curvature == "ggn":
            op = torch_hf.GGN(model.parameters(), closure)
        else:
            op = torch_hf.Hessian(model.parameters(), lambda: closure()[0])
        captured = CapturedProduct(op.mv, stream)
        vs = [torch.randn(op.numel, device="cuda", dtype=dtype) for _ in range(5)]
        got = [captured(v) for v in vs]
        want = [op.mv(v) for v in vs]
    torch.cuda.current_stream().wait_stream(stream)
    assert captured.failure is None and captured.replays == 4
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for g, w in zip(got, want):
        assert float((g - w).norm() / w.norm()) <= tol


@CUDA
def test_hf_steps_with_captured_products_equal_the_uncaptured_steps():
    def run(cuda_graphs):
        model, closure = _problem("cuda", torch.float64)
        opt = torch_hf.HessianFree(model.parameters(), cuda_graphs=cuda_graphs, cg_max_iters=30)
        for _ in range(4):
            opt.step(closure)
        return [p.detach().cpu() for p in model.parameters()], opt

    plain, _ = run(False)
    captured, opt = run(None)
    assert opt.last_capture is not None and opt.last_capture.failure is None and opt.last_capture.replays > 0
    for a, b in zip(plain, captured):
        assert torch.allclose(a, b, rtol=0, atol=1e-10), float((a - b).abs().max())


_SYNCING_LOSS_HESSIAN = r"""
import json, logging, sys
import torch
import torch_hf

messages = []
logging.getLogger("torch_hf").addHandler(type("H", (logging.Handler,), {"emit": lambda self, r: messages.append(r.getMessage())})())


def run(cuda_graphs):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double().cuda()
    g = torch.Generator().manual_seed(3)
    x = torch.randn(32, 6, generator=g, dtype=torch.float64).cuda()
    y = torch.randn(32, 4, generator=g, dtype=torch.float64).cuda()

    def closure():
        z = model(x)
        return 0.5 * ((z - y) ** 2).sum() / 32, z

    def syncing_loss_hvp(u):  # a host read inside the product: not capturable
        return (u / 32 * (1.0 + 0.0 * float(u.abs().sum())),)

    opt = torch_hf.HessianFree(model.parameters(), loss_hvp=syncing_loss_hvp, cuda_graphs=cuda_graphs, cg_max_iters=20)
    captures = []
    for _ in range(3):
        opt.step(closure)
        captures.append(None if opt.last_capture is None else [opt.last_capture.replays, opt.last_capture.failure])
        opt.last_capture = None
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu(), captures


captured, captures = run(None)
plain, _ = run(False)
torch.randn(3, device="cuda")  # the CUDA generator still draws after the failed capture
print(json.dumps({"gap": float((captured - plain).abs().max()), "captures": captures,
                  "logged": sum("could not be captured" in m for m in messages)}))
"""


@CUDA
def test_a_loss_hessian_that_syncs_falls_back_once_and_the_steps_still_match():
    # In a process of its own: a failed capture touches process-wide CUDA state.
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", _SYNCING_LOSS_HESSIAN], capture_output=True, text=True,
                          cwd=root, env={**__import__("os").environ, "PYTHONPATH": str(root)}, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    out = json.loads(done.stdout.strip().splitlines()[-1])
    (replays, failure), later = out["captures"][0], out["captures"][1:]
    assert replays == 0 and failure  # the first step tried, failed and ran uncaptured
    assert later == [None, None]  # later steps do not try again
    assert out["logged"] == 1
    assert out["gap"] <= 1e-10


def test_release_frees_the_operator_of_the_cycle_it_is_in():
    import weakref

    model, closure = _problem()
    ggn = torch_hf.GGN(model.parameters(), closure)
    ggn.mv = captured = _CPUCapture(ggn.mv, stream=None)  # as the optimizer installs it
    v = torch.randn(ggn.numel, dtype=torch.float64)
    captured(v), captured(v)
    alive = weakref.ref(ggn)
    captured.release()
    del ggn
    assert alive() is None  # no garbage collection needed: the cycle is broken
    assert captured.calls == 2 and captured.replays == 1
    with pytest.raises(RuntimeError, match="released"):
        captured(v)


@CUDA
def test_cg_with_its_vector_work_replayed_takes_the_same_iterates(monkeypatch):
    from torch_hf.cg import cg

    made = []

    class Recording(capture.CapturedUpdate):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(capture, "CapturedUpdate", Recording)
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(50, 50, generator=g, dtype=torch.float64))
    a = (q @ torch.diag(torch.logspace(-2, 2, 50, dtype=torch.float64)) @ q.T).cuda()
    b = torch.randn(50, generator=g, dtype=torch.float64).cuda()
    d = torch.diag(a)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        kwargs = dict(precondition=lambda r: r / d, max_iters=60, tol=1e-8, check_every=5)
        plain = cg(lambda v: a @ v, b, **kwargs)
        graphed = cg(lambda v: a @ v, b, capture_stream=stream, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    assert len(made) == 1 and made[0].failure is None and made[0].replays == graphed.iterations - 1
    assert (graphed.iterations, graphed.stop_reason) == (plain.iterations, plain.stop_reason)
    assert float((graphed.x - plain.x).abs().max()) <= 1e-12 * float(plain.x.abs().max())
    assert graphed.q_history == pytest.approx(plain.q_history, rel=1e-12, abs=1e-300)
