"""HessianFree (Algorithm 3): optima of convex problems, backtracking, state, robustness."""
import copy
import math

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_hf
from torch_hf import HessianFree, NonFiniteLossError
from torch_hf.damping import Tikhonov
from torch_hf.optimizer import cg_backtracking
from torch_hf.preconditioners import EmpiricalFisherDiagonal, GGNDiagonal, Identity


def _least_squares(n=30, d=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randn(n, 1, generator=g, dtype=torch.float64)
    lin = nn.Linear(d, 1, bias=False).double()

    def closure():
        z = lin(a)
        return 0.5 * ((z - y) ** 2).sum(), z

    return lin, a, y, closure


def test_one_step_lands_on_the_least_squares_optimum():
    lin, a, y, closure = _least_squares()
    opt = HessianFree(lin.parameters(), damping=Tikhonov(1e-12, adapt=None), preconditioner=Identity(), cg_stop="progress",
                      cg_max_iters=6, cg_tol=0.0, cg_decay=0.0)
    opt.step(closure)
    expected = torch.linalg.lstsq(a, y).solution.reshape(-1)
    assert torch.allclose(lin.weight.reshape(-1), expected, rtol=1e-9, atol=1e-11)
    assert opt.last_step.rho == pytest.approx(1.0, abs=1e-8)


def test_weight_decay_is_added_exactly_to_gradient_and_curvature():
    lin, a, y, closure = _least_squares()
    wd = 3.0
    opt = HessianFree(lin.parameters(), damping=Tikhonov(1e-12, adapt=None), preconditioner=Identity(), cg_stop="progress",
                      cg_max_iters=6, cg_tol=0.0, cg_decay=0.0, weight_decay=wd)
    opt.step(closure)
    ridge = torch.linalg.solve(a.T @ a + wd * torch.eye(6, dtype=torch.float64), a.T @ y).reshape(-1)
    assert torch.allclose(lin.weight.reshape(-1), ridge, rtol=1e-9, atol=1e-11)


def test_per_group_weight_decay_is_honoured():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(40, 4, generator=g, dtype=torch.float64)
    y = torch.randn(40, 1, generator=g, dtype=torch.float64)
    lin = nn.Linear(4, 1).double()

    def closure():
        z = lin(a)
        return 0.5 * ((z - y) ** 2).sum(), z

    opt = HessianFree([{"params": [lin.weight], "weight_decay": 2.0}, {"params": [lin.bias], "weight_decay": 0.0}],
                      damping=Tikhonov(1e-12, adapt=None), preconditioner=Identity(), cg_max_iters=5, cg_tol=0.0, cg_stop="progress",
                      cg_decay=0.0)
    opt.step(closure)
    ax = torch.cat([a, torch.ones(40, 1, dtype=torch.float64)], 1)
    reg = torch.diag(torch.tensor([2.0] * 4 + [0.0], dtype=torch.float64))
    expected = torch.linalg.solve(ax.T @ ax + reg, ax.T @ y).reshape(-1)
    got = torch.cat([lin.weight.reshape(-1), lin.bias])
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-11)


def _logistic(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, 5, generator=g, dtype=torch.float64)
    w_true = torch.randn(5, 1, generator=g, dtype=torch.float64)
    t = (torch.rand(200, 1, generator=g, dtype=torch.float64) < torch.sigmoid(x @ w_true)).double()
    return x, t


def _newton_logistic(x, t, wd):
    xb = torch.cat([x, torch.ones(len(x), 1, dtype=torch.float64)], 1)
    w = torch.zeros(xb.shape[1], 1, dtype=torch.float64)
    for _ in range(50):
        p = torch.sigmoid(xb @ w)
        grad = xb.T @ (p - t) / len(x) + wd * w
        hess = xb.T @ (xb * (p * (1 - p))) / len(x) + wd * torch.eye(xb.shape[1], dtype=torch.float64)
        w = w - torch.linalg.solve(hess, grad)
    return w.reshape(-1)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_logistic_regression_reaches_the_newton_optimum(curvature):
    x, t = _logistic()
    wd = 1e-3
    lin = nn.Linear(5, 1).double()
    nn.init.zeros_(lin.weight)
    nn.init.zeros_(lin.bias)

    def closure():
        z = lin(x)
        return F.binary_cross_entropy_with_logits(z, t), z

    opt = HessianFree(lin.parameters(), curvature=curvature, damping=Tikhonov(1.0), weight_decay=wd,
                      preconditioner=GGNDiagonal(generator=torch.Generator().manual_seed(0)), cg_tol=1e-12)
    for _ in range(25):
        opt.step(closure)
    expected = _newton_logistic(x, t, wd)
    got = torch.cat([lin.weight.reshape(-1), lin.bias])
    assert float((got.detach() - expected).abs().max()) <= 1e-8


