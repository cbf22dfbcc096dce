"""Closed-form L'' of the matching losses (Table 2) against autograd."""
import pytest
import torch
import torch.nn.functional as F

from torch_hf.losses import recognize


def _autograd_loss_hessian(loss_fn, z):
    return torch.autograd.functional.hessian(lambda y: loss_fn(y.view_as(z)), z.detach().reshape(-1))


CASES = {
    "squared_error_mean": (lambda t: (lambda z: F.mse_loss(z, t)), "squared_error"),
    "squared_error_sum": (lambda t: (lambda z: F.mse_loss(z, t, reduction="sum")), "squared_error"),
    "bce_mean": (lambda t: (lambda z: F.binary_cross_entropy_with_logits(z, t.sigmoid())), "binary_cross_entropy"),
    "bce_sum": (lambda t: (lambda z: F.binary_cross_entropy_with_logits(z, t.sigmoid(), reduction="sum")),
                "binary_cross_entropy"),
    "ce_mean": (lambda t: (lambda z: F.cross_entropy(z, t.argmax(1))), "cross_entropy"),
    "ce_sum": (lambda t: (lambda z: F.cross_entropy(z, t.argmax(1), reduction="sum")), "cross_entropy"),
    "bce_sum_per_case": (lambda t: (lambda z: F.binary_cross_entropy_with_logits(z, t.sigmoid(), reduction="sum")
                                    / z.shape[0]), "binary_cross_entropy"),
    "mse_times_half": (lambda t: (lambda z: 0.5 * F.mse_loss(z, t)), "squared_error"),
    "ce_times_tensor": (lambda t: (lambda z: torch.tensor(3.0, dtype=torch.float64) * F.cross_entropy(z, t.argmax(1))),
                        "cross_entropy"),
    "ce_ignore_index": (lambda t: (lambda z: F.cross_entropy(z, torch.tensor([0, -100, 2, 1, -100]))),
                        "cross_entropy"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_closed_form_matches_autograd_hessian(case):
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    z = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    make, expected_name = CASES[case]
    loss_fn = make(t)
    y = z * 1.0  # a non-leaf output, as a network would produce
    matching = recognize(loss_fn(y), y)
    assert matching is not None and matching.name == expected_name
    dense = _autograd_loss_hessian(loss_fn, z)
    eye = torch.eye(z.numel(), dtype=torch.float64)
    closed = torch.stack([matching.hvp(e.view_as(z)).reshape(-1) for e in eye], 1)
    assert torch.allclose(closed, dense, rtol=1e-12, atol=1e-14)
    # the factor S with S Sᵀ = L'' (used by the §11.4 diagonal estimator)
    root = torch.stack([matching.sqrt_hvp(e.view_as(z)).reshape(-1) for e in eye], 1)
    assert torch.allclose(root @ root.T, dense, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize(
    "loss_fn",
    [
        lambda z, t: -0.5 * F.mse_loss(z, t),  # negative scale: concave
        lambda z, t: F.mse_loss(z, t) / F.mse_loss(z, t).detach().requires_grad_(),  # not a constant
        lambda z, t: 1.0 / F.mse_loss(z, t),  # loss in the denominator
        lambda z, t: F.mse_loss(z, t) * (z.sum() ** 2),  # factor depends on the outputs
        lambda z, t: F.cross_entropy(z, t.softmax(1)),  # soft targets
        lambda z, t: F.cross_entropy(z, t.argmax(1), label_smoothing=0.1),
        lambda z, t: F.binary_cross_entropy_with_logits(z, t.sigmoid(), pos_weight=torch.ones(4)),
        lambda z, t: ((z - t) ** 4).mean(),
    ],
)
def test_other_losses_are_not_recognised(loss_fn):
    t = torch.randn(5, 4, dtype=torch.float64)
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True) * 1.0
    assert recognize(loss_fn(y, t), y) is None


def test_loss_on_a_different_tensor_is_not_recognised():
    y = torch.randn(5, 4, dtype=torch.float64, requires_grad=True) * 1.0
    other = y * 2.0
    assert recognize(F.mse_loss(other, torch.zeros(5, 4, dtype=torch.float64)), y) is None
