"""The §7.2 verification utilities: pass on correct products, fail on wrong ones."""
import pytest
import torch

import torch_hf
from torch_hf.testing import VerificationError, check_ggn, check_hessian
from _cases import ALL_CASES, make_case


@pytest.mark.parametrize("name", ALL_CASES)
def test_ggn_agrees_with_finite_differences(name):
    case = make_case(name)
    report = check_ggn(case.params, case.closure, loss_fn=case.loss_fn, rtol=1e-6)
    assert set(report.errors) == {"jvp", "vjp", "loss_hvp", "ggn_mv", "dense_ggn"}
    assert report.max_error <= 1e-6


@pytest.mark.parametrize("name", ALL_CASES)
def test_hessian_agrees_with_finite_differences(name):
    case = make_case(name)
    report = check_hessian(case.params, case.closure, rtol=1e-6)
    assert report.max_error <= 1e-6


def test_check_without_loss_fn_skips_loss_checks():
    case = make_case("mlp_tanh_mse")
    report = check_ggn(case.params, case.closure)
    assert set(report.errors) == {"jvp", "vjp"}


def test_wrong_loss_hessian_is_caught(monkeypatch):
    case = make_case("mlp_sigmoid_bce")
    original = torch_hf.GGN.loss_hvp
    monkeypatch.setattr(torch_hf.GGN, "loss_hvp", lambda self, u: tuple(2 * t for t in original(self, u)))
    with pytest.raises(VerificationError, match="loss_hvp"):
        check_ggn(case.params, case.closure, loss_fn=case.loss_fn)


def test_wrong_jacobian_product_is_caught(monkeypatch):
    case = make_case("mlp_tanh_ce")
    original = torch_hf.GGN.jvp
    monkeypatch.setattr(torch_hf.GGN, "jvp", lambda self, v: tuple(t * 1.001 for t in original(self, v)))
    report = check_ggn(case.params, case.closure, loss_fn=case.loss_fn, raise_on_failure=False)
    assert report.errors["jvp"] > 1e-4


def test_parameters_are_restored_exactly():
    case = make_case("conv_ce")
    before = [p.detach().clone() for p in case.params]
    check_ggn(case.params, case.closure, loss_fn=case.loss_fn)
    check_hessian(case.params, case.closure)
    assert all(torch.equal(a, b) for a, b in zip(before, case.params))


def test_report_prints_errors():
    case = make_case("mlp_tanh_mse")
    text = str(check_ggn(case.params, case.closure, loss_fn=case.loss_fn))
    assert "dense_ggn" in text and "rtol" in text
