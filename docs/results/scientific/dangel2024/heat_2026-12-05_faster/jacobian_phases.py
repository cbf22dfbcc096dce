"""By-hand measurement (2026-12-05), kept as it ran: the time of J read off the heat
problem's batched closure (``torch_hf.curvature.jacobian.graph_jacobian``, J's buffer reused
from call to call as the optimizer does) and of its parts, wall time, one thread, at the
initial point; four calls, the first of which touches J's 3.3 GB for the first time. Run
from the repository root at the commit to measure:

    python docs/results/scientific/dangel2024/heat_2026-12-05_faster/jacobian_phases.py
"""
import sys
import time

import torch

sys.path.insert(0, ".")  # run from the repository root
import recipes.scientific as S  # noqa: E402
import torch_hf.curvature.jacobian as JM  # noqa: E402
from recipes.runner import subnormals_flushed  # noqa: E402

torch.set_num_threads(1)
T = {}


def wrap(name):
    f = getattr(JM, name)

    def timed(*a, **k):
        t = time.perf_counter()
        r = f(*a, **k)
        T[name] = T.get(name, 0) + time.perf_counter() - t
        return r
    setattr(JM, name, timed)


for n in ["_cotangents", "_assemble", "_agrees", "_case_map"]:
    wrap(n)
problem = S.PROBLEMS["heat4d_116865"]()
model = problem.model()
params = list(model.parameters())
buf = None
with subnormals_flushed(True):
    for k in range(4):
        loss, r = problem.loss(model)
        T.clear()
        t = time.perf_counter()
        buf = JM.graph_jacobian(r, params, None, buf)
        print(k, f"J {time.perf_counter() - t:.2f} s", {a: round(b, 2) for a, b in T.items()}, flush=True)
