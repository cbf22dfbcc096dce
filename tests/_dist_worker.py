"""Worker for tests/test_distributed.py: one process of a gloo group on loopback.

    python _dist_worker.py RANK WORLD PORT OUT CONFIG [DEVICE]

Runs 3 HF steps on this rank's shard and saves the final parameters to OUT.
"""
from __future__ import annotations

import os
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
    params = run_steps(config, rank=rank, world=world, device=device)
    torch.save(params, out)
    dist.barrier()  # both ranks done
    # Leave without tearing gloo down: its threads' teardown at exit has aborted a rank
    # after all the work was done ("terminate called without an active exception", once
    # in CI, even after a barrier and destroy_process_group).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
