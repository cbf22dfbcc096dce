"""Damping objects (§8) and the Levenberg-Marquardt rule (§8.5)."""
import math

import pytest
import torch

import torch_hf

from torch_hf.damping import Damping, DampingContext, LevenbergMarquardt, ScaleSensitive, Tikhonov


@pytest.mark.parametrize(
    "rho, factor",
    [(0.9, 2 / 3), (0.76, 2 / 3), (0.75, 1.0), (0.5, 1.0), (0.25, 1.0), (0.24, 3 / 2), (-3.0, 3 / 2),
     (float("nan"), 3 / 2), (-math.inf, 3 / 2), (math.inf, 2 / 3)],
)
def test_levenberg_marquardt_rule_moves_lambda_as_the_paper_says(rho, factor):
    damping = Tikhonov(init=2.0)
    damping.update(rho)
    assert damping.value == pytest.approx(2.0 * factor, rel=1e-15)


def test_levenberg_marquardt_constants_are_arguments_and_clipped():
    rule = LevenbergMarquardt(decrease=0.5, increase=4.0, low=0.1, high=0.9, min_value=0.3, max_value=10.0)
    assert rule(1.0, 0.95) == 0.5
    assert rule(1.0, 0.05) == 4.0
    assert rule(1.0, 0.5) == 1.0
    assert rule(0.4, 0.95) == 0.3
    assert rule(8.0, -1.0) == 10.0


def test_fixed_lambda_when_adapt_is_none():
    damping = Tikhonov(init=3.0, adapt=None)
    damping.update(-10.0)
    assert damping.value == 3.0


def test_custom_adaptation_rule():
    damping = Tikhonov(init=1.0, adapt=lambda lam, rho: lam * 10)
    damping.update(0.5)
    assert damping.value == 10.0


def test_tikhonov_adds_lambda_identity():
    damping = Tikhonov(init=0.7)
    v = torch.randn(5, dtype=torch.float64)
    assert torch.equal(damping.mv(v), v * 0.7)
    assert damping.diagonal() == 0.7


class _FixedEstimator:
    def __init__(self, d):
        self.d = d

    def estimate(self, curvature):
        return self.d


def test_scale_sensitive_damping_uses_the_estimated_diagonal():
    d = torch.tensor([1.0, 4.0, 0.0, 3.0], dtype=torch.float64)
    damping = ScaleSensitive(init=0.5, estimator=_FixedEstimator(d), kappa=0.1)
    damping.prepare(DampingContext(curvature=None, params=[]))
    expected_d = d + 0.1 * d.mean()
    v = torch.randn(4, dtype=torch.float64)
    assert torch.allclose(damping.mv(v), 0.5 * expected_d * v)
    assert torch.allclose(damping.diagonal(), 0.5 * expected_d)


def test_scale_sensitive_damping_before_prepare_raises():
    damping = ScaleSensitive(estimator=_FixedEstimator(torch.ones(2)))
    with pytest.raises(RuntimeError, match="prepare"):
        damping.mv(torch.ones(2))


def test_state_dict_round_trip():
    damping = Tikhonov(init=1.0)
    damping.update(0.1)
    other = Tikhonov(init=5.0)
    other.load_state_dict(damping.state_dict())
    assert other.value == damping.value == 1.5


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), "1"])
def test_invalid_init_raises(bad):
    with pytest.raises(ValueError, match="init"):
        Tikhonov(init=bad)


def test_invalid_rule_constants_raise():
    with pytest.raises(ValueError, match="decrease"):
        LevenbergMarquardt(decrease=1.5)
    with pytest.raises(ValueError, match="increase"):
        LevenbergMarquardt(increase=0.5)
    with pytest.raises(ValueError, match="low"):
        LevenbergMarquardt(low=0.8, high=0.2)
    with pytest.raises(TypeError, match="adapt"):
        Damping(1.0, adapt=3)
    with pytest.raises(ValueError, match="kappa"):
        ScaleSensitive(kappa=-1.0, estimator=_FixedEstimator(torch.ones(2)))


# -- structural damping (§8.4) ---------------------------------------------------------