def test_cg_backtracking_walks_back_while_the_objective_improves():
    values = [5.0, 4.0, 3.0, 3.5, 6.0]
    calls = []

    def objective(x):
        calls.append(int(x))
        return values[int(x)]

    index, best = cg_backtracking([torch.tensor(i) for i in range(5)], objective)
    assert (index, best) == (2, 3.0)
    assert calls == [4, 3, 2, 1]  # stops at the first iterate that is worse
    index, best = cg_backtracking([torch.tensor(i) for i in range(3)], lambda x: [1.0, float("inf"), math.inf][int(x)])
    assert (index, best) == (0, 1.0)


def _overshooting_problem(scale=0.1):
    """Curvature from a batch whose curvature is far too small, so later CG iterates overshoot."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    x = torch.randn(64, 4, generator=g, dtype=torch.float64)
    t = torch.rand(64, 3, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double()

    def closure():
        z = model(x)
        return F.binary_cross_entropy_with_logits(z, t), z

    def curvature_closure():
        z = model(x[:4])
        return F.binary_cross_entropy_with_logits(z, t[:4], reduction="sum") * scale / 4, z

    return model, closure, curvature_closure


def test_step_chooses_the_backtracked_iterate_and_reports_it():
    # Trial points are scored by (‖δ‖ − r)², unimodal along unpreconditioned CG from zero
    # (‖x_i‖ grows monotonically), with r the norm of the 4th saved iterate: backtracking
    # must walk back from the last iterate to exactly that one.
    lin, a, y, closure = _least_squares(d=6)
    kwargs = dict(damping=Tikhonov(1e-3, adapt=None), preconditioner=Identity(), cg_max_iters=6, cg_tol=0.0,
                  cg_decay=0.0, line_search_c=None)
    op = torch_hf.GGN(list(lin.parameters()), closure)
    saved = torch_hf.cg.cg(lambda v: op.mv(v) + 1e-3 * v, -op.grad, max_iters=6, tol=0.0).saved
    target_iteration, target = saved[3][0], float(saved[3][1].norm())
    theta0 = lin.weight.detach().reshape(-1).clone()

    def scored_closure():
        loss, z = closure()
        if torch.is_grad_enabled():
            return loss, z
        return (lin.weight.reshape(-1) - theta0).norm().sub(target).square() - 1.0, z

    opt = HessianFree(lin.parameters(), cg_stop="progress", **kwargs)
    opt.step(scored_closure)
    d = opt.last_step
    assert d.chosen_iteration == target_iteration < d.cg_iterations
    assert d.backtracking_evaluations == len(saved) - 3 + 1
    moved = lin.weight.detach().reshape(-1) - theta0
    assert float(moved.norm()) == pytest.approx(target, rel=1e-12)
    assert d.loss_after == pytest.approx(-1.0, abs=1e-12)


def test_line_search_shrinks_a_step_that_fails_armijo():
    model, closure, curvature_closure = _overshooting_problem()
    opt = HessianFree(model.parameters(), damping=Tikhonov(1e-2, adapt=None), preconditioner=Identity(),
                      cg_max_iters=40, cg_tol=0.0, backtracking_factor=None)
    loss0 = closure()[0].item()
    opt.step(closure, curvature_closure)
    d = opt.last_step
    assert 0 < d.line_search_alpha < 1.0 and d.line_search_evaluations >= 1
    assert d.directional_derivative < 0
    assert d.loss_after <= loss0 + 1e-2 * d.line_search_alpha * d.directional_derivative  # Armijo holds
    with torch.no_grad():
        assert closure()[0].item() == pytest.approx(d.loss_after, rel=1e-12)


def test_lambda_follows_rho_in_the_optimizer():
    lin, a, y, closure = _least_squares()
    opt = HessianFree(lin.parameters(), damping=Tikhonov(1.0), preconditioner=Identity(), cg_tol=0.0)
    opt.step(closure)  # quadratic problem: ρ = 1 > 3/4
    assert opt.last_step.rho == pytest.approx(1.0, abs=1e-6)
    assert opt.damping.value == pytest.approx(2 / 3)
    assert opt.last_step.damping == 1.0 and opt.last_step.damping_next == pytest.approx(2 / 3)


def _small_autoencoder(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 2), nn.Linear(2, 4), nn.Sigmoid(),
                          nn.Linear(4, 6)).double()
    x = torch.rand(32, 6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)

    def closure_for(m):
        def closure():
            z = m(x)
            return F.binary_cross_entropy_with_logits(z, x), z
        return closure

    return model, closure_for


def test_state_dict_round_trip_continues_bit_identically():
    model, closure_for = _small_autoencoder()

    def make(m):
        return HessianFree(m.parameters(), weight_decay=1e-3, cg_max_iters=20,
                           preconditioner=GGNDiagonal(generator=torch.Generator().manual_seed(5)))

    opt = make(model)
    for _ in range(3):
        opt.step(closure_for(model))
    opt._last_trial_evaluations = 7  # what cg_stop="rate" charges the next step for trial objectives
    saved_model = copy.deepcopy(model.state_dict())
    saved_opt = copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(closure_for(model))
    reference = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
    lam_ref = opt.damping.value

    model2, _ = _small_autoencoder(seed=1)  # different start, overwritten by the load
    model2.load_state_dict(saved_model)
    opt2 = make(model2)
    opt2.load_state_dict(saved_opt)
    assert opt2._last_trial_evaluations == 7
    for _ in range(3):
        opt2.step(closure_for(model2))
    assert torch.equal(torch.nn.utils.parameters_to_vector(model2.parameters()).detach(), reference)
    assert opt2.damping.value == lam_ref
    assert opt2.state[next(model2.parameters())]["step"] == 6


def test_step_returns_loss_before_update_and_fills_diagnostics():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), cg_max_iters=10)
    closure = closure_for(model)
    expected = closure()[0].item()
    loss = opt.step(closure)
    assert loss.item() == pytest.approx(expected, rel=1e-14)
    d = opt.last_step
    assert d.loss_before == pytest.approx(expected, rel=1e-14)
    assert d.loss_after < d.loss_before and d.accepted
    assert 1 <= d.cg_iterations <= 10 and d.curvature_products >= d.cg_iterations
    assert d.objective_evaluations == d.backtracking_evaluations + d.line_search_evaluations >= 1
    assert d.wall_time_s > 0 and set(d.times) >= {"cg", "preconditioner"}
    assert opt.history[-1] is d and isinstance(d.as_dict(), dict)


@pytest.mark.parametrize("curvature", ["ggn", "hessian"])
def test_separate_curvature_batch_is_used(curvature):
    model, closure_for = _small_autoencoder()
    x_small = torch.rand(4, 6, dtype=torch.float64)
    count = {"n": 0}

    def curvature_closure():
        count["n"] += 1
        z = model(x_small)
        return F.binary_cross_entropy_with_logits(z, x_small), z

    opt = HessianFree(model.parameters(), cg_max_iters=5, curvature=curvature)
    opt.step(closure_for(model), curvature_closure)
    assert count["n"] == 1 and opt.last_step.accepted


# -- robustness -----------------------------------------------------------------

def _params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def _same(model, params):
    return all(torch.equal(p, q) for p, q in zip(model.parameters(), params))


def test_non_finite_loss_at_start_raises_and_leaves_parameters_untouched():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), cg_max_iters=5)
    before = _params_of(model)

    def bad():
        z = model(torch.full((3, 6), float("nan"), dtype=torch.float64))
        return F.binary_cross_entropy_with_logits(z, torch.zeros_like(z)), z

    with pytest.raises(NonFiniteLossError):
        opt.step(bad)
    assert _same(model, before)
    opt.step(closure_for(model))  # still usable
    assert opt.last_step.accepted


def test_a_non_finite_value_names_the_closure_it_came_from():
    model, closure_for = _small_autoencoder()
    good = closure_for(model)
    opt = HessianFree(model.parameters(), cg_max_iters=5)
    before = _params_of(model)

    def nan_loss():
        loss, z = good()
        return loss * float("nan"), z

    with pytest.raises(NonFiniteLossError, match=r"^curvature_closure \(the curvature batch\): .*non-finite loss"):
        opt.step(good, nan_loss)
    with pytest.raises(NonFiniteLossError, match=r"^closure \(the gradient batch\): .*non-finite loss"):
        opt.step(nan_loss, good)
    with pytest.raises(NonFiniteLossError, match=r"^the closure returned a non-finite loss"):
        opt.step(nan_loss)

    def nan_gradient():  # a finite loss whose gradient is not: sqrt at 0
        loss, z = good()
        return loss + torch.sqrt(model[0].weight[0, 0] * 0.0), z

    with pytest.raises(NonFiniteLossError, match=r"^closure \(the gradient batch\): the gradient"):
        opt.step(nan_gradient, good)
    assert _same(model, before)
    opt.step(good)  # still usable
    assert opt.last_step.accepted


def test_non_finite_trial_points_are_rejected_and_parameters_restored_exactly():
    model, closure_for = _small_autoencoder()
    good = closure_for(model)

    def closure():
        loss, z = good()
        if not torch.is_grad_enabled():  # trial points are evaluated without grad
            return loss * float("nan"), z
        return loss, z

    opt = HessianFree(model.parameters(), cg_max_iters=10)
    before = _params_of(model)
    lam = opt.damping.value
    opt.step(closure)
    assert _same(model, before)
    assert not opt.last_step.accepted and opt.last_step.line_search_alpha == 0.0
    assert opt.damping.value > lam
    opt.step(good)  # usable afterwards
    assert opt.last_step.accepted


def test_non_finite_curvature_product_ends_cg_with_best_finite_iterate():
    model, closure_for = _small_autoencoder()
    calls = {"n": 0}

    def loss_hvp(u):
        calls["n"] += 1
        scale = float("nan") if calls["n"] > 4 else 1.0
        p = torch.sigmoid(model[-1].weight.new_zeros(1))  # any finite scale
        return u * 0.05 * scale

    opt = HessianFree(model.parameters(), cg_max_iters=30, preconditioner=Identity(), loss_hvp=loss_hvp, cg_stop="progress")
    opt.step(closure_for(model))
    d = opt.last_step
    assert d.cg_stop_reason == "non_finite" and d.cg_iterations <= 4
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert d.accepted


def test_parameters_without_grad_are_skipped():
    model, closure_for = _small_autoencoder()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = HessianFree(model.parameters(), cg_max_iters=5)
    opt.step(closure_for(model))
    assert torch.equal(model[0].weight, frozen)
    assert opt.last_step.accepted


def test_sparse_gradients_raise():
    emb = nn.Embedding(10, 3, sparse=True).double()
    idx = torch.tensor([1, 2, 3])

    def closure():
        z = emb(idx)
        return (z ** 2).sum(), z

    opt = HessianFree(emb.parameters(), cg_max_iters=3)
    with pytest.raises(TypeError, match="sparse"):
        opt.step(closure)


def test_per_group_options_that_hf_cannot_honour_raise():
    model, _ = _small_autoencoder()
    with pytest.raises(ValueError, match="cg_max_iters"):
        HessianFree([{"params": [model[0].weight], "cg_max_iters": 10}, {"params": [model[0].bias]}])


@pytest.mark.parametrize(
    "kwargs, match",
    [({"curvature": "fisher"}, "curvature"), ({"lr": 0}, "lr"), ({"weight_decay": -1}, "weight_decay"),
     ({"cg_max_iters": 0}, "cg_max_iters"), ({"cg_min_iters": -1}, "cg_min_iters"), ({"cg_tol": -1}, "cg_tol"),
     ({"cg_decay": 1.5}, "cg_decay"), ({"backtracking_factor": 1.0}, "backtracking_factor"),
     ({"line_search_c": 2.0}, "line_search_c"), ({"line_search_beta": 1.0}, "line_search_beta"),
     ({"trust_radius": 0.0}, "trust_radius"), ({"cg_check_every": 0}, "cg_check_every"),
     ({"cg_stop": "sometimes"}, "cg_stop")],
)
def test_invalid_hyper_parameters_raise_value_error_naming_them(kwargs, match):
    model, _ = _small_autoencoder()
    with pytest.raises(ValueError, match=match):
        HessianFree(model.parameters(), **kwargs)


def test_invalid_damping_or_preconditioner_raise_type_error():
    model, _ = _small_autoencoder()
    with pytest.raises(TypeError, match="damping"):
        HessianFree(model.parameters(), damping=1.0)
    with pytest.raises(TypeError, match="preconditioner"):
        HessianFree(model.parameters(), preconditioner=object())


def test_step_requires_a_closure():
    model, _ = _small_autoencoder()
    with pytest.raises(TypeError, match="closure"):
        HessianFree(model.parameters()).step(None)


def test_trust_region_option_bounds_the_step():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), damping=Tikhonov(1e-6, adapt=None), preconditioner=Identity(),
                      trust_radius=0.05, cg_decay=0.0, line_search_c=None, backtracking_factor=None)
    opt.step(closure_for(model))
    assert opt.last_step.step_norm <= 0.05 * (1 + 1e-9)


def test_training_decreases_the_loss_with_fisher_preconditioner():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), preconditioner=EmpiricalFisherDiagonal(), cg_max_iters=20)
    closure = closure_for(model)
    first = closure()[0].item()
    for _ in range(10):
        opt.step(closure)
    assert closure()[0].item() < first - 0.02
    assert all(d.accepted for d in opt.history)


def test_autocast_closure_keeps_cg_in_float32():
    """autocast_dtype=bfloat16: the forward runs in bf16, the step stays float32 and descends."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4))
    x, y = torch.randn(64, 8), torch.randint(0, 4, (64,))
    seen = []

    def closure():
        z = model(x)
        seen.append(z.dtype)
        return torch.nn.functional.cross_entropy(z.float(), y), z

    opt = torch_hf.HessianFree(model.parameters(), autocast_dtype=torch.bfloat16, cg_max_iters=10)
    losses = [float(opt.step(closure)) for _ in range(3)]
    assert torch.bfloat16 in seen
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert opt.state[next(iter(model.parameters()))]["delta"].dtype == torch.float32
    assert losses[-1] < losses[0]
    with pytest.raises(TypeError, match="autocast_dtype"):
        torch_hf.HessianFree(model.parameters(), autocast_dtype="bf16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_matches_cpu_and_keeps_state_on_device():
    def run(device):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)).double()
        model = model.to(device)
        gen = torch.Generator().manual_seed(1)
        x, y = torch.randn(64, 8, generator=gen, dtype=torch.float64), torch.randint(0, 4, (64,), generator=gen)
        x, y = x.to(device), y.to(device)

        def closure():
            z = model(x)
            return F.cross_entropy(z, y), z

        opt = torch_hf.HessianFree(model.parameters(), cg_max_iters=15, cg_check_every=1,
                                   preconditioner=torch_hf.preconditioners.EmpiricalFisherDiagonal())
        for _ in range(3):
            opt.step(closure)
        delta = opt.state[next(iter(model.parameters()))]["delta"]
        assert delta.device.type == torch.device(device).type
        return [p.detach().cpu() for p in model.parameters()]

    for a, b in zip(run("cpu"), run("cuda")):
        assert torch.allclose(a, b, rtol=0, atol=1e-9)


