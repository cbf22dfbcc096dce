"""Behaviour kept: the trajectories recorded in tests/data/golden.pt (tests/_golden.py) are
reproduced, parameters and step diagnostics, on every configuration it covers."""
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _golden import CASES, GOLDEN, trajectory  # noqa: E402

# Recorded and replayed on the same kind of machine the trajectories agree bit for bit; the
# tolerance leaves room for another CPU's rounding, far below what a change of behaviour moves.
TOLERANCE = 1e-9


def _close(a, b) -> bool:
    if a == b:
        return True
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return abs(a - b) <= TOLERANCE * max(1.0, abs(a), abs(b))
    return a == b


@pytest.fixture(scope="module")
def golden():
    return torch.load(GOLDEN)


@pytest.mark.parametrize("name", sorted(CASES))
def test_the_recorded_trajectory_is_reproduced(golden, name):
    now, then = trajectory(name), golden[name]
    gap = float((now["params"] - then["params"]).abs().max())
    assert gap <= TOLERANCE, f"{name}: parameters moved by {gap:.3g} from the recorded trajectory"
    for step, (d_now, d_then) in enumerate(zip(now["diagnostics"], then["diagnostics"])):
        differ = {k: (d_now[k], d_then[k]) for k in d_then if not _close(d_now[k], d_then[k])}
        assert not differ, f"{name}, step {step}: {differ}"


def test_data_parallel_ranks_reproduce_the_recorded_step(golden, tmp_path):
    from test_distributed import _launch

    for now, then in zip(_launch("defaults", tmp_path), golden["data_parallel"]["params"]):
        assert float((torch.cat([p.reshape(-1) for p in now]) - then).abs().max()) <= TOLERANCE
