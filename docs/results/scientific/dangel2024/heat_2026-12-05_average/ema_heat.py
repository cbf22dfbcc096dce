"""By-hand experiment (2026-12-05), kept as it ran: the heat row's HF run as recipes/scientific.py
makes it, each evaluation also scoring exponential moving averages of the iterates (decays
0.8 / 0.9 / 0.95 / 0.98, warm-up d = min(decay, (1 + t)/(10 + t))), updated after every step
(a 116,865-element lerp inside the timed update). Run from the repository root with the
recipe's arguments:

    python docs/results/scientific/dangel2024/heat_2026-12-05_average/ema_heat.py \
        --problem heat4d_116865 --optimizer hf --time-budget 3000 --data-seed 2 --out DIR --no-progress
"""
import sys

import torch
sys.path.insert(0, ".")  # run from the repository root
import recipes.scientific as S
from recipes import runner

DECAYS = (0.8, 0.9, 0.95, 0.98)
state = {"model": None, "ema": None, "t": 0, "problem": None}

orig_update = S._update
def _update(name, opt, problem, model, evals):
    out = orig_update(name, opt, problem, model, evals)
    state["model"], state["problem"] = model, problem
    ps = [p.detach() for p in model.parameters()]
    t = state["t"] = state["t"] + 1
    if state["ema"] is None:
        state["ema"] = {d: [p.clone() for p in ps] for d in DECAYS}
    else:
        for d, e in state["ema"].items():
            w = 1 - min(d, (1 + t) / (10 + t))
            torch._foreach_lerp_(e, ps, w)
    return out
S._update = _update

class Run(runner.Run):
    def evaluate(self, extra=None):
        row = super().evaluate(extra)
        m = state["model"]
        if m is not None:
            saved = [p.detach().clone() for p in m.parameters()]
            for d, e in state["ema"].items():
                with torch.no_grad():
                    for p, q in zip(m.parameters(), e):
                        p.copy_(q)
                row[f"ema{d}"] = state["problem"].score(m)
            with torch.no_grad():
                for p, q in zip(m.parameters(), saved):
                    p.copy_(q)
        return row
S.Run = Run
S.main(sys.argv[1:])