def test_closures_that_differentiate_w_r_t_their_inputs_work_at_trial_points():
    # A PINN closure calls autograd.grad inside: under no_grad it would raise; the optimizer
    # notices once and evaluates trial points with grad enabled from then on.
    from _cases import PoissonResiduals

    case = PoissonResiduals(n_interior=20, n_boundary=8, width=6)
    grad_modes = []

    def closure():
        grad_modes.append(torch.is_grad_enabled())
        return case.closure()

    opt = HessianFree(case.params, cg_max_iters=30)
    losses = [float(opt.step(closure)) for _ in range(12)]
    assert opt._trial_call.needs_grad
    assert opt.last_step.accepted and opt.last_step.objective_evaluations >= 1
    assert losses[-1] < 0.5 * losses[0] and all(b <= a for a, b in zip(losses, losses[1:]))
    assert all(grad_modes[-opt.last_step.objective_evaluations:])


def test_plain_closures_keep_trial_points_graph_free():
    model, closure_for = _small_autoencoder()
    closure = closure_for(model)
    grad_modes = []

    def recording_closure():
        grad_modes.append(torch.is_grad_enabled())
        return closure()

    opt = HessianFree(model.parameters(), cg_max_iters=10)
    opt.step(recording_closure)
    evals = opt.last_step.objective_evaluations
    assert evals >= 1 and not opt._trial_call.needs_grad
    assert grad_modes[0] and not any(grad_modes[-evals:])  # the curvature evaluation needs a graph, trials do not


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_resume_with_default_options_is_bit_identical(dtype):
    # The default GGN-diagonal preconditioner draws random probes: from the optimizer's own
    # stream, whose state travels in state_dict.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 6)).to(dtype)
    x = torch.rand(40, 6, dtype=dtype)

    def closure_for(m):
        def closure():
            z = m(x)
            return F.binary_cross_entropy_with_logits(z, x), z
        return closure

    opt = HessianFree(model.parameters(), cg_max_iters=15)
    for _ in range(2):
        opt.step(closure_for(model))
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    for _ in range(3):
        opt.step(closure_for(model))
    reference = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()

    torch.manual_seed(123)  # a different global stream: the resumed run must not depend on it
    model2 = nn.Sequential(nn.Linear(6, 5), nn.Sigmoid(), nn.Linear(5, 6)).to(dtype)
    model2.load_state_dict(saved_model)
    opt2 = HessianFree(model2.parameters(), cg_max_iters=15)
    opt2.load_state_dict(saved_opt)
    for _ in range(3):
        opt2.step(closure_for(model2))
    resumed = torch.nn.utils.parameters_to_vector(model2.parameters()).detach()
    assert float((resumed - reference).abs().max()) == 0.0
    assert opt2.damping.value == opt.damping.value


