"""Diagonal preconditioners (§11): estimators against brute force, P = (d + λD + κ)^ξ."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_hf
from torch_hf.preconditioners import EmpiricalFisherDiagonal, GGNDiagonal, Identity
from _cases import make_case


def _mlp_case(loss="bce", seed=0):
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 4)).double()
    x = torch.randn(7, 4, generator=g, dtype=torch.float64)
    t = torch.rand(7, 4, generator=g, dtype=torch.float64)
    if loss == "bce":
        loss_fn = lambda z, t: F.binary_cross_entropy_with_logits(z, t)
    else:
        t = t.argmax(1)
        loss_fn = lambda z, t: F.cross_entropy(z, t)

    def closure():
        z = model(x)
        return loss_fn(z, t), z

    return model, x, t, loss_fn, closure


def _per_case_grads(model, x, t, loss_fn):
    rows = []
    for i in range(x.shape[0]):
        li = loss_fn(model(x[i : i + 1]), t[i : i + 1])
        rows.append(torch.cat([g.reshape(-1) for g in torch.autograd.grad(li, list(model.parameters()))]))
    return torch.stack(rows)


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_empirical_fisher_diagonal_matches_per_case_gradients(loss):
    model, x, t, loss_fn, closure = _mlp_case(loss)
    ggn = torch_hf.GGN(model.parameters(), closure)
    d = EmpiricalFisherDiagonal().estimate(ggn)
    grads = _per_case_grads(model, x, t, loss_fn)  # ∇ℓ_i of the per-case (mean over 1) loss
    expected = grads.square().mean(0)
    assert torch.allclose(d, expected, rtol=1e-10, atol=1e-14)


def test_squared_vjp_is_per_case_for_linear_layers_only():
    case = make_case("rnn_tuple_mse")  # recurrent weight is shared over time: no per-case path
    ggn = torch_hf.GGN(case.params, case.closure)
    _, per_case = ggn.squared_vjp(ggn._grad_z)
    assert not bool(per_case.all())
    with pytest.raises(NotImplementedError, match="GGNDiagonal"):
        EmpiricalFisherDiagonal().estimate(ggn)
    d = EmpiricalFisherDiagonal(allow_batch_fallback=True).estimate(ggn)
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("loss", ["bce", "ce"])
def test_ggn_diagonal_estimator_is_unbiased(loss):
    model, x, t, loss_fn, closure = _mlp_case(loss)
    ggn = torch_hf.GGN(model.parameters(), closure)
    exact = torch.diagonal(ggn.dense())
    est = GGNDiagonal(samples=4000, generator=torch.Generator().manual_seed(0)).estimate(ggn)
    # Rademacher estimator: mean of 4000 samples within a few percent of the exact diagonal
    assert float((est - exact).norm() / exact.norm()) < 0.05


def test_ggn_diagonal_is_exact_for_a_single_case_and_linear_model_with_squared_error():
    # one case, one output: sq(Jᵀ S v) = sq(Jᵀ S) for v = ±1, so every sample is exact
    lin = nn.Linear(3, 1).double()
    x = torch.randn(1, 3, dtype=torch.float64)

    def closure():
        z = lin(x)
        return F.mse_loss(z, torch.zeros_like(z)), z

    ggn = torch_hf.GGN(lin.parameters(), closure)
    est = GGNDiagonal(samples=1).estimate(ggn)
    assert torch.allclose(est, torch.diagonal(ggn.dense()), rtol=1e-12)


def test_ggn_diagonal_falls_back_to_hutchinson_for_other_losses_and_the_hessian():
    case = make_case("mlp_tanh_mse")

    def closure():  # scaled loss: not a recognised matching loss
        z = case.model(case.x)
        return 0.5 * case.loss_fn(z), z

    for op in (torch_hf.GGN(case.params, closure), torch_hf.Hessian(case.params, closure)):
        est = GGNDiagonal(samples=3000, generator=torch.Generator().manual_seed(1)).estimate(op)
        exact = torch.diagonal(op.dense())
        assert float((est - exact).norm() / exact.norm()) < 0.1


def test_preconditioner_is_power_of_damped_diagonal():
    model, x, t, loss_fn, closure = _mlp_case()
    ggn = torch_hf.GGN(model.parameters(), closure)
    pre = EmpiricalFisherDiagonal(exponent=0.75, kappa=0.3)
    pre.update(ggn, damping_diagonal=2.0, weight_decay=0.1)
    d = pre.last_estimate
    expected = (d + 2.0 + 0.1 + 0.3) ** 0.75
    assert torch.allclose(pre.diagonal(), expected)
    r = torch.randn_like(d)
    assert torch.allclose(pre.solve(r), r / expected)


def test_identity_preconditioner():
    pre = Identity()
    r = torch.randn(5)
    assert torch.equal(pre.solve(r), r) and pre.diagonal() is None


def test_zero_diagonal_does_not_make_p_singular():
    pre = EmpiricalFisherDiagonal()
    pre.estimate = lambda op: torch.zeros(3, dtype=torch.float64)
    pre.update(None, damping_diagonal=0.0)
    assert torch.isfinite(pre.solve(torch.ones(3, dtype=torch.float64))).all()


def test_empirical_fisher_needs_ggn():
    case = make_case("mlp_tanh_mse")
    with pytest.raises(TypeError, match="ggn"):
        EmpiricalFisherDiagonal().estimate(torch_hf.Hessian(case.params, case.closure))


def test_solve_before_update_raises():
    with pytest.raises(RuntimeError, match="update"):
        GGNDiagonal().solve(torch.ones(2))


@pytest.mark.parametrize("kwargs, match", [({"exponent": 0.0}, "exponent"), ({"exponent": 1.5}, "exponent"),
                                           ({"kappa": -1.0}, "kappa"), ({"samples": 0}, "samples"),
                                           ({"decay": 1.0}, "decay")])
def test_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GGNDiagonal(**kwargs)


def test_decayed_diagonal_is_the_bias_corrected_moving_average_and_is_saved():
    estimates = iter([torch.tensor([1.0, 4.0]), torch.tensor([3.0, 0.0]), torch.tensor([2.0, 2.0])])
    pre = EmpiricalFisherDiagonal(exponent=1.0, decay=0.5)
    pre.estimate = lambda op: next(estimates)
    pre.update(None, damping_diagonal=0.0)
    assert torch.allclose(pre.last_estimate, torch.tensor([1.0, 4.0]))  # bias-corrected: the first estimate
    pre.update(None, damping_diagonal=0.0)
    # (0.25·[1, 4] + 0.5·[3, 0]) / (1 − 0.25)
    assert torch.allclose(pre.last_estimate, torch.tensor([1.75 / 0.75, 1.0 / 0.75]))
    saved = pre.state_dict()
    other = EmpiricalFisherDiagonal(exponent=1.0, decay=0.5)
    other.load_state_dict(saved)
    other.estimate = lambda op: torch.tensor([2.0, 2.0])
    pre.update(None, damping_diagonal=0.0)
    other.update(None, damping_diagonal=0.0)
    assert torch.equal(pre.last_estimate, other.last_estimate)
