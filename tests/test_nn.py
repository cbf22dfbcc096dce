"""Memory tools (torch_hf/nn.py): activation offload through saved-tensor hooks."""
import pytest
import torch
import torch.nn.functional as F

import torch_hf
from torch_hf.nn import OffloadActivations


def _problem(device="cpu"):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double().to(device)
    x = torch.randn(10, 6, dtype=torch.float64, device=device)
    y = torch.randint(0, 3, (10,), device=device)

    def closure():
        z = model(x)
        return F.cross_entropy(z, y), z

    return model, closure


def test_offload_hooks_see_the_cached_activations_and_products_are_unchanged():
    model, closure = _problem()
    params = list(model.parameters())
    plain = torch_hf.GGN(params, closure)
    hooks = OffloadActivations()
    with hooks:
        offloaded = torch_hf.GGN(params, closure)
    assert hooks.packed > 0 and hooks.offloaded == 0  # CPU tensors are kept where they are
    v = torch.randn(plain.numel, dtype=torch.float64)
    before = hooks.unpacked
    assert torch.equal(offloaded.mv(v), plain.mv(v))
    assert hooks.unpacked > before  # products read the saved tensors through the hooks


def test_optimizer_offload_option_takes_the_same_step():
    steps = []
    for offload in (False, True):
        model, closure = _problem()
        opt = torch_hf.HessianFree(model.parameters(), offload_activations=offload, cg_max_iters=10,
                                   preconditioner=torch_hf.preconditioners.Identity())
        opt.step(closure)
        steps.append([p.detach().clone() for p in model.parameters()])
        assert (opt.last_offload is not None) == offload
    for a, b in zip(*steps):
        assert torch.equal(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_offload_moves_cuda_activations_to_host():
    model, closure = _problem("cuda")
    params = list(model.parameters())
    plain = torch_hf.GGN(params, closure)
    hooks = OffloadActivations()
    with hooks:
        offloaded = torch_hf.GGN(params, closure)
    assert hooks.offloaded > 0 and hooks.bytes_offloaded > 0
    v = torch.randn(plain.numel, dtype=torch.float64, device="cuda")
    assert torch.allclose(offloaded.mv(v), plain.mv(v), rtol=1e-12, atol=1e-14)
