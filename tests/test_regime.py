"""Deterministic or stochastic, measured (torch_hf/regime.py), and the defaults that follow."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import torch_hf
from torch_hf import regime


def _fit(model, x):
    def closure():
        z = model(x)
        return F.mse_loss(z, x), z
    return closure


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 4)).double()


def test_a_full_batch_objective_is_called_deterministic_and_cg_runs_to_progress():
    model = _model()
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def closure():
        z = model(x)
        return F.mse_loss(z, x), z

    opt = torch_hf.HessianFree(model.parameters(), solver="cg")
    seen = []
    for _ in range(6):
        opt.step(closure)
        seen.append((opt.last_step.regime, opt.last_step.cg_stop))
    assert seen[0] == ("unknown", "rate")  # nothing to compare with yet
    assert seen[regime.CONFIRMATIONS] == ("deterministic", "progress")
    assert all(s == ("deterministic", "progress") for s in seen[regime.CONFIRMATIONS:])


def test_minibatches_are_called_stochastic_and_cg_keeps_the_rate_rule():
    model = _model()
    x = torch.rand(256, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt = torch_hf.HessianFree(model.parameters())
    seen = []
    for k in range(6):
        xb = x[32 * k:32 * (k + 1)]

        def closure():
            z = model(xb)
            return F.mse_loss(z, xb), z

        opt.step(closure)
        seen.append((opt.last_step.regime, opt.last_step.cg_stop, opt.last_step.solver))
    assert seen[0] == ("unknown", "rate", "cg")
    assert all(s == ("stochastic", "rate", "cg") for s in seen[1:])


def test_one_resampled_batch_makes_the_run_stochastic_for_good():
    model = _model()
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(64, 4, generator=gen, dtype=torch.float64)
    opt = torch_hf.HessianFree(model.parameters())
    regimes = []
    for k in range(8):
        if k == 4:
            x = torch.rand(64, 4, generator=gen, dtype=torch.float64)
        opt.step(_fit(model, x))
        regimes.append(opt.last_step.regime)
    assert regimes[3] == "deterministic" and regimes[4:] == ["stochastic"] * 4


def test_a_rejected_step_still_counts_f_at_the_unchanged_point():
    state = {}
    regime.remember(state, 1.0)  # a rejected step leaves θ₀: f is what it was
    regime.observe(state, 1.0, resolution=1e-15)
    regime.remember(state, 0.5)
    regime.observe(state, 0.5 + 1e-16, resolution=1e-15)  # rounding of another code path
    assert regime.deterministic(state)
    regime.remember(state, 0.4)
    regime.observe(state, 0.41, resolution=1e-15)
    assert regime.describe(state) == "stochastic" and not regime.deterministic(state)


def test_an_unknown_f_after_the_step_is_not_compared():
    state = {}
    regime.remember(state, None)  # lr < 1: the step is not the evaluated trial point
    regime.observe(state, 3.0, resolution=1e-15)
    assert regime.describe(state) == "unknown" and "repeats" not in state


def test_with_lr_below_one_the_regime_stays_unknown_and_the_rule_is_rate():
    model = _model()
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt = torch_hf.HessianFree(model.parameters(), lr=0.5)
    for _ in range(5):
        opt.step(_fit(model, x))
    assert opt.last_step.regime == "unknown" and opt.last_step.cg_stop == "rate"


def test_the_regime_is_saved_with_the_optimizer_state():
    model = _model()
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    closure = _fit(model, x)
    opt = torch_hf.HessianFree(model.parameters(), solver="cg")
    for _ in range(4):
        opt.step(closure)
    saved = opt.state_dict()
    again = torch_hf.HessianFree(model.parameters(), solver="cg")
    again.load_state_dict(saved)
    again.step(closure)
    assert again.last_step.regime == "deterministic" and again.last_step.cg_stop == "progress"


@pytest.mark.parametrize("stop", ["progress", "rate"])
def test_an_explicit_cg_stop_is_kept_whatever_the_regime(stop):
    model = _model()
    x = torch.rand(64, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    opt = torch_hf.HessianFree(model.parameters(), cg_stop=stop, solver="cg")
    for _ in range(4):
        opt.step(_fit(model, x))
        assert opt.last_step.cg_stop == stop
