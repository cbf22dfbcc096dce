"""Data-parallel HF (torch_hf/distributed.py): N gloo processes on N shards take the
step one process takes on the whole batch."""
from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import torch_hf
from torch_hf.distributed import resolve_process_group

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _dist_problem import run_steps  # noqa: E402

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(config: str, tmp_path: Path, world: int = 2, device: str = "cpu") -> list[list[torch.Tensor]]:
    port = _free_port()
    outs = [tmp_path / f"{config}_rank{r}.pt" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, str(HERE / "_dist_worker.py"), str(r), str(world), str(port),
                               str(outs[r]), config, device], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    logs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=120)
            logs.append(out.decode(errors="replace"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, p in enumerate(procs):
        assert p.returncode == 0, f"rank {r} failed:\n{logs[r]}"
    return [torch.load(o) for o in outs]


@pytest.mark.parametrize("config", ["fisher", "scale", "defaults", "kfac"])
def test_two_gloo_processes_match_one_process_on_whole_batch(config, tmp_path):
    reference = run_steps(config, world=1, n_shards=2)
    ranks = _launch(config, tmp_path)
    start = [p.detach() for p in __import__("_dist_problem").model(seed=0).parameters()]
    moved = max(float((a - b).abs().max()) for a, b in zip(reference, start))
    assert moved > 1e-3  # the steps did something
    for r, params in enumerate(ranks):
        for a, b in zip(params, reference):
            assert torch.allclose(a, b, rtol=0, atol=1e-10), (config, r, float((a - b).abs().max()))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_two_processes_sharing_one_gpu_take_the_single_process_step(tmp_path):
    """One GPU, two processes (gloo on CUDA tensors: NCCL refuses two ranks on one device)."""
    reference = run_steps("defaults", world=1, n_shards=2, device="cuda")
    for params in _launch("defaults", tmp_path, device="cuda"):
        for a, b in zip(params, reference):
            assert torch.allclose(a, b, rtol=0, atol=1e-10), float((a - b).abs().max())


def test_rate_termination_stops_cg_at_the_same_iteration_on_every_process(tmp_path):
    """cg_stop='rate' weighs CG against measured times, which differ between processes;
    the cost estimate is averaged over the group, so all ranks take the same steps
    (a rank stopping CG early would leave the others waiting in an all-reduce)."""
    first, second = _launch("rate", tmp_path)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_kfac_factors_are_averaged_so_every_process_takes_the_same_step(tmp_path):
    first, second = _launch("kfac", tmp_path)
    start = [p.detach() for p in __import__("_dist_problem").model(seed=0).parameters()]
    assert max(float((a - b).abs().max()) for a, b in zip(first, start)) > 1e-3
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_resolve_process_group_without_init():
    assert not dist.is_initialized()
    assert resolve_process_group(None) is None
    assert resolve_process_group(False) is None
    with pytest.raises(RuntimeError, match="not initialised"):
        resolve_process_group(object())


def test_single_process_group_is_a_no_op(tmp_path):
    """world_size 1: the optimizer reduces nothing and steps as without a group."""
    port = _free_port()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        assert resolve_process_group(None) is None  # default group of one process
        explicit = run_steps("fisher", world=1, n_shards=2)
    finally:
        dist.destroy_process_group()
    plain = run_steps("fisher", world=1, n_shards=2)
    for a, b in zip(explicit, plain):
        assert torch.equal(a, b)
