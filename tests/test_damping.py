"""Damping objects (§8) and the Levenberg-Marquardt rule (§8.5)."""
import math

import pytest
import torch

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