def test_own_generator_drives_the_preconditioner_and_is_not_the_global_one():
    gen = torch.Generator().manual_seed(7)
    pre = GGNDiagonal()
    model = nn.Linear(3, 2)
    opt = HessianFree(model.parameters(), preconditioner=pre, generator=gen)
    assert opt.generator is gen and pre.generator is gen
    own = GGNDiagonal(generator=torch.Generator().manual_seed(1))
    HessianFree(model.parameters(), preconditioner=own)
    assert own.generator is not gen  # a preconditioner's own generator is kept
    with pytest.raises(TypeError, match="generator"):
        HessianFree(model.parameters(), generator=3)


def test_history_is_bounded():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), cg_max_iters=5, history_size=2)
    for _ in range(4):
        opt.step(closure_for(model))
    assert len(opt.history) == 2 and opt.history[-1] is opt.last_step and opt.history[0].step == 3
    silent = HessianFree(model.parameters(), cg_max_iters=5, history_size=0)
    silent.step(closure_for(model))
    assert silent.history == [] and silent.last_step is not None
    with pytest.raises(ValueError, match="history_size"):
        HessianFree(model.parameters(), history_size=-1)


def _in_a_row(opt) -> int:
    """How many of the latest steps in a row had ρ below the loss's resolution."""
    count = 0
    for d in reversed(opt.history):
        if d.rho_informative:
            break
        count += 1
    return count


