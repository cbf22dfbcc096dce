"""Worker for tests/test_distributed.py: one process of a gloo group on loopback.

    python _dist_worker.py RANK WORLD PORT OUT CONFIG [DEVICE]

Runs 3 HF steps on this rank's shard and saves the final parameters to OUT.
"""
from __future__ import annotations

import sys
from datetime import timedelta
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    rank, world, port, out, config = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    device = sys.argv[6] if len(sys.argv) > 6 else "cpu"
    import torch.distributed as dist
    from _dist_problem import run_steps

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        params = run_steps(config, rank=rank, world=world, device=device)
        torch.save(params, out)
        # Both ranks done before teardown: a rank leaving while the other still talks to it
        # has aborted gloo's threads ("terminate called without an active exception").
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
