"""By-hand measurement (2026-12-05), kept as it ran: the heat recipe's update loop (its first
N steps, the default draws), each step's process time and the calls and time of J
(``graph_jacobian``), the Nyström factor and the sketched solves. Run from the repository
root: ``python docs/results/scientific/dangel2024/heat_2026-12-05_faster/step_profile.py 26``;
output at 667b344 in step_profile_667b344.log. step_profile_97e74f0.log: the same loop at
97e74f0 timed by an earlier version of this script (J and the sketched solve, no call counts;
its columns: step, time, phases, evaluations, timed functions, CG iterations, λ, rank)."""
import sys, time, torch
sys.path.insert(0, ".")
torch.set_num_threads(1)
import recipes.scientific as S
import torch_hf.dense as D, torch_hf.optimizer as O
from recipes.runner import subnormals_flushed
T = {}
def wrap(mod, name):
    f = getattr(mod, name)
    def g(*a, **k):
        t = time.process_time(); r = f(*a, **k)
        c = T.setdefault(name, [0, 0.0]); c[0] += 1; c[1] += time.process_time() - t
        return r
    setattr(mod, name, g)
wrap(O, "graph_jacobian")
if hasattr(D, "nystrom_factor"):
    wrap(D, "nystrom_factor")
wrap(D, "sketched_residual_solve")
problem = S.PROBLEMS["heat4d_116865"]()
model = problem.model()
opt = S.make_optimizer("hf", model, None)
evals = [0]
with subnormals_flushed(True):
    for k in range(int(sys.argv[1])):
        T.clear(); t = time.process_time()
        S._update("hf", opt, problem, model, evals)
        print(k, f"{time.process_time() - t:.2f}s", {a: (b[0], round(b[1], 2)) for a, b in T.items()},
              opt.last_step.cg_iterations, "rank", opt._sketched.rank, flush=True)
