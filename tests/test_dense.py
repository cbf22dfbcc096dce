"""The dense exact solve (torch_hf/dense.py) and the dense curvature matrices it is built from."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_hf
from torch_hf.cg import cg
from torch_hf.curvature import GGN, Hessian
from torch_hf import regime
from torch_hf.dense import dense_matrix, dense_solve


def _problem(loss: str, seed: int = 0, cases: int = 11):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    x = torch.randn(cases, 3, dtype=torch.float64)
    y = torch.randn(cases, 2, dtype=torch.float64)

    def closure():
        z = model(x)
        if loss == "mse":
            return F.mse_loss(z, y), z
        if loss == "ce":
            return F.cross_entropy(z, y.argmax(1)), z
        return ((z - y) ** 4).sum() / cases, z  # not a matching loss: L'' by double backward

    return model, closure


def _columns(op) -> torch.Tensor:
    eye = torch.eye(op.numel, dtype=torch.float64)
    return torch.stack([op.mv(eye[i]) for i in range(op.numel)], 1)


@pytest.mark.parametrize("loss", ["mse", "ce", "quartic"])
@pytest.mark.parametrize("chunk", [1, 7, 64])
def test_dense_ggn_is_its_products_column_by_column(loss, chunk):
    model, closure = _problem(loss)
    op = GGN(list(model.parameters()), closure)
    G = op.dense(chunk=chunk)
    torch.testing.assert_close(G, _columns(op), rtol=1e-12, atol=1e-13)
    assert torch.equal(G, G.t())


@pytest.mark.parametrize("op_cls", [GGN, Hessian])
def test_mm_is_one_product_per_column(op_cls):
    model, closure = _problem("quartic")
    op = op_cls(list(model.parameters()), closure)
    V = torch.randn(op.numel, 4, dtype=torch.float64)
    torch.testing.assert_close(op.mm(V), torch.stack([op.mv(V[:, i]) for i in range(4)], 1), rtol=1e-12, atol=1e-13)
    with pytest.raises(ValueError, match="matrix"):
        op.mm(V[:-1])


def test_the_dense_solve_equals_cg_run_to_convergence():
    model, closure = _problem("mse")
    op = GGN(list(model.parameters()), closure)
    B, g, lam, eta = dense_matrix(op), op.grad, 0.3, 1e-2
    result = dense_solve(B, lam, eta, g)
    reference = cg(lambda v: op.mv(v) + (lam + eta) * v, -g, None, max_iters=10 * op.numel, min_iters=0, tol=0.0)
    torch.testing.assert_close(result.x, reference.x, rtol=1e-9, atol=1e-12)
    assert result.stop_reason == "dense" and result.iterations == 0
    assert math.isclose(result.q, reference.q, rel_tol=1e-9)
    # q(δ) is the damped model's minimum: ½ δᵀAδ + gᵀδ at δ = −A⁻¹g
    A = B + (lam + eta) * torch.eye(op.numel, dtype=torch.float64)
    assert math.isclose(result.q, float(0.5 * result.x @ A @ result.x + g @ result.x), rel_tol=1e-10)


def test_a_diagonal_damping_vector_is_added_to_the_diagonal():
    model, closure = _problem("mse")
    op = GGN(list(model.parameters()), closure)
    B, g = dense_matrix(op), op.grad
    d = torch.rand(op.numel, dtype=torch.float64) + 0.1
    x = dense_solve(B, d, 0.0, g).x
    torch.testing.assert_close((B + torch.diag(d)) @ x, -g, rtol=1e-9, atol=1e-12)


def test_an_indefinite_matrix_is_left_to_cg():
    B = torch.diag(torch.tensor([1.0, -2.0, 3.0], dtype=torch.float64))
    assert dense_solve(B, 0.1, 0.0, torch.ones(3, dtype=torch.float64)) is None


def test_an_hf_step_with_the_dense_solve_is_the_gauss_newton_step_of_cg_run_to_convergence():
    """The dense step is the Gauss-Newton one, δ = −(B + εI)⁻¹∇f with ε =
    GAUSS_NEWTON_DAMPING·mean(diag B), no λ: the step of CG run to convergence on B + εI."""
    from torch_hf.dense import GAUSS_NEWTON_DAMPING

    def step(**options):  # 80 residuals, 32 parameters: B + εI is well conditioned enough for CG
        model, closure = _problem("mse", seed=3, cases=40)
        opt = torch_hf.HessianFree(model.parameters(), preconditioner=torch_hf.preconditioners.Identity(),
                                   backtracking_factor=None, line_search_c=None, cg_decay=0.0, **options)
        opt.step(closure)
        return torch.nn.utils.parameters_to_vector(model.parameters()).detach(), opt.last_step

    model, closure = _problem("mse", seed=3, cases=40)
    eps = GAUSS_NEWTON_DAMPING * float(GGN(list(model.parameters()), closure).dense().diagonal().mean())
    x_dense, d_dense = step(solver="dense")
    x_cg, d_cg = step(solver="cg", cg_max_iters=2000, cg_min_iters=2000, cg_tol=0.0,
                      damping=torch_hf.damping.Tikhonov(eps, adapt=None))
    assert d_dense.solver == "dense" and d_cg.solver == "cg"
    # B + εI has a condition number near 1e5 here: CG agrees to about that many digits fewer
    torch.testing.assert_close(x_dense, x_cg, rtol=1e-7, atol=1e-8)
    assert math.isclose(d_dense.rho, d_cg.rho, rel_tol=1e-7)
    assert d_dense.damping_next == d_dense.damping  # the line search globalises it, not λ


def test_a_rejected_gauss_newton_step_hands_the_next_step_to_the_damped_solve(monkeypatch):
    monkeypatch.setattr(torch_hf.optimizer, "GAUSS_NEWTON_LINE_SEARCH", (0.5, 1))  # one try: rejections happen
    monkeypatch.setattr(torch_hf.optimizer, "GAUSS_NEWTON_FALLBACK_ALPHA", 0.0)  # no damped step in the same step
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))

    def closure():  # Rosenbrock's residuals from the classic start: full Gauss-Newton steps fail there
        r = torch.stack([10 * (w[1] - w[0] ** 2), 1 - w[0]])
        return (r ** 2).sum(), r

    opt = torch_hf.HessianFree([w], solver="dense", line_search_max_evals=1)
    modes = []
    for _ in range(15):
        mode = opt.state[w].get("dense_step", "gauss-newton") if opt.state[w] else "gauss-newton"
        lam = opt.damping.value
        opt.step(closure)
        modes.append((mode, opt.last_step.accepted))
        if mode == "gauss-newton":
            assert opt.damping.value == lam  # λ is left alone: the line search globalises the step
        expected = "levenberg-marquardt" if mode == "gauss-newton" and not opt.last_step.accepted else "gauss-newton"
        assert opt.state[w]["dense_step"] == expected
    assert ("gauss-newton", False) in modes and ("levenberg-marquardt", True) in modes
    assert float(closure()[0].detach()) < 1e-10


def test_a_gauss_newton_step_that_needs_a_short_length_is_offered_the_damped_step(monkeypatch):
    """Rosenbrock's residuals from the classic start, where full Gauss-Newton steps fail.
    A Gauss-Newton step whose line search ends below GAUSS_NEWTON_FALLBACK_ALPHA is offered
    the damped step too (λ then follows the damped step's ρ), and the step taken is the
    lower of the two; the run still ends at the minimum."""
    w = nn.Parameter(torch.tensor([-1.2, 1.0], dtype=torch.float64))

    def closure():
        r = torch.stack([10 * (w[1] - w[0] ** 2), 1 - w[0]])
        return (r ** 2).sum(), r

    taken = {}
    for threshold in (0.0, 1.1):  # never offered; always offered
        monkeypatch.setattr(torch_hf.optimizer, "GAUSS_NEWTON_FALLBACK_ALPHA", threshold)
        with torch.no_grad():
            w.copy_(torch.tensor([-1.2, 1.0], dtype=torch.float64))
        opt = torch_hf.HessianFree([w], solver="dense")
        losses, lams = [], []
        for _ in range(12):
            opt.step(closure)
            losses.append(opt.last_step.loss_after if opt.last_step.accepted else opt.last_step.loss_before)
            lams.append(opt.damping.value)
        taken[threshold] = (losses, lams)
        assert float(closure()[0].detach()) < 1e-10
    (never, lam_never), (always, lam_always) = taken[0.0], taken[1.1]
    assert len(set(lam_never)) == 1  # Gauss-Newton steps leave λ alone
    assert len(set(lam_always)) > 1  # the damped step offered each step moves λ with its ρ
    assert always[0] <= never[0]  # the lower of the two steps is taken


def test_the_hessian_falls_back_to_cg_where_it_is_indefinite():
    torch.manual_seed(0)
    w = nn.Parameter(torch.tensor([0.0, 0.0], dtype=torch.float64))

    def closure():  # a saddle at 0: x² − y²·½ + y⁴
        return w[0] ** 2 - 0.5 * w[1] ** 2 + w[1] ** 4 + 0.1 * w[1]

    opt = torch_hf.HessianFree([w], curvature="hessian", solver="dense",
                               damping=torch_hf.damping.Tikhonov(0.1, adapt=None))
    opt.step(closure)
    assert opt.last_step.solver == "cg"


def test_auto_switches_to_the_dense_solve_on_a_small_deterministic_problem_once_cg_costs_more():
    model, closure = _problem("mse", seed=5)
    n = sum(p.numel() for p in model.parameters())
    # jacobian="off": with J read off the graph (two outputs per case) the step would be the
    # residual-space one from the second step on; this is the switch without J.
    opt = torch_hf.HessianFree(model.parameters(), generator=torch.Generator().manual_seed(0), jacobian="off")
    solvers = []
    for _ in range(25):
        opt.step(closure)
        solvers.append(opt.last_step.solver)
    first = solvers.index("dense")
    assert first >= regime.CONFIRMATIONS  # not before the objective is confirmed deterministic
    cg_products = [d.curvature_products for d in opt.history[:first]]
    assert cg_products[-1] >= 0.5 * n  # the switch happened because CG cost more than n/2 products
    assert all(s == "dense" for s in solvers[first:])


def test_auto_never_goes_dense_above_dense_max_params_or_when_asked_for_cg():
    # (jacobian="off": with J, read off the graph, the residual-space step needs no n × n matrix)
    for options in ({"dense_max_params": 10, "jacobian": "off"}, {"solver": "cg"}):
        model, closure = _problem("mse", seed=5)
        opt = torch_hf.HessianFree(model.parameters(), **options)
        for _ in range(15):
            opt.step(closure)
            assert opt.last_step.solver == "cg"


def test_bad_solver_options_are_named():
    p = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ValueError, match="solver"):
        torch_hf.HessianFree(p, solver="cholesky")
    with pytest.raises(ValueError, match="dense_max_params"):
        torch_hf.HessianFree(p, dense_max_params=-1)


def test_the_residual_space_solve_is_the_parameter_space_solve():
    """δ = −Jᵀ(c JJᵀ + sI)⁻¹u equals −(c JᵀJ + sI)⁻¹Jᵀu (push-through), for M < n."""
    from torch_hf.dense import residual_solve

    g = torch.Generator().manual_seed(0)
    J = torch.randn(12, 30, generator=g, dtype=torch.float64)
    u = torch.randn(12, generator=g, dtype=torch.float64)
    grad = J.t() @ u
    for shift in (1e-3, 0.5):
        got = residual_solve(J, 2.0, shift, u, grad)
        want = dense_solve(2.0 * J.t() @ J, shift, 0.0, grad)
        assert got.stop_reason == "dense" and got.iterations == 0
        assert float((got.x - want.x).norm() / want.x.norm()) <= 1e-10
        assert got.q == pytest.approx(want.q, rel=1e-10)
    assert residual_solve(J, 2.0, -1e3, u, grad) is None  # not positive definite


def test_output_hessian_scale_reads_c_of_a_sum_of_squares_and_refuses_the_rest():
    from torch_hf.dense import output_hessian_scale

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    y = torch.randint(0, 3, (10,))
    def closure(loss):
        def run():
            z = model(x)
            return loss(z), z
        return run

    squares = GGN(model.parameters(), lambda: torch_hf.residuals.residual_loss(model(x) - 1.0))
    assert output_hessian_scale(squares) == pytest.approx(2.0, rel=1e-14)
    mean = GGN(model.parameters(), closure(lambda z: F.mse_loss(z, torch.zeros_like(z))))
    assert output_hessian_scale(mean) == pytest.approx(2.0 / 30, rel=1e-14)
    assert output_hessian_scale(GGN(model.parameters(), closure(lambda z: F.cross_entropy(z, y)))) is None


def _pinn_with_jacobian(seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_residuals import _poisson

    return _poisson(seed=seed)


def test_hf_solves_in_residual_space_when_the_closure_gives_its_jacobian():
    model, pde, _ = _pinn_with_jacobian()
    n, m = sum(p.numel() for p in model.parameters()), pde()[1].numel()
    assert m < n
    opt = torch_hf.HessianFree(model.parameters())
    solvers = []
    for _ in range(4):
        opt.step(pde)
        solvers.append(opt.last_step.solver)
    assert solvers[0] == "cg" and solvers[-1] == "residual"  # once the objective is known to be deterministic


@pytest.mark.parametrize("step", ["levenberg-marquardt", "gauss-newton"])
def test_the_residual_space_step_is_the_dense_step(step):
    """The same step solved in residual space (the closure gives J) and in parameter space
    (the same closure without it): to rounding with the damped system (λ = 1); the Gauss-
    Newton step's B + εI is ill-conditioned in parameter space (rank M < n, ε ≈ 1e-9), and
    the two agree to what that allows."""
    runs = {}
    for with_jacobian in (True, False):
        model, pde, _ = _pinn_with_jacobian()
        closure = pde if with_jacobian else (lambda: pde())
        opt = torch_hf.HessianFree(model.parameters(), solver="dense", line_search_c=None)
        opt._state()["dense_step"] = step
        theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt.step(closure)
        moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
        runs[with_jacobian] = (moved, opt.last_step.solver)
    (a, solver_a), (b, solver_b) = runs[True], runs[False]
    assert (solver_a, solver_b) == ("residual", "dense")
    assert float(b.norm()) > 0
    assert float((a - b).norm() / b.norm()) <= (1e-10 if step == "levenberg-marquardt" else 1e-5)


def test_residual_space_is_not_used_where_it_does_not_apply():
    model, pde, _ = _pinn_with_jacobian()
    opt = torch_hf.HessianFree(model.parameters(), weight_decay=1e-4, solver="dense")  # ∇f not in range(Jᵀ)
    opt.step(pde)
    assert opt.last_step.solver == "dense"
    model, pde, _ = _pinn_with_jacobian()
    opt = torch_hf.HessianFree(model.parameters(), solver="cg")
    for _ in range(3):
        opt.step(pde)
        assert opt.last_step.solver == "cg"


def test_a_jacobian_of_the_wrong_shape_is_named():
    model, pde, _ = _pinn_with_jacobian()

    def closure():
        return pde()

    closure.jacobian = lambda params: pde.jacobian(params)[:-1]
    opt = torch_hf.HessianFree(model.parameters(), solver="dense", jacobian="closure")
    with pytest.raises(ValueError, match="jacobian"):
        opt.step(closure)


def test_with_more_residuals_than_parameters_the_jacobian_gives_the_dense_matrix():
    """M ≥ n: B = c JᵀJ from the closure's Jacobian is the forward-column B, so the damped
    dense step is the same with and without it; and the defaults take the dense step as soon
    as the objective is known to be deterministic."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_residuals import _poisson

    model, pde, _ = _poisson(width=4)
    n, m = sum(p.numel() for p in model.parameters()), pde()[1].numel()
    assert m >= n
    ggn = GGN(model.parameters(), pde)
    J = pde.jacobian()
    assert float((2.0 * J.t() @ J - ggn.dense()).abs().max()) <= 1e-12 * float(ggn.dense().abs().max())
    moved = {}
    for with_jacobian in (True, False):
        model, pde, _ = _poisson(width=4)
        opt = torch_hf.HessianFree(model.parameters(), solver="dense", line_search_c=None)
        opt._state()["dense_step"] = "levenberg-marquardt"
        theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt.step(pde if with_jacobian else (lambda: pde()))
        moved[with_jacobian] = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
        assert opt.last_step.solver == "dense"
    assert float((moved[True] - moved[False]).norm() / moved[False].norm()) <= 1e-10
    model, pde, _ = _poisson(width=4)
    opt = torch_hf.HessianFree(model.parameters())
    solvers = []
    for _ in range(3):
        opt.step(pde)
        solvers.append(opt.last_step.solver)
    assert solvers == ["cg", "dense", "dense"]


def test_with_the_jacobian_the_exact_step_is_taken_on_fresh_points_every_step_too():
    """Points drawn afresh each step (a stochastic objective, as the heat benchmark's): with
    the residuals' Jacobian the defaults take the residual-space step from the second step."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_residuals import _poisson

    model, _, _ = _poisson()
    opt = torch_hf.HessianFree(model.parameters())
    solvers, regimes = [], []
    for seed in range(4):
        _, pde, _ = _poisson(seed=seed)
        pde.model = model  # the same network, new points
        opt.step(pde)
        solvers.append(opt.last_step.solver)
        regimes.append(opt.last_step.regime)
    assert solvers == ["cg", "residual", "residual", "residual"]
    assert regimes[-1] == "stochastic"


def _damped_step(opt, model, J, u, lam):
    """The damped step on a stochastic objective, by dense linear algebra: centred at
    δ_c = ζ·δ₍k−1₎, δ = δ_c − Jᵀ(cJJᵀ + λI)⁻¹(u + cJδ_c) (c = 2) where its
    q(δ) = ½c‖Jδ‖² + ½λ‖δ‖² + uᵀJδ is negative, else −Jᵀ(cJJᵀ + λI)⁻¹u; and the centre
    (zero when not centred)."""
    A = 2.0 * J @ J.t() + lam * torch.eye(J.shape[0], dtype=J.dtype)
    center = opt.cg.decay * opt.state[next(model.parameters())]["delta"]
    step = center - J.t() @ torch.linalg.solve(A, u + 2.0 * (J @ center))
    Js = J @ step
    if float(Js @ Js + 0.5 * lam * step @ step + u @ Js) < 0:
        return step, center
    return -(J.t() @ torch.linalg.solve(A, u)), torch.zeros_like(center)


def test_on_fresh_points_the_exact_step_is_damped_by_lambda_and_on_fixed_points_it_is_gauss_newton():
    """Once the objective is known to be stochastic the residual-space step is the
    Levenberg-Marquardt one with its damping centred at δ_c = ζ·δ₍k−1₎,
    δ = δ_c − Jᵀ(cJJᵀ + λI)⁻¹(u + cJδ_c), with λ adapted by ρ; on the same points every
    step it is the Gauss-Newton one (ε, λ left alone)."""
    import sys
    from pathlib import Path

    from torch_hf.dense import GAUSS_NEWTON_DAMPING

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_residuals import _poisson

    for fresh in (True, False):
        model, pde, _ = _poisson()
        opt = torch_hf.HessianFree(model.parameters(), line_search_c=None, backtracking_factor=None)
        lambdas, centred = [], 0
        for seed in range(5):
            if fresh and seed:
                _, pde, _ = _poisson(seed=seed)
                pde.model = model  # the same network, new points
            lam = opt.damping.value
            loss, r = pde()
            J = pde.jacobian()
            u = torch.autograd.grad(loss, r)[0]
            K = 2.0 * J @ J.t()
            shift = lam if fresh and seed >= 2 else GAUSS_NEWTON_DAMPING * float(K.trace()) / J.shape[1]
            expected = -(J.t() @ torch.linalg.solve(K + shift * torch.eye(len(K), dtype=K.dtype), u))
            if fresh and seed >= 2:
                expected, center = _damped_step(opt, model, J, u, shift)
                centred += bool(center.any())
            theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
            opt.step(pde)
            if seed == 0:  # CG, before the regime is known
                continue
            moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
            assert opt.last_step.solver == "residual"
            if fresh and seed == 1:  # the regime turns stochastic on this step's f
                continue
            assert opt.last_step.accepted
            damped = fresh and seed >= 2  # the Gauss-Newton system is ill-conditioned: fewer digits
            assert float((moved - expected).norm() / expected.norm()) <= (1e-10 if damped else 1e-5)
            lambdas.append((lam, opt.damping.value))
        if fresh:
            assert opt.last_step.regime == "stochastic" and any(a != b for a, b in lambdas) and centred >= 2
        else:
            assert opt.last_step.regime == "deterministic" and all(a == b for a, b in lambdas)


def _batched_poisson(seed=0):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_residuals import _poisson

    return _poisson(seed=seed)


def test_a_plain_residual_closure_gets_the_exact_step_once_deterministic():
    """No ``jacobian`` attribute: J is read off the closure's graph
    (torch_hf.curvature.jacobian) once the objective is known to be deterministic, and the
    step is the one the closure's own J gives; ``jacobian="off"`` keeps CG."""
    model, pde, batched = _batched_poisson()
    opt = torch_hf.HessianFree(model.parameters())
    solvers = []
    for _ in range(6):
        opt.step(batched)
        solvers.append(opt.last_step.solver)
    first = solvers.index("residual")
    assert first >= regime.CONFIRMATIONS and all(s == "residual" for s in solvers[first:])
    assert opt._jacobian_buffer is not None  # J came from the graph: the closure has none
    # The same step from the graph's J and from the closure's own J.
    moved = {}
    for source in ("graph", "closure"):
        model, pde, batched = _batched_poisson()

        def closure():
            return batched()

        closure.jacobian = pde.jacobian
        opt = torch_hf.HessianFree(model.parameters(), solver="dense", jacobian=source, line_search_c=None)
        opt._state()["dense_step"] = "levenberg-marquardt"  # the damped step: well conditioned
        theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt.step(closure)
        assert opt.last_step.solver == "residual"
        assert (opt._jacobian_buffer is not None) == (source == "graph")
        moved[source] = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
    assert float((moved["graph"] - moved["closure"]).norm() / moved["closure"].norm()) <= 1e-10
    model, _, batched = _batched_poisson()
    opt = torch_hf.HessianFree(model.parameters(), jacobian="off")
    for _ in range(6):
        opt.step(batched)
        assert opt.last_step.solver == "cg"


def test_jacobian_graph_takes_the_exact_step_on_fresh_points_and_cg_where_the_graph_refuses(caplog):
    from torch_hf.residuals import laplacian, residual_loss

    model, _, _ = _batched_poisson()
    opt = torch_hf.HessianFree(model.parameters(), jacobian="graph")
    solvers = []
    for seed in range(3):  # fresh points every step: a stochastic objective
        g = torch.Generator().manual_seed(seed)
        x, xb = torch.rand(40, 2, generator=g, dtype=torch.float64), torch.rand(10, 2, generator=g, dtype=torch.float64)

        def closure(x=x, xb=xb):
            _, lap = laplacian(model, x)
            return residual_loss(-lap - 1.0, model(xb).squeeze(-1))
        opt.step(closure)
        solvers.append(opt.last_step.solver)
    assert solvers == ["cg", "residual", "residual"]
    opt = torch_hf.HessianFree(model.parameters(), jacobian="graph")

    def mixing():  # the cases interact through the mean: J is not read off the graph
        z = model(x).squeeze(-1)
        return residual_loss(z - z.mean() - 1.0)

    with caplog.at_level("INFO", logger="torch_hf"):
        for _ in range(3):
            opt.step(mixing)
            assert opt.last_step.solver == "cg"
    assert "cannot be read off the closure's graph" in caplog.text
    assert opt._graph_jacobian_failed


def test_bad_jacobian_option_is_named():
    with pytest.raises(ValueError, match="jacobian"):
        torch_hf.HessianFree([nn.Parameter(torch.zeros(2))], jacobian="yes")


def test_gram_by_blocks_is_j_jt():
    from torch_hf.dense import gram

    g = torch.Generator().manual_seed(0)
    for m, n in ((5, 40), (700, 40), (600, 2500), (600, 700)):  # one block (few rows, tall J); blocks, mirrored
        J = torch.randn(m, n, generator=g, dtype=torch.float64)
        K = gram(J)
        assert float((K - K.t()).abs().max()) <= 1e-13 * float(K.abs().max())
        assert float((K - J @ J.t()).abs().max()) <= 1e-12 * float((J @ J.t()).abs().max())


def _decaying_jacobian(m=240, n=600, seed=0):
    """A J whose J Jᵀ has a few large eigenvalues and a long tail, as a PINN's has."""
    g = torch.Generator().manual_seed(seed)
    U = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64)).Q
    V = torch.linalg.qr(torch.randn(n, m, generator=g, dtype=torch.float64)).Q
    sigma = torch.logspace(1, -8, m, dtype=torch.float64)
    return (U * sigma) @ V.t(), torch.randn(m, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("shift", [1e-2, 1e-5])
@pytest.mark.parametrize("rank", [64, 128])
def test_the_sketched_solve_is_the_residual_space_solve(shift, rank):
    """Nyström-preconditioned CG gives residual_solve's step without J Jᵀ, and its q is
    q(δ) = ½ c‖Jδ‖² + ½ s‖δ‖² + ∇fᵀδ evaluated densely."""
    from torch_hf.dense import residual_solve, sketched_residual_solve

    J, u = _decaying_jacobian()
    c, grad = 2.0, J.t() @ u
    exact = residual_solve(J, c, shift, u, grad)
    got = sketched_residual_solve(J, c, shift, u, rank, 200, generator=torch.Generator().manual_seed(1))
    assert got is not None and got.iterations > 0 and got.stop_reason == "dense"
    assert float((got.x - exact.x).norm() / exact.x.norm()) <= 1e-7
    d = got.x
    q = 0.5 * c * float((J @ d).square().sum()) + 0.5 * shift * float(d @ d) + float(grad @ d)
    assert got.q == pytest.approx(q, rel=1e-9)
    assert got.q == pytest.approx(exact.q, rel=1e-7)


def test_the_sketched_solve_gives_up_within_its_budget():
    from torch_hf.dense import sketched_residual_solve

    J, u = _decaying_jacobian()
    assert sketched_residual_solve(J, 2.0, 1e-6, u, 16, 2) is None


def test_the_sketch_rank_follows_the_iterations_it_saves():
    """A sketch that leaves CG many iterations (or too many: the caller then forms J Jᵀ)
    grows; one that leaves it almost none shrinks."""
    from torch_hf.dense import SketchedSolver

    J, u = _decaying_jacobian(m=1600, n=2000)
    assert not SketchedSolver().applies(J) and SketchedSolver(min_outputs=0).applies(J)
    hard = SketchedSolver(rank=16, min_outputs=0)
    hard.solve(J, 2.0, 1e-7, u)
    assert hard.rank == 32
    easy = SketchedSolver(rank=200, min_outputs=0)
    result = easy.solve(J, 2.0, 1e5, u)  # s far above JJᵀ's eigenvalues: CG needs two iterations
    assert result is not None and result.iterations <= 3 and easy.rank == 100


def test_a_second_system_of_the_same_jacobian_reuses_the_sketch(monkeypatch):
    """Two damped systems of one J (another shift, another right-hand side) draw the
    Nyström factor once and both solve to the residual-space step; a J refilled in place
    draws a new one."""
    import torch_hf.dense as dense
    from torch_hf.dense import residual_solve

    drawn = []
    real = dense.nystrom_factor
    monkeypatch.setattr(dense, "nystrom_factor", lambda *a, **k: drawn.append(1) or real(*a, **k))
    J, u = _decaying_jacobian()
    solver = dense.SketchedSolver(rank=64, min_outputs=0)
    for shift, v in ((1e-1, u), (1e-2, u.flip(0))):
        got = solver.solve(J, 2.0, shift, v)
        exact = residual_solve(J, 2.0, shift, v, J.t() @ v)
        assert got is not None and float((got.x - exact.x).norm() / exact.x.norm()) <= 1e-7
    assert len(drawn) == 1
    J.mul_(2.0)
    got = solver.solve(J, 2.0, 1e-1, u)
    exact = residual_solve(J, 2.0, 1e-1, u, J.t() @ u)
    assert len(drawn) == 2 and float((got.x - exact.x).norm() / exact.x.norm()) <= 1e-7


@pytest.mark.parametrize("iterations, settled", [({256: 23, 512: 8}, 256), ({256: 52, 512: 7}, 512)])
def test_the_sketch_rank_settles_on_the_cheaper_of_two(monkeypatch, iterations, settled):
    """Where doubling the rank is proposed at one rank and halving at the other, the rank
    whose recent solves cost less (columns + 14 columns an iteration) is kept, and the other
    retried only once its cost is forgotten (the heat benchmark's 256 / 512 alternation)."""
    import torch_hf.dense as dense
    from torch_hf.cg import CGResult

    def fake(J, c, shift, u, rank, budget, tolerance, generator=None, factor=None):
        k = iterations[rank]
        return CGResult(x=u, q=-1.0, iterations=k, stop_reason="dense", saved=[], q_history=[0.0, -1.0])

    monkeypatch.setattr(dense, "nystrom_factor", lambda J, c, rank, generator: (None, None))
    monkeypatch.setattr(dense, "sketched_residual_solve", fake)
    solver = dense.SketchedSolver(rank=256, min_outputs=0)
    J, u = torch.zeros(2048, 1, dtype=torch.float64), torch.zeros(2048, dtype=torch.float64)
    ranks = []
    for _ in range(20):
        ranks.append(solver.rank)
        J.add_(1.0)  # a new J each step (the optimizer refills one buffer)
        solver.solve(J, 2.0, 1e-6, u)
    other = 512 if settled == 256 else 256
    # The rule alone would alternate (10 of each); the memory retries the other rank once
    # per SKETCH_RANK_MEMORY solves.
    assert ranks.count(other) <= 1 + 20 // (dense.SKETCH_RANK_MEMORY + 1)
    assert ranks[-3:].count(settled) >= 2


def test_on_fresh_points_the_sketched_step_is_the_damped_step():
    """Where the Gram matrix would be the cost (here: forced), the damped residual-space step
    (centred at ζ·δ₍k−1₎) comes from the sketched CG, to the stochastic tolerance (the points
    change every step), with ρ and λ as before."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_residuals import _poisson

    from torch_hf.dense import SKETCH_STOCHASTIC_TOLERANCE

    model, pde, _ = _poisson()
    opt = torch_hf.HessianFree(model.parameters(), line_search_c=None, backtracking_factor=None)
    opt._sketched.min_outputs = 0
    centred = 0
    for seed in range(5):
        if seed:
            _, pde, _ = _poisson(seed=seed)
            pde.model = model
        lam = opt.damping.value
        loss, r = pde()
        J = pde.jacobian()
        u = torch.autograd.grad(loss, r)[0]
        if seed >= 2:
            expected, center = _damped_step(opt, model, J, u, lam)
            centred += bool(center.any())
        theta0 = torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()
        opt.step(pde)
        if seed >= 2:  # the regime is stochastic from the second step's f on
            moved = torch.nn.utils.parameters_to_vector(model.parameters()).detach() - theta0
            assert opt.last_step.regime == "stochastic"
            assert opt.last_step.solver == "residual" and opt.last_step.cg_iterations > 0
            # CG's relative residual bounds the step's error up to the preconditioned system's
            # condition number; q, stationary at the exact step, is off by less
            tolerance = SKETCH_STOCHASTIC_TOLERANCE
            assert float((moved - expected).norm() / expected.norm()) <= 5 * tolerance

            def q(d, c=0.0):  # the damped model, its damping centred at c
                return float((J @ d).square().sum()) + 0.5 * lam * float((d - c) @ (d - c)) + float(u @ (J @ d))

            assert q(moved) == pytest.approx(q(expected), rel=0.1 * tolerance)
            assert q(moved, center) >= q(expected, center)  # its minimum: no step of CG's is below it
    assert centred >= 1


def test_the_centred_step_minimises_the_damping_centred_at_the_previous_step():
    """centred_step: δ = δ_c − Jᵀ(cJJᵀ + sI)⁻¹(u + cJδ_c), the minimiser of
    ½c‖Jδ‖² + uᵀJδ + ½s‖δ − δ_c‖² (its gradient vanishes), q(δ) the damped model at δ; a
    centre that leaves q(δ) ≥ 0 is refused."""
    from torch_hf.dense import centred_step, residual_solve

    J, u = _decaying_jacobian()
    c, s = 2.0, 1e-3
    g = torch.Generator().manual_seed(3)
    center = 1e-2 * torch.randn(J.shape[1], generator=g, dtype=torch.float64)
    got = centred_step(J, c, s, u, center, lambda v: residual_solve(J, c, s, v, J.t() @ v))
    assert got is not None and got.stop_reason == "dense"
    d = got.x
    gradient = c * J.t() @ (J @ d) + J.t() @ u + s * (d - center)
    assert float(gradient.norm()) <= 1e-9 * float((J.t() @ u).norm())
    q = 0.5 * c * float((J @ d).square().sum()) + 0.5 * s * float(d @ d) + float(u @ (J @ d))
    assert got.q == pytest.approx(q, rel=1e-12) and got.saved[-1][2] == got.q
    # A large centre that this batch does not see (outside J's row space) is kept whole and
    # its ½s‖δ_c‖² outweighs the batch's reduction.
    Q = torch.linalg.qr(J.t()).Q
    unseen = torch.randn(J.shape[1], generator=g, dtype=torch.float64)
    uphill = 1e3 * (unseen - Q @ (Q.t() @ unseen))
    assert centred_step(J, c, s, u, uphill, lambda v: residual_solve(J, c, s, v, J.t() @ v)) is None


def test_the_stochastic_tolerance_stops_cg_early_with_q_to_four_digits():
    """On a stochastic objective the sketched CG stops at a relative residual of 1e-2
    (checked against the true residual): fewer iterations than to rounding, the same q to
    a relative 1e-4 and the step to 5e-2 (here 1.8e-5 and 2.6e-3)."""
    from torch_hf.dense import SKETCH_STOCHASTIC_TOLERANCE, residual_solve, sketched_residual_solve

    J, u = _decaying_jacobian()
    c, shift = 2.0, 1e-5
    exact = residual_solve(J, c, shift, u, J.t() @ u)
    precise, loose = (sketched_residual_solve(J, c, shift, u, 64, 200, tolerance,
                                              torch.Generator().manual_seed(1))
                      for tolerance in (1e-9, SKETCH_STOCHASTIC_TOLERANCE))
    assert precise is not None and loose is not None
    assert 0 < loose.iterations < precise.iterations
    w = torch.linalg.lstsq(J.t(), -loose.x.unsqueeze(1)).solution.squeeze(1)  # δ = −Jᵀw
    residual = u - c * (J @ (J.t() @ w)) - shift * w
    assert float(residual.norm() / u.norm()) <= 10 * SKETCH_STOCHASTIC_TOLERANCE
    assert float((loose.x - exact.x).norm() / exact.x.norm()) <= 5 * SKETCH_STOCHASTIC_TOLERANCE
    assert loose.q == pytest.approx(exact.q, rel=1e-2 * SKETCH_STOCHASTIC_TOLERANCE) and loose.q >= exact.q - 1e-12 * abs(exact.q)


def test_the_sketched_solve_converges_in_float32_to_what_float32_resolves():
    """float32 cannot reach a 1e-9 residual: the tolerance is a thousand rounding units there,
    so a float32 PINN gets the sketched step rather than a wasted sketch every step."""
    from torch_hf.dense import sketched_residual_solve

    J, u = _decaying_jacobian()
    exact = sketched_residual_solve(J, 2.0, 1e-2, u, 64, 200, generator=torch.Generator().manual_seed(1))
    got = sketched_residual_solve(J.float(), 2.0, 1e-2, u.float(), 64, 200, generator=torch.Generator().manual_seed(1))
    assert got is not None and got.x.dtype == torch.float32
    assert float((got.x.double() - exact.x).norm() / exact.x.norm()) <= 1e-3


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_sketched_solve_on_cuda_is_the_cpu_step():
    """The column draw takes a CUDA generator; the step is the Cholesky step there too."""
    from torch_hf.dense import SketchedSolver, residual_solve

    J, u = _decaying_jacobian()
    exact = residual_solve(J, 2.0, 1e-3, u, J.t() @ u)
    got = SketchedSolver(rank=64, min_outputs=0).solve(J.cuda(), 2.0, 1e-3, u.cuda())
    assert got is not None and got.x.is_cuda
    assert float((got.x.cpu() - exact.x).norm() / exact.x.norm()) <= 1e-7