def test_at_a_minimum_steps_below_the_loss_resolution_say_converged_and_do_not_warn():
    lin, a, y, closure = _least_squares()
    opt = HessianFree(lin.parameters(), preconditioner=Identity(), damping=Tikhonov(1e-8), cg_max_iters=50)
    for _ in range(3):
        opt.step(closure)  # reaches the least-squares optimum
    lam = opt.damping.value
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a converged run is not something to warn about
        for _ in range(5):
            opt.step(closure)
            assert not opt.last_step.rho_informative
            assert opt.damping.value == lam  # ρ is rounding noise here: λ must not grow on it
            in_a_row = _in_a_row(opt)
            assert opt.last_step.converged == (in_a_row >= 3)  # the verdict needs three such steps
    assert in_a_row >= 5 and opt.last_step.stall == "converged"
    solution = torch.linalg.lstsq(a, y).solution.reshape(-1)
    assert float((lin.weight.detach().reshape(-1) - solution).abs().max()) < 1e-12


def _saddle_problem():
    """A tanh network with every weight zero: the gradient is exactly zero (the targets have
    zero mean), the GGN sees only the output bias, and the Hessian couples the two layers'
    weights into directions of negative curvature."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = x[:, :1] - x[:, :1].mean()
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    for p in model.parameters():
        nn.init.zeros_(p)

    def closure():
        z = model(x)
        return 0.5 * ((z - y) ** 2).mean(), z

    return model, closure


def test_a_stall_at_a_saddle_point_warns_once_and_is_not_called_converged():
    model, closure = _saddle_problem()
    opt = HessianFree(model.parameters(), preconditioner=Identity())
    with pytest.warns(RuntimeWarning, match="saddle point.*float resolution.*sparse_init_") as record:
        for _ in range(5):
            opt.step(closure)
            assert not opt.last_step.rho_informative and not opt.last_step.converged
    assert opt.last_step.stall == "saddle"
    assert len([w for w in record if "float resolution" in str(w.message)]) == 1


def test_a_stall_on_a_plateau_of_saturated_units_warns():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 2, generator=g, dtype=torch.float64)
    hidden, readout = nn.Linear(2, 3).double(), nn.Linear(3, 1).double()
    with torch.no_grad():
        hidden.weight.fill_(1e3)  # tanh saturates to ±1 exactly: no gradient, no curvature
        hidden.bias.zero_()

    def closure():
        z = readout(torch.tanh(hidden(x)))
        return 0.5 * ((z - x[:, 1:]) ** 2).mean(), z

    opt = HessianFree(hidden.parameters(), preconditioner=Identity())
    with pytest.warns(RuntimeWarning, match="plateau"):
        for _ in range(3):
            opt.step(closure)
    assert opt.last_step.stall == "plateau" and not opt.last_step.converged


def test_informative_steps_still_update_lambda():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), cg_max_iters=10)
    opt.step(closure_for(model))
    assert opt.last_step.rho_informative and opt.damping.value != opt.last_step.damping


def test_subnormals_are_flushed_inside_the_step_and_the_callers_mode_restored():
    from torch_hf.optimizer import _flushing_denormals

    if not torch.set_flush_denormal(True):
        pytest.skip("this CPU has no flush-to-zero mode")
    torch.set_flush_denormal(False)
    lin, _, _, closure = _least_squares()
    seen = []

    def probing():
        seen.append(_flushing_denormals())
        return closure()

    HessianFree(lin.parameters()).step(probing)
    assert seen and all(seen) and not _flushing_denormals()
    seen.clear()
    HessianFree(lin.parameters(), flush_denormal=False).step(probing)
    assert seen and not any(seen)
    torch.set_flush_denormal(True)  # a caller that flushes keeps flushing
    try:
        HessianFree(lin.parameters()).step(closure)
        assert _flushing_denormals()
    finally:
        torch.set_flush_denormal(False)


def test_rate_termination_stops_cg_early_and_still_trains():
    model, closure_for = _small_autoencoder()
    fast_model = copy.deepcopy(model)
    slow = HessianFree(model.parameters(), cg_max_iters=60, cg_tol=0.0, cg_stop="progress")
    fast = HessianFree(fast_model.parameters(), cg_max_iters=60, cg_tol=0.0, cg_stop="rate")
    losses, reasons = [], []
    for _ in range(5):
        slow.step(closure_for(model))
        assert slow.last_step.cg_stop_reason != "rate"
        losses.append(float(fast.step(closure_for(fast_model))))
        reasons.append(fast.last_step.cg_stop_reason)
    assert "rate" in reasons and min(d.cg_iterations for d in fast.history) < 60
    assert losses[-1] < losses[0]


def test_a_checkpoint_saved_by_torch_hf_0_1_0_loads_and_continues_as_it_did():
    """tests/data/checkpoint_0.1.0.pt was written by the optimizer before its state_dict got a
    version key (ScaleSensitive damping, GGN diagonal with decay, weight decay, own generator)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _golden import _autoencoder

    saved = torch.load(Path(__file__).resolve().parent / "data" / "checkpoint_0.1.0.pt", weights_only=False)
    model, closure = _autoencoder(seed=3)
    model.load_state_dict(saved["model"])
    opt = HessianFree(model.parameters(), damping=torch_hf.damping.ScaleSensitive(2.0),
                      preconditioner=GGNDiagonal(decay=0.9), weight_decay=1e-4, cg_max_iters=30,
                      generator=torch.Generator().manual_seed(999), cg_stop="rate", solver="cg")  # 0.1.0's rules
    opt.load_state_dict(saved["optimizer"])
    # Bit for bit on the kind of CPU that recorded it; 1e-9 leaves room for another CPU's
    # rounding (this well-conditioned case keeps a 1e-15 nudge below 1e-13, tests/test_golden.py).
    for expected in saved["continuation"]:
        opt.step(closure)
        got = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
        assert float((got - expected).abs().max()) <= 1e-9
    assert opt.damping.value == pytest.approx(saved["damping_value"], rel=1e-9)