def _tiny_rnn(units="tanh", T=4, B=3, H=5, D=2, K=3, seed=0):
    """A tanh (or logistic) RNN unrolled over T steps, float64, with its functional form."""
    import torch.nn.functional as F
    from torch.func import functional_call

    torch.manual_seed(seed)
    model = torch.nn.ModuleDict({"inp": torch.nn.Linear(D, H), "rec": torch.nn.Linear(H, H, bias=False),
                                 "out": torch.nn.Linear(H, K)}).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, B, D, generator=gen, dtype=torch.float64)
    y = torch.randint(0, K, (B,), generator=gen)
    act = torch.tanh if units == "tanh" else torch.sigmoid

    def forward(params):
        h = torch.zeros(B, H, dtype=torch.float64)
        states = []
        for t in range(T):
            a = functional_call(model["inp"], {k[4:]: v for k, v in params.items() if k.startswith("inp.")}, (x[t],)) \
                + functional_call(model["rec"], {k[4:]: v for k, v in params.items() if k.startswith("rec.")}, (h,))
            states.append(a if units == "logistic" else act(a))
            h = act(a)
        z = functional_call(model["out"], {k[4:]: v for k, v in params.items() if k.startswith("out.")}, (h,))
        return z, torch.stack(states)

    names = [n for n, _ in model.named_parameters()]
    params = [p for _, p in model.named_parameters()]

    def closure():
        z, hidden = forward(dict(zip(names, params)))
        return F.cross_entropy(z, y), z, hidden

    def flat_forward(theta):
        parts, i = {}, 0
        for n, p in zip(names, params):
            parts[n] = theta[i:i + p.numel()].view_as(p)
            i += p.numel()
        return forward(parts)

    return params, closure, flat_forward, y


@pytest.mark.parametrize("units", ["tanh", "logistic"])
def test_structural_damping_curvature_matches_dense_reference(units):
    import torch.nn.functional as F

    params, closure, flat_forward, y = _tiny_rnn(units)
    theta = torch.cat([p.detach().reshape(-1) for p in params])
    damping = torch_hf.damping.Structural(0.7, mu=0.3, units=units, batch_dim=1)
    op = torch_hf.GGN(params, closure, **damping.curvature_kwargs())
    # Dense reference: Jzᵀ L'' Jz + λμ/N Jhᵀ D Jh.
    z, hidden = flat_forward(theta)
    Jz = torch.autograd.functional.jacobian(lambda t: flat_forward(t)[0], theta).reshape(z.numel(), -1)
    Jh = torch.autograd.functional.jacobian(lambda t: flat_forward(t)[1], theta).reshape(hidden.numel(), -1)
    L = torch.autograd.functional.hessian(lambda zz: F.cross_entropy(zz.view_as(z), y), z.detach().reshape(-1))
    if units == "tanh":
        d = torch.ones(hidden.numel(), dtype=torch.float64)
    else:
        s = torch.sigmoid(hidden.detach()).reshape(-1)
        d = s * (1 - s)
    dense = Jz.T @ L @ Jz + 0.7 * 0.3 / hidden.shape[1] * Jh.T @ (d[:, None] * Jh)
    assert torch.allclose(op.dense(), dense, rtol=1e-10, atol=1e-12)
    # ρ's undamped model removes exactly ½δᵀ(λI + λμ Jhᵀ D Jh / N)δ.
    delta = torch.randn(theta.numel(), dtype=torch.float64)
    struct = 0.7 * 0.3 / hidden.shape[1] * Jh.T @ (d[:, None] * Jh)
    expected = 0.5 * float(delta @ (0.7 * delta + struct @ delta))
    assert damping.model_penalty(delta, op) == pytest.approx(expected, rel=1e-10)


def test_structural_strength_follows_lambda():
    damping = torch_hf.damping.Structural(2.0, mu=0.5)
    u = (torch.ones(2, 3),)
    assert torch.allclose(damping.hidden_hvp(u, u)[0], torch.full((2, 3), 2.0 * 0.5 / 2))
    damping.update(0.9)  # ρ > 3/4: λ·2/3, the structural term with it
    assert damping.value == pytest.approx(4 / 3)
    assert torch.allclose(damping.hidden_hvp(u, u)[0], torch.full((2, 3), 4 / 3 * 0.5 / 2))
    restored = torch_hf.damping.Structural(1.0, mu=0.1)
    restored.load_state_dict(damping.state_dict())
    assert restored.value == damping.value and restored.mu == 0.5


def test_structural_damping_in_the_optimizer():
    params, closure, _, _ = _tiny_rnn("tanh", seed=2)
    opt = torch_hf.HessianFree(params, damping=torch_hf.damping.Structural(1.0, mu=0.5, batch_dim=1),
                               cg_max_iters=20)
    losses = [float(opt.step(closure)) for _ in range(4)]
    assert losses[-1] < losses[0]
    assert math.isfinite(opt.last_step.rho)


def test_structural_damping_needs_hidden_states():
    params, closure, _, _ = _tiny_rnn("tanh")

    def two_tuple():
        loss, z, _ = closure()
        return loss, z

    opt = torch_hf.HessianFree(params, damping=torch_hf.damping.Structural(1.0))
    with pytest.raises(torch_hf.ClosureError, match="hidden_states"):
        opt.step(two_tuple)
    with pytest.raises(ValueError, match="curvature='ggn'"):
        torch_hf.HessianFree(params, curvature="hessian", damping=torch_hf.damping.Structural(1.0)).step(closure)
    with pytest.raises(ValueError, match="units"):
        torch_hf.damping.Structural(1.0, units="relu")
