"""GGN and Hessian operators: exactness against dense references, activation caching, bad closures."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_hf
from torch_hf import ClosureError, NonFiniteLossError
from _cases import ALL_CASES, make_case


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", ALL_CASES)
def test_ggn_matches_dense_reference(name):
    case = make_case(name)
    ggn = torch_hf.GGN(case.params, case.closure)
    assert rel(ggn.dense(), case.dense_ggn()) <= 1e-8


@pytest.mark.parametrize("name", ALL_CASES)
def test_hessian_matches_dense_reference(name):
    case = make_case(name)
    hess = torch_hf.Hessian(case.params, case.closure)
    assert rel(hess.dense(), case.dense_hessian()) <= 1e-8


@pytest.mark.parametrize("name", ALL_CASES)
def test_ggn_factors_match_dense_jacobian_and_loss_hessian(name):
    case = make_case(name)
    ggn = torch_hf.GGN(case.params, case.closure)
    jac, lh = case.dense_jacobian(), case.dense_loss_hessian()
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(ggn.numel, generator=gen, dtype=torch.float64)
    u = [torch.randn(o.shape, generator=gen, dtype=torch.float64) for o in ggn.outputs]
    u_flat = torch.cat([t.reshape(-1) for t in u])
    assert rel(torch.cat([t.reshape(-1) for t in ggn.jvp(v)]), jac @ v) <= 1e-10
    assert rel(ggn.vjp(u), jac.T @ u_flat) <= 1e-10
    assert rel(torch.cat([t.reshape(-1) for t in ggn.loss_hvp(u)]), lh @ u_flat) <= 1e-10


@pytest.mark.parametrize("name", ALL_CASES)
def test_gradient_and_loss_are_those_of_the_closure(name):
    case = make_case(name)
    loss, _ = case.closure()
    expected = torch.autograd.grad(loss, case.params)
    for op in (torch_hf.GGN(case.params, case.closure), torch_hf.Hessian(case.params, case.closure)):
        assert torch.allclose(op.grad, torch.cat([g.reshape(-1) for g in expected]), rtol=1e-12, atol=1e-14)
        assert float(op.loss) == pytest.approx(float(loss.detach()), rel=1e-14)


def _count_forwards(model):
    calls = {"n": 0}

    def hook(*_):
        calls["n"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules()]
    return calls, handles


@pytest.mark.parametrize("name", ["mlp_sigmoid_bce", "rnn_tuple_mse", "conv_ce"])
def test_products_reuse_cached_activations_without_forward_passes(name):
    case = make_case(name)
    calls, handles = _count_forwards(case.model)
    ggn = torch_hf.GGN(case.params, case.closure)
    hess = torch_hf.Hessian(case.params, case.closure)
    after_build = calls["n"]
    assert after_build > 0
    v = torch.randn(ggn.numel, dtype=torch.float64)
    for _ in range(5):
        ggn.mv(v)
        ggn.jvp(v)
        ggn.vjp(ggn.outputs)
        hess.mv(v)
    assert calls["n"] == after_build  # not one forward pass during 20 products
    for h in handles:
        h.remove()


def test_closure_is_evaluated_exactly_once_per_operator():
    case = make_case("mlp_tanh_mse")
    count = {"n": 0}

    def closure():
        count["n"] += 1
        return case.closure()

    ggn = torch_hf.GGN(case.params, closure)
    ggn.mv(torch.ones(ggn.numel, dtype=torch.float64))
    assert count["n"] == 1


def test_ggn_is_symmetric_positive_semidefinite():
    case = make_case("mlp_sigmoid_bce")
    g = torch_hf.GGN(case.params, case.closure).dense()
    assert torch.allclose(g, g.T, atol=1e-12)
    assert float(torch.linalg.eigvalsh(g).min()) >= -1e-12


def test_hessian_accepts_closure_returning_only_the_loss():
    case = make_case("mlp_tanh_mse")
    hess = torch_hf.Hessian(case.params, lambda: case.closure()[0])
    assert rel(hess.dense(), case.dense_hessian()) <= 1e-8
    assert hess.outputs == ()
    with_outputs = torch_hf.Hessian(case.params, case.closure)  # outputs kept for batch sizes, detached
    assert [o.shape for o in with_outputs.outputs] == [o.shape for o in case.closure()[1:2]]
    assert not any(o.requires_grad for o in with_outputs.outputs)


def test_declared_loss_hvp_is_used():
    case = make_case("mlp_tanh_mse")  # mean squared error over 5x2 outputs: L'' = (2/10) I
    ggn = torch_hf.GGN(case.params, case.closure, loss_hvp=lambda u: u * 0.2)
    assert ggn.matching_loss is None
    assert rel(ggn.dense(), case.dense_ggn()) <= 1e-12


def test_parameters_without_requires_grad_are_skipped():
    case = make_case("mlp_tanh_mse")
    case.model[0].bias.requires_grad_(False)
    ggn = torch_hf.GGN(case.model.parameters(), case.closure)
    assert ggn.numel == sum(p.numel() for p in case.model.parameters() if p.requires_grad)


def test_unused_parameter_gets_zero_rows():
    case = make_case("mlp_tanh_mse")
    extra = nn.Parameter(torch.randn(3, dtype=torch.float64))
    ggn = torch_hf.GGN(case.params + [extra], case.closure)
    g = ggn.dense()
    assert torch.all(g[-3:] == 0) and torch.all(g[:, -3:] == 0)
    assert torch.all(ggn.grad[-3:] == 0)


# -- bad closures ---------------------------------------------------------------

@pytest.fixture
def mlp():
    return make_case("mlp_tanh_mse")


def test_closure_returning_wrong_type_raises(mlp):
    with pytest.raises(ClosureError, match="must return"):
        torch_hf.GGN(mlp.params, lambda: "loss")
    with pytest.raises(ClosureError, match="must return"):
        torch_hf.GGN(mlp.params, lambda: (1, 2, 3))
    with pytest.raises(ClosureError, match="must be a tensor"):
        torch_hf.GGN(mlp.params, lambda: (1.0, mlp.model(mlp.x)))


def test_non_scalar_loss_raises(mlp):
    with pytest.raises(ClosureError, match="scalar"):
        torch_hf.GGN(mlp.params, lambda: (mlp.model(mlp.x) ** 2, mlp.model(mlp.x)))


def test_a_closure_returning_outputs_then_loss_is_told_to_swap_them(mlp):
    def swapped():
        z = mlp.model(mlp.x)
        return z, mlp.loss_fn(z)

    with pytest.raises(ClosureError, match=r"seems to return \(outputs, loss\); return \(loss, outputs\)"):
        torch_hf.GGN(mlp.params, swapped)
    with pytest.raises(ClosureError) as not_swapped:  # a non-scalar loss with non-scalar outputs: no such hint
        torch_hf.GGN(mlp.params, lambda: (mlp.model(mlp.x) ** 2, mlp.model(mlp.x)))
    assert "seems to return" not in str(not_swapped.value)


def test_outputs_not_depending_on_parameters_raise(mlp):
    def closure():
        z = mlp.model(mlp.x)
        return F.mse_loss(z, torch.zeros_like(z)), mlp.x.clone()

    with pytest.raises(ClosureError, match="does not depend on the parameters|other than through"):
        torch_hf.GGN(mlp.params, closure)


def test_non_finite_loss_raises(mlp):
    def closure():
        z = mlp.model(mlp.x)
        return F.mse_loss(z, z.detach()) * float("nan"), z

    with pytest.raises(NonFiniteLossError):
        torch_hf.GGN(mlp.params, closure)
    with pytest.raises(NonFiniteLossError):
        torch_hf.Hessian(mlp.params, closure)


def test_output_computed_from_another_output_raises(mlp):
    def closure():
        z = mlp.model(mlp.x)
        s = torch.softmax(z, dim=1)
        return (z ** 2).sum() + (s ** 2).sum(), (z, s)

    with pytest.raises(ClosureError, match="used to compute another output"):
        torch_hf.GGN(mlp.params, closure)


def test_same_output_twice_raises(mlp):
    def closure():
        z = mlp.model(mlp.x)
        return (z ** 2).sum(), (z, z)

    with pytest.raises(ClosureError, match="same tensor"):
        torch_hf.GGN(mlp.params, closure)


def test_independent_outputs_from_one_split_are_accepted(mlp):
    def closure():
        a, b = mlp.model(mlp.x).split(1, dim=1)
        return (a ** 2).sum() + (b ** 3).sum(), (a, b)

    torch_hf.GGN(mlp.params, closure)  # no error: split parts are distinct coordinates


def test_loss_with_parameter_penalty_raises(mlp):
    def closure():
        z = mlp.model(mlp.x)
        return F.mse_loss(z, torch.zeros_like(z)) + sum((p ** 2).sum() for p in mlp.params), z

    with pytest.raises(ClosureError, match="weight_decay"):
        torch_hf.GGN(mlp.params, closure)


def test_ggn_needs_outputs(mlp):
    with pytest.raises(ClosureError, match="outputs"):
        torch_hf.GGN(mlp.params, lambda: mlp.closure()[0])


def test_wrong_vector_shape_raises(mlp):
    ggn = torch_hf.GGN(mlp.params, mlp.closure)
    with pytest.raises(ValueError, match="flat vector"):
        ggn.mv(torch.ones(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="outputs' shapes"):
        ggn.vjp(torch.ones(3, dtype=torch.float64))


def test_bad_params_raise(mlp):
    with pytest.raises(TypeError):
        torch_hf.GGN(mlp.params[0], mlp.closure)
    with pytest.raises(ValueError, match="requires grad"):
        torch_hf.GGN([torch.zeros(3)], mlp.closure)


def test_ggn_matches_dense_reference_for_residuals_built_from_input_derivatives():
    # A PINN: the outputs are Δu + f, computed with autograd.grad w.r.t. the inputs inside the closure.
    from _cases import PoissonResiduals

    case = PoissonResiduals()
    ggn = torch_hf.GGN(case.params, case.closure)
    reference = case.dense_ggn()
    assert reference.norm() > 0
    assert rel(ggn.dense(), reference) <= 1e-8
    assert ggn.matching_loss is None or ggn.matching_loss.name == "squared_error"


def test_standard_pytorch_closure_gets_the_contract_in_the_error():
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    opt = torch_hf.HessianFree(model.parameters())

    def standard_closure():
        opt.zero_grad()
        loss = F.mse_loss(model(x), y)
        loss.backward()
        return loss

    with pytest.raises(ClosureError, match=r"(?s)called backward\(\).*return loss_fn\(outputs, y\), outputs"):
        opt.step(standard_closure)

    def loss_only():
        return F.mse_loss(model(x), y)

    with pytest.raises(ClosureError, match=r"(?s)returned only the loss.*return loss_fn\(outputs, y\), outputs"):
        opt.step(loss_only)
    assert all(p.grad is not None for p in model.parameters())  # only the user's own backward() wrote them


# -- the outputs' Jacobian read off the graph (torch_hf.curvature.jacobian) -----------------

def _reference_jacobian(model, fn):
    """∂fn(θ)/∂θ by torch.autograd.functional on the flat parameters (dense, float64)."""
    from torch.func import functional_call

    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach()

    def of_flat(flat):
        views, i = {}, 0
        for name, p in zip(names, params):
            views[name] = flat[i:i + p.numel()].view_as(p)
            i += p.numel()
        return fn(lambda x: functional_call(model, views, (x,)))

    return torch.autograd.functional.jacobian(of_flat, theta)


@pytest.mark.parametrize("chunk", [None, 1, 40])
def test_graph_jacobian_of_a_pinn_closure_is_the_dense_jacobian(chunk, monkeypatch):
    """A weight used in the Laplacian's several passes (create_graph) and a residual vector
    made of two terms: J read off the graph equals the dense Jacobian to rounding, whether
    its rows are assembled in one chunk, one row at a time or in chunks that do not divide
    the rows (``chunk``: the entries formed at once)."""
    import math

    import torch_hf.curvature.jacobian as jacobian
    from torch_hf.curvature.jacobian import graph_jacobian
    from torch_hf.residuals import laplacian, residual_loss

    if chunk is not None:
        monkeypatch.setattr(jacobian, "_CHUNK_ENTRIES", chunk)

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(1)
    x, xb = torch.rand(13, 2, generator=g, dtype=torch.float64), torch.rand(7, 2, generator=g, dtype=torch.float64)
    f = torch.sin(math.pi * x[:, 0])

    def residuals(m):
        _, lap = laplacian(m, x)
        return residual_loss(-lap - f, m(xb).squeeze(-1), weights=[1.0, 3.0])[1]

    J = graph_jacobian(residuals(model), list(model.parameters()))
    want = _reference_jacobian(model, residuals)
    assert J is not None and J.shape == want.shape == (20, sum(p.numel() for p in model.parameters()))
    assert float((J - want).abs().max()) <= 1e-12 * float(want.abs().max())


def _schrodinger(model, x, xp):
    """A system of two equations at each point, h = u + iv of the nonlinear Schrödinger
    equation i h_t + ½ h_xx + |h|² h = 0, and periodic boundary residuals that couple the
    points (t, −5) and (t, 5): several outputs per case, each row of x reaching two."""
    from torch_hf.residuals import gradient

    x = x.detach().requires_grad_(True)
    h = model(x)
    u, v = h[:, 0], h[:, 1]
    du, dv = gradient(u, x), gradient(v, x)
    uxx, vxx = gradient(du[:, 1], x)[:, 1], gradient(dv[:, 1], x)[:, 1]
    sq = u ** 2 + v ** 2
    left, right = model(xp), model(xp + torch.tensor([0.0, 10.0], dtype=xp.dtype))
    return du[:, 0] + 0.5 * vxx + sq * v, dv[:, 0] - 0.5 * uxx - sq * u, left - right


def test_graph_jacobian_of_a_system_of_equations_is_the_dense_jacobian():
    """Two equations at each point (several outputs per case): J is read term by term and,
    within a term of shape (N, 2), component by component, and equals the dense Jacobian;
    the same outputs stacked as one (N, 2) tensor too."""
    from torch_hf.curvature.jacobian import graph_jacobian
    from torch_hf.residuals import residual_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 6), nn.Tanh(), nn.Linear(6, 2)).double()
    g = torch.Generator().manual_seed(1)
    x = torch.rand(11, 2, generator=g, dtype=torch.float64) * torch.tensor([1.0, 10.0]) - torch.tensor([0.0, 5.0])
    xp = torch.stack([torch.rand(5, generator=g, dtype=torch.float64), torch.full((5,), -5.0, dtype=torch.float64)], 1)
    params = list(model.parameters())
    for stacked in (False, True):
        def residuals(m):
            ru, rv, periodic = _schrodinger(m, x, xp)
            terms = (torch.stack([ru, rv], 1), periodic) if stacked else (ru, rv, periodic)
            return residual_loss(*terms)[1]

        J = graph_jacobian(residuals(model), params)
        want = _reference_jacobian(model, residuals)
        assert J is not None and J.shape == want.shape == (32, sum(p.numel() for p in params))
        assert float((J - want).abs().max()) <= 1e-12 * float(want.abs().max())
    # Each row of x reaches two outputs of one term (point i's u and point 10 − i's v):
    # no colouring separates them, and J is refused.
    ru, rv, _ = _schrodinger(model, x, xp)
    assert graph_jacobian(ru + rv.flip(0), params) is None
    # A wide vector output: more colours than reading J pays for (CG instead).
    from torch_hf.curvature.jacobian import MAX_COLORS

    wide = nn.Linear(2, MAX_COLORS + 1).double()
    assert graph_jacobian(torch.tanh(wide(x)), list(wide.parameters())) is None
    narrow = nn.Linear(2, MAX_COLORS).double()
    assert graph_jacobian(torch.tanh(narrow(x)), list(narrow.parameters())) is not None


@pytest.mark.parametrize("chunk", [None, 40])
def test_graph_jacobian_of_vmapped_pointwise_residuals_is_their_jacobian(chunk, monkeypatch):
    """Several rows per case (vmap's tangents), added by the case map, in one chunk or several."""
    import torch_hf.curvature.jacobian as jacobian
    from torch_hf.curvature.jacobian import graph_jacobian

    from test_residuals import _poisson

    if chunk is not None:
        monkeypatch.setattr(jacobian, "_CHUNK_ENTRIES", chunk)

    model, pde, _ = _poisson(width=8, n_int=20, n_bnd=8)
    J = graph_jacobian(pde()[1], list(model.parameters()))
    want = pde.jacobian()
    assert J is not None and float((J - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_graph_jacobian_refuses_graphs_that_are_not_case_by_case():
    """Cases that interact (an output minus the batch mean), and a weight used otherwise than
    in a matrix product (an elementwise scale): ``None``, never a wrong J."""
    from torch_hf.curvature.jacobian import graph_jacobian

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(9, 3, dtype=torch.float64)
    params = list(model.parameters())
    z = model(x).squeeze(-1)
    assert graph_jacobian(z - z.mean(), params) is None
    scale = nn.Parameter(torch.ones(4, dtype=torch.float64))
    hidden = torch.tanh(model[0](x)) * scale
    assert graph_jacobian(model[2](hidden).squeeze(-1), params + [scale]) is None
    assert graph_jacobian(model(x).squeeze(-1), params, max_entries=10) is None  # too large
    J = graph_jacobian(model(x).squeeze(-1), params)  # the plain case is read
    want = _reference_jacobian(model, lambda m: m(x).squeeze(-1))
    assert J is not None and float((J - want).abs().max()) <= 1e-12 * float(want.abs().max())


def test_graph_jacobian_in_float32_matches_float64():
    from torch_hf.curvature.jacobian import graph_jacobian
    from torch_hf.residuals import laplacian, residual_loss

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))
    x = torch.rand(300, 2, generator=torch.Generator().manual_seed(1))
    Js = {}
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        _, lap = laplacian(model, x.to(dtype))
        r = residual_loss(lap, model(x.to(dtype)[:40]).squeeze(-1))[1]
        Js[dtype] = graph_jacobian(r, list(model.parameters()))
    assert Js[torch.float32] is not None and Js[torch.float32].dtype == torch.float32
    want = Js[torch.float64]
    assert float((Js[torch.float32].double() - want).abs().max()) <= 1e-4 * float(want.abs().max())
