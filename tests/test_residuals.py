"""torch_hf.residuals: the scaling of least-squares closures and the input derivatives of
PINN residuals, checked against dense references in float64."""
import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import torch_hf
from torch_hf.residuals import gradient, laplacian, residual_loss


def _pinn(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    g = torch.Generator().manual_seed(seed)
    inner = torch.rand(17, 2, generator=g, dtype=torch.float64)
    edge = torch.rand(6, 2, generator=g, dtype=torch.float64).round()
    f = torch.sin(math.pi * inner[:, 0])
    return model, inner, edge, f


def test_residual_loss_is_the_weighted_sum_of_mean_squares():
    a = torch.randn(7, 3, dtype=torch.float64)
    b = torch.randn(5, dtype=torch.float64)
    loss, r = residual_loss(a, b, weights=[2.0, 0.5])
    assert r.shape == (26,)
    assert torch.allclose(loss, 2.0 * a.square().mean() + 0.5 * b.square().mean(), rtol=1e-14)
    assert torch.allclose(loss, r.square().sum(), rtol=1e-14)


def test_the_ggn_of_a_residual_closure_is_the_dense_gauss_newton_matrix_of_its_loss():
    model, inner, edge, f = _pinn()
    weights = [1.0, 10.0]

    def terms(m):
        _, lap = laplacian(m, inner)
        return -lap - f, m(edge).squeeze(-1)

    def closure():
        return residual_loss(*terms(model), weights=weights)

    params = list(model.parameters())
    names = [n for n, _ in model.named_parameters()]
    theta = torch.nn.utils.parameters_to_vector(params).detach()

    def term_of(k):
        def fn(flat):
            views, i = {}, 0
            for name, p in zip(names, params):
                views[name] = flat[i:i + p.numel()].view_as(p)
                i += p.numel()
            return terms(lambda x: functional_call(model, views, (x,)))[k]
        return fn

    # L = Σ_k w_k mean(r_k²)  ⇒  Gauss-Newton matrix G = Σ_k (2 w_k / N_k) J_kᵀ J_k
    dense = sum(2 * w / term_of(k)(theta).numel() * (J.T @ J) for k, w in enumerate(weights)
                for J in [torch.autograd.functional.jacobian(term_of(k), theta)])
    ggn = torch_hf.GGN(params, closure).dense()
    assert torch.allclose(ggn, dense, rtol=1e-10, atol=1e-12)
    assert torch_hf.GGN(params, closure).matching_loss is not None  # L'' = 2I in closed form


def test_laplacian_and_gradient_of_a_known_function():
    x = torch.rand(9, 3, dtype=torch.float64)
    u, lap = laplacian(lambda p: torch.sin(p[:, 0]) + p[:, 1] ** 2 * p[:, 2], x)
    assert torch.allclose(lap, -torch.sin(x[:, 0]) + 2 * x[:, 2], rtol=1e-14)
    xg = x.clone().requires_grad_(True)
    du = gradient((xg ** 2).sum(1), xg)
    assert torch.allclose(du, 2 * x, rtol=1e-14)


def test_mistakes_are_named():
    with pytest.raises(ValueError, match="at least one"):
        residual_loss()
    with pytest.raises(ValueError, match="2 terms but 1 weights"):
        residual_loss(torch.ones(2), torch.ones(3), weights=[1.0])
    with pytest.raises(ValueError, match="weight 0"):
        residual_loss(torch.ones(2), weights=[0.0])
    with pytest.raises(ValueError, match="require grad"):
        gradient(torch.ones(3), torch.ones(3, 2))


def _poisson(width=16, n_int=60, n_bnd=24, seed=0):
    from torch_hf.residuals import PointwiseResiduals, laplacian_at

    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                          nn.Linear(width, 1)).double()
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.rand(n_int, 2, generator=g, dtype=torch.float64)
    f = 2 * math.pi**2 * torch.sin(math.pi * x[:, 0]) * torch.sin(math.pi * x[:, 1])
    t = torch.rand(n_bnd // 2, generator=g, dtype=torch.float64)
    xb = torch.cat([torch.stack([t, t.round()], 1), torch.stack([t.round(), t], 1)])
    gb = torch.zeros(len(xb), dtype=torch.float64)
    pde = PointwiseResiduals(model, [(lambda u, p, fi: -laplacian_at(u, p) - fi, x, f),
                                     (lambda u, p, gi: u(p) - gi, xb, gb)], weights=[1.0, 4.0])

    def batched():
        _, lap = laplacian(model, x)
        return residual_loss(-lap - f, model(xb).squeeze(-1) - gb, weights=[1.0, 4.0])

    return model, pde, batched


def test_pointwise_residuals_are_the_batched_closure_and_their_jacobian_its_jvp():
    model, pde, batched = _poisson()
    (loss, r), (loss_ref, r_ref) = pde(), batched()
    assert torch.allclose(r, r_ref, rtol=0, atol=1e-13) and abs(float(loss - loss_ref)) <= 1e-13
    J = pde.jacobian()
    ggn = torch_hf.GGN(model.parameters(), pde)
    assert J.shape == (len(r), ggn.numel)
    for seed in range(3):
        v = torch.randn(ggn.numel, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        assert float((J @ v - ggn.jvp(v)[0]).abs().max()) <= 1e-12 * float(J.abs().max() * v.abs().max())
    # A subset of the parameters: their columns, in the order given.
    params = list(model.parameters())
    part = pde.jacobian([params[2], params[0]])
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    assert torch.equal(part, torch.cat([J[:, offsets[2]:offsets[3]], J[:, offsets[0]:offsets[1]]], dim=1))


def test_pointwise_residuals_name_their_mistakes():
    from torch_hf.residuals import PointwiseResiduals

    model = nn.Linear(2, 1).double()
    x = torch.rand(5, 2, dtype=torch.float64)
    with pytest.raises(TypeError, match="model"):
        PointwiseResiduals(lambda x: x, [(lambda u, p: u(p), x)])
    with pytest.raises(ValueError, match="at least one term"):
        PointwiseResiduals(model, [])
    with pytest.raises(ValueError, match="one row per point"):
        PointwiseResiduals(model, [(lambda u, p, d: u(p) - d, x, torch.zeros(4, dtype=torch.float64))])
    with pytest.raises(ValueError, match="weights"):
        PointwiseResiduals(model, [(lambda u, p: u(p), x)], weights=[1.0, 2.0])
    with pytest.raises(ValueError, match="not the model's"):
        PointwiseResiduals(model, [(lambda u, p: u(p), x)]).jacobian([torch.zeros(3, requires_grad=True)])
