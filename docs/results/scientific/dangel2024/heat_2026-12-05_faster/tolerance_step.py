"""By-hand measurement (2026-12-05), kept as it ran: the loss after the sketched damped step
(uncentred, no line search) on its own draw and on a fresh draw, for CG tolerances 1e-9 /
1e-3 / 1e-2 / 1e-1, rank 256, at heat weights saved by hand from a run of the recipe after 20
and 40 steps (heat_20.pt, heat_40.pt: the state_dict and λ), s = λ and λ/10. Run from the
repository root: ``python docs/results/scientific/dangel2024/heat_2026-12-05_faster/tolerance_step.py 40``
(and 20); the output of 2026-12-05 is in tolerance_step_20.log and tolerance_step_40.log."""
import sys, torch, time, copy
sys.path.insert(0, '.')  # run from the repository root
torch.set_num_threads(1)
from recipes.scientific import PROBLEMS
from torch.nn.utils import parameters_to_vector, vector_to_parameters
from torch_hf.curvature.jacobian import graph_jacobian
from torch_hf.dense import sketched_residual_solve
it = int(sys.argv[1])
problem = PROBLEMS['heat4d_116865']()
model = problem.model()
st = torch.load(f'docs/results/scientific/dangel2024/heat_2026-12-05_faster/heat_{it}.pt')
model.load_state_dict(st['model']); lam = st['lam']
problem.advance()
params = list(model.parameters())
loss, r = problem.loss(model)
J = graph_jacobian(r, params).detach()
u = 2 * r.detach(); c = 2.0
theta = parameters_to_vector(params).detach().clone()
# a fresh draw, kept aside
p2 = copy.deepcopy(problem); p2.advance()
def losses(delta):
    with torch.no_grad():
        vector_to_parameters(theta + delta, params)
    a = float(problem.loss(model)[0]); b = float(p2.loss(model)[0])
    with torch.no_grad():
        vector_to_parameters(theta, params)
    return a, b
print('step', it, 'lam %.2e' % lam, 'f0 own %.4e fresh %.4e' % losses(torch.zeros_like(theta)))
for s in (lam, lam / 10):
    ref = None
    for tol in (1e-9, 1e-3, 1e-2, 1e-1):
        gen = torch.Generator().manual_seed(0)
        t = time.process_time(); res = sketched_residual_solve(J, c, s, u, 256, 400, tol, gen); dt = time.process_time() - t
        if res is None: print(' s %.1e tol %.0e: None' % (s, tol)); continue
        ref = ref if ref is not None else res
        a, b = losses(res.x.to(theta.dtype))
        print(' s %.1e tol %.0e: %3d it %.1f s  apart %.1e  q %.6e  own %.6e  fresh %.6e' % (
            s, tol, res.iterations, dt, float((res.x - ref.x).norm() / ref.x.norm()), res.q, a, b), flush=True)
