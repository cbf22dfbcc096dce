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


# -- √T checkpointed unrolling and recomputed products (§7.1) -----------------------------

def _rnn(T=9, B=3, H=5, seed=0):
    torch.manual_seed(seed)
    inp = torch.nn.Linear(2, H).double()
    rec = torch.nn.Linear(H, H, bias=False).double()
    out = torch.nn.Linear(H, 2).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(T, B, 2, generator=gen, dtype=torch.float64)
    y = torch.randn(B, 2, generator=gen, dtype=torch.float64)
    params = [*inp.parameters(), *rec.parameters(), *out.parameters()]

    def cell(xt, h):
        return torch.tanh(inp(xt) + rec(h))

    def closure_for(checkpoint, states=False, extras=False):
        def closure():
            hs = torch_hf.nn.unroll(cell, x, torch.zeros(B, H, dtype=torch.float64), checkpoint=checkpoint,
                                    return_states=states or extras)
            h = hs[-1] if (states or extras) else hs
            z = out(h)
            loss = F.mse_loss(z, y)
            return (loss, z, hs) if extras else (loss, z)
        return closure

    return params, closure_for


@pytest.mark.parametrize("checkpoint", ["sqrt", 1, 4, 9])
@pytest.mark.parametrize("states", [False, True])
def test_checkpointed_unroll_matches_plain_gradient_and_products(checkpoint, states):
    params, closure_for = _rnn()
    plain = torch_hf.GGN(params, closure_for(None, states))
    v = torch.randn(plain.numel, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    for recompute in (False, True):
        op = torch_hf.GGN(params, closure_for(checkpoint, states), recompute=recompute)
        assert torch.allclose(op.grad, plain.grad, rtol=1e-10, atol=1e-14)
        assert torch.allclose(op.loss, plain.loss, rtol=1e-12)
        assert torch.allclose(op.mv(v), plain.mv(v), rtol=1e-10, atol=1e-14)
        assert torch.allclose(op.jvp(v)[0], plain.jvp(v)[0], rtol=1e-10, atol=1e-14)
        u = torch.randn(3, 2, dtype=torch.float64)
        assert torch.allclose(op.vjp(u), plain.vjp(u), rtol=1e-10, atol=1e-14)


def test_recomputed_products_match_dense_reference():
    params, closure_for = _rnn(T=4)
    op = torch_hf.GGN(params, closure_for("sqrt"), recompute=True)
    dense = torch_hf.GGN(params, closure_for(None)).dense()
    assert torch.allclose(op.dense(), dense, rtol=1e-10, atol=1e-13)
    # the parameters are left exactly as they were by the forward-mode passes
    before = [p.detach().clone() for p in params]
    op.mv(torch.ones(op.numel, dtype=torch.float64))
    assert all(torch.equal(a, b) for a, b in zip(before, params))


def test_recompute_with_structural_damping_and_in_the_optimizer():
    params, closure_for = _rnn(T=6)
    damping = torch_hf.damping.Structural(0.5, mu=0.2, batch_dim=1)
    cached = torch_hf.GGN(params, closure_for(None, extras=True), **damping.curvature_kwargs())
    recomputed = torch_hf.GGN(params, closure_for("sqrt", extras=True), recompute=True,
                              **damping.curvature_kwargs())
    v = torch.randn(cached.numel, dtype=torch.float64)
    assert torch.allclose(recomputed.mv(v), cached.mv(v), rtol=1e-10, atol=1e-14)
    finals = []
    for recompute, ck in ((False, None), (True, "sqrt")):
        params, closure_for = _rnn(T=6)
        opt = torch_hf.HessianFree(params, damping=torch_hf.damping.Structural(0.5, mu=0.2, batch_dim=1), cg_stop="progress",
                                   recompute=recompute, cg_max_iters=10)
        for _ in range(2):
            opt.step(closure_for(ck, extras=True))
        finals.append([p.detach().clone() for p in params])
    for a, b in zip(*finals):
        assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("checkpoint", [None, "sqrt"])
def test_products_through_unrolled_states_are_linear_in_T(checkpoint):
    # Stacking the states with torch.stack makes every cached product differentiate one
    # select per step, each writing into a zero tensor of the whole sequence (O(T²)); the
    # unroll's own stacking is differentiated by a single cat. Count the ops that would.
    T, B, H = 16, 3, 4
    torch.manual_seed(0)
    inp, rec, out = torch.nn.Linear(2, H).double(), torch.nn.Linear(H, H, bias=False).double(), \
        torch.nn.Linear(H, 1).double()
    params = [*inp.parameters(), *rec.parameters(), *out.parameters()]
    x, y = torch.randn(T, B, 2, dtype=torch.float64), torch.randn(T, B, 1, dtype=torch.float64)

    def closure():
        hs = torch_hf.nn.unroll(lambda xt, h: torch.tanh(xt + rec(h)), inp(x), torch.zeros(B, H, dtype=torch.float64),
                                checkpoint=checkpoint)
        z = out(hs)
        return F.mse_loss(z, y), z

    op = torch_hf.GGN(params, closure)
    v = torch.randn(op.numel, dtype=torch.float64)
    with torch.profiler.profile() as prof:
        op.mv(v)
    names = [e.name for e in prof.events()]
    assert names.count("aten::mm") > 0  # the profile did record the product
    # none per step: at most one per checkpointed segment (the state handed to the next
    # segment, a segment-sized tensor)
    per_segment = 0 if checkpoint is None else T // 4
    assert names.count("aten::select_backward") <= per_segment
    assert names.count("aten::slice_backward") == 0


def test_unroll_rejects_bad_arguments():
    params, _ = _rnn()
    with pytest.raises(ValueError, match="checkpoint"):
        torch_hf.nn.unroll(lambda x, h: h, torch.zeros(3, 1), torch.zeros(1), checkpoint="half")
    with pytest.raises(ValueError, match="at least one"):
        torch_hf.nn.unroll(lambda x, h: h, torch.zeros(0, 1), torch.zeros(1))
    with pytest.raises(ValueError, match="recompute"):
        torch_hf.HessianFree(params, curvature="hessian", recompute=True)


def test_sparse_init_gives_each_unit_k_gaussian_incoming_weights_and_zero_bias():
    from torch import nn

    model = nn.Sequential(nn.Linear(40, 30), nn.Sigmoid(), nn.Linear(30, 5))
    out = torch_hf.nn.sparse_init_(model, nonzero=15, generator=torch.Generator().manual_seed(0))
    assert out is model
    assert ((model[0].weight != 0).sum(1) == 15).all() and ((model[2].weight != 0).sum(1) == 15).all()
    assert (model[0].bias == 0).all() and (model[2].bias == 0).all()
    nonzero = model[0].weight[model[0].weight != 0]
    assert 0.7 < float(nonzero.std()) < 1.3  # N(0, 1) entries
    again = nn.Sequential(nn.Linear(40, 30), nn.Sigmoid(), nn.Linear(30, 5))
    torch_hf.nn.sparse_init_(again, nonzero=15, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again[0].weight, model[0].weight)
    narrow = torch_hf.nn.sparse_init_(nn.Linear(3, 4), nonzero=15)  # fan-in below k: all weights drawn
    assert (narrow.weight != 0).all()
    with pytest.raises(ValueError, match="no nn.Linear"):
        torch_hf.nn.sparse_init_(nn.Tanh())
    with pytest.raises(ValueError, match="nonzero"):
        torch_hf.nn.sparse_init_(nn.Linear(3, 4), nonzero=0)
