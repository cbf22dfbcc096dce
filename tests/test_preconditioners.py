"""Diagonal preconditioners (§11): estimators against brute force, P = (d + λD + κ)^ξ."""
import copy

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
    _, per_case = ggn.squared_vjp(ggn.output_grads)
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


# -- K-FAC (Martens & Grosse 2015) ---------------------------------------------------
def _kfac_block(pre, layer):
    """The (A ⊗ G) block of ``layer`` over vec([W b]) row-major, as pre stores it."""
    correction = 1 - pre.decay**pre._updates
    return torch.kron(pre._G[layer] / correction, pre._A[layer] / correction)


def _permutation_to_wb(out, inp):
    """Indices mapping row-major vec([W b]) (out × (in+1)) onto the flat (W, b) order."""
    idx = torch.arange(out * (inp + 1)).view(out, inp + 1)
    return torch.cat([idx[:, :inp].reshape(-1), idx[:, inp]])


def test_kfac_factors_are_the_exact_ggn_blocks_for_one_case_and_one_output():
    # one case: Σ_i x̃x̃ᵀ ⊗ δδᵀ has one term, so A ⊗ G is the block exactly; one output
    # with squared error: δ = J_zᵀ S v with v = ±1, deterministic in δδᵀ
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(1, 3, dtype=torch.float64)

    def closure():
        z = model(x)
        return F.mse_loss(z, torch.ones_like(z)), z

    ggn = torch_hf.GGN(model.parameters(), closure)
    pre = torch_hf.preconditioners.KFAC(decay=0.0)
    pre.update(ggn, damping_diagonal=1.0)
    dense = ggn.dense()
    assert pre._layers == [(0, 1), (2, 3)]
    start = 0
    for layer, (out, inp) in enumerate([(4, 3), (1, 4)]):
        n = out * (inp + 1)
        perm = _permutation_to_wb(out, inp)
        block = _kfac_block(pre, layer)[perm][:, perm]
        assert torch.allclose(block, dense[start:start + n, start:start + n], rtol=1e-10, atol=1e-14)
        start += n


@pytest.mark.parametrize("exponent", [1.0, 0.5])
def test_kfac_solve_inverts_the_factored_damped_blocks(exponent):
    model, x, t, loss_fn, closure = _mlp_case("ce")
    ggn = torch_hf.GGN(model.parameters(), closure)
    pre = torch_hf.preconditioners.KFAC(decay=0.0, exponent=exponent, generator=torch.Generator().manual_seed(0))
    lam, wd = 0.3, 0.01
    pre.update(ggn, damping_diagonal=lam, weight_decay=wd)
    gamma = lam + wd
    blocks, start = [], 0
    for layer, (out, inp) in enumerate([(5, 4), (3, 5), (4, 3)]):
        A, G = pre._A[layer], pre._G[layer]
        pi = ((torch.trace(A) / A.shape[0]) / (torch.trace(G) / G.shape[0])).sqrt()

        def power(m, add):
            s, q = torch.linalg.eigh(m + add * torch.eye(m.shape[0], dtype=m.dtype))
            return (q * s.pow(exponent)) @ q.t()

        P = torch.kron(power(G, gamma**0.5 / pi), power(A, pi * gamma**0.5))
        perm = _permutation_to_wb(out, inp)
        blocks.append(P[perm][:, perm])
    P = torch.block_diag(*blocks)
    r = torch.randn(P.shape[0], dtype=torch.float64)
    assert torch.allclose(P @ pre.solve(r), r, rtol=1e-9, atol=1e-11)
    assert torch.allclose(pre.diagonal(), torch.diagonal(P), rtol=1e-10)


def test_kfac_falls_back_to_the_diagonal_outside_linear_layers():
    torch.manual_seed(0)
    shared, head = nn.Linear(4, 4).double(), nn.Linear(4, 2).double()  # shared: applied twice, like a recurrence
    x = torch.randn(5, 4, dtype=torch.float64)

    def closure():
        z = head(torch.tanh(shared(torch.tanh(shared(x)))))
        return F.mse_loss(z, torch.zeros_like(z)), z

    ggn = torch_hf.GGN(list(shared.parameters()) + list(head.parameters()), closure)
    pre = torch_hf.preconditioners.KFAC(decay=0.0, fallback_exponent=1.0)
    pre.update(ggn, damping_diagonal=0.5)
    assert pre._layers == [(2, 3)] and not bool(pre._covered[:20].any()) and bool(pre._covered[20:].all())
    rest = ~pre._covered
    r = torch.randn(pre._covered.numel(), dtype=torch.float64)
    # the diagonal there is (sq(Jᵀ S v) + λ): at least λ, and solve divides by it
    assert bool((pre.diagonal()[rest] >= 0.5).all())
    assert torch.allclose(pre.solve(r)[rest], r[rest] / pre.diagonal()[rest])


def test_kfac_trains_and_resumes_bit_identically():
    torch.manual_seed(0)
    x = torch.randn(64, 6)
    y = torch.randint(0, 3, (64,))

    def make():
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
        pre = torch_hf.preconditioners.KFAC(inverse_every=2, generator=torch.Generator().manual_seed(2))
        opt = torch_hf.HessianFree(model.parameters(), preconditioner=pre, cg_max_iters=10)

        def closure():
            z = model(x)
            return F.cross_entropy(z, y), z
        return model, opt, closure

    model, opt, closure = make()
    first = float(closure()[0].detach())
    for _ in range(5):
        opt.step(closure)
    saved = copy.deepcopy(opt.state_dict())
    for _ in range(4):
        opt.step(closure)
    assert float(closure()[0].detach()) < 0.85 * first
    other, other_opt, other_closure = make()
    for _ in range(5):
        other_opt.step(other_closure)
    other_opt.load_state_dict(saved)
    for _ in range(4):
        other_opt.step(other_closure)
    for p, q in zip(model.parameters(), other.parameters()):
        assert torch.equal(p, q)



def test_kfac_without_a_closed_form_output_factor_is_the_ggn_diagonal(caplog):
    model, x, t, loss_fn, closure = _mlp_case("ce")

    def penalised():  # a sum of losses is not a recognised matching loss: no closed-form S
        z = model(x)
        return F.cross_entropy(z, t) + z.pow(4).mean(), z

    for op in (torch_hf.GGN(model.parameters(), penalised), torch_hf.Hessian(model.parameters(), closure)):
        pre = torch_hf.preconditioners.KFAC(generator=torch.Generator().manual_seed(3))
        diag = GGNDiagonal(0.75, generator=torch.Generator().manual_seed(3))
        with caplog.at_level("INFO", logger="torch_hf"):
            pre.update(op, damping_diagonal=0.2)
        diag.update(op, damping_diagonal=0.2)
        r = torch.randn_like(op.grad)
        assert torch.equal(pre.solve(r), diag.solve(r)) and torch.equal(pre.diagonal(), diag.diagonal())
    assert "GGNDiagonal" in caplog.text


@pytest.mark.parametrize("kwargs, match", [({"decay": 1.0}, "decay"), ({"inverse_every": 0}, "inverse_every"),
                                           ({"exponent": 0.0}, "exponent"), ({"fallback_exponent": 2.0}, "fallback")])
def test_kfac_invalid_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        torch_hf.preconditioners.KFAC(**kwargs)