def test_one_closure_with_curvature_batch_takes_the_two_closure_step():
    x = torch.rand(40, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)

    def run(one_closure: bool):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 4), nn.Sigmoid(), nn.Linear(4, 6)).double()
        opt = HessianFree(model.parameters(), curvature_batch=10 if one_closure else None,
                          generator=torch.Generator().manual_seed(1))

        def closure(cases=slice(None)):
            xb = x[cases]
            z = model(xb)
            return F.binary_cross_entropy_with_logits(z, xb), z

        for _ in range(3):
            if one_closure:
                opt.step(closure)
            else:
                opt.step(closure, lambda: closure(slice(0, 10)))
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach()

    assert torch.equal(run(True), run(False))


def test_curvature_batch_needs_a_closure_that_takes_the_cases():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), curvature_batch=8)
    with pytest.raises(torch_hf.ClosureError, match=r"closure\(cases=slice\(None\)\)"):
        opt.step(closure_for(model))
    with pytest.raises(ValueError, match="curvature_batch"):
        HessianFree(model.parameters(), curvature_batch=0)


def test_state_dict_reads_without_side_effects_and_carries_a_version():
    model, closure_for = _small_autoencoder()
    opt = HessianFree(model.parameters(), cg_max_iters=5)
    opt.step(closure_for(model))
    before = copy.deepcopy(opt.state)
    sd = opt.state_dict()
    assert sd["hessian_free"]["version"] == 2
    assert set(opt._state()) == set(before[next(iter(before))])  # nothing written into the state
    assert set(sd["param_groups"][0]) == {"params", "lr", "weight_decay"}


def test_settings_of_the_whole_optimizer_are_refused_in_added_param_groups():
    model, _ = _small_autoencoder()
    opt = HessianFree([model[0].weight])
    with pytest.raises(ValueError, match="cg_tol"):
        opt.add_param_group({"params": [model[0].bias], "cg_tol": 1e-3})
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [model[0].bias], "lr": 0.5})
    opt.add_param_group({"params": [model[0].bias], "weight_decay": 1e-3})  # may differ per group


def test_a_float32_run_converged_to_its_resolution_is_told_what_float64_buys(caplog):
    import logging

    lin, a, y, _ = _least_squares()
    lin32, a32, y32 = lin.float(), a.float(), y.float()

    def closure():
        z = lin32(a32)
        return 0.5 * ((z - y32) ** 2).sum(), z

    opt = HessianFree(lin32.parameters(), preconditioner=Identity(), damping=Tikhonov(1e-8), cg_max_iters=50)
    with caplog.at_level(logging.INFO, logger="torch_hf"), warnings.catch_warnings():
        warnings.simplefilter("error")
        for _ in range(10):
            opt.step(closure)
    assert opt.last_step.converged
    assert any("float64 model and data resolve the loss about 9 digits further" in r.getMessage()
               for r in caplog.records)
