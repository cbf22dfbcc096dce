"""The architecture matrix: HF on today's building blocks with their default kernels.

For each model, a tiny float64 copy whose ``GGN.mv`` must match the dense Jᵀ L'' J
(Jacobian by ``torch.autograd.functional`` through ``functional_call``, L'' by autograd)
to 1e-8, and three HF steps that lower the loss. Fused attention (flash / memory-efficient
SDPA), cuDNN RNNs and ``torch.compile`` have no double backward: the curvature operator
must switch to twice-differentiable kernels by itself (``safe_kernels``). The CUDA rows
skip without a GPU.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import torch_hf
from torch_hf import HessianFree

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


class Head(nn.Module):
    """A sequence model followed by a linear read-out (RNNs return tuples)."""

    def __init__(self, body: nn.Module, width: int, n_out: int, embed: nn.Module | None = None):
        super().__init__()
        self.embed, self.body, self.out = embed, body, nn.Linear(width, n_out)

    def forward(self, x):
        h = self.embed(x) if self.embed is not None else x
        h = self.body(h)
        return self.out(h[0] if isinstance(h, tuple) else h)


class CausalDecoder(nn.Module):
    """One ``nn.TransformerDecoderLayer`` with a causal target mask over a fixed memory."""

    def __init__(self, d: int, memory: torch.Tensor):
        super().__init__()
        self.layer = nn.TransformerDecoderLayer(d, 2, 2 * d, dropout=0.0, batch_first=True)
        self.register_buffer("memory", memory)

    def forward(self, x):
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype, device=x.device)
        return self.layer(x, self.memory, tgt_mask=mask, tgt_is_causal=True)


def make(name: str, dtype=torch.float64, device="cpu", seed=0):
    """(model, inputs, loss_fn(outputs)) for the named architecture."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    B, T = 3, 4

    def rand(*shape):  # drawn in float64 whatever the dtype: the float32 CUDA copy sees the same data
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    def labels(*shape, n):
        return torch.randint(0, n, shape, generator=g)

    if name == "transformer_encoder":
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True)
        model = Head(nn.TransformerEncoder(layer, 1, enable_nested_tensor=False), 4, 3)
        x, t = rand(B, T, 4), labels(B, T, n=3)
        loss = lambda z: F.cross_entropy(z.reshape(-1, 3), t.to(device).reshape(-1))  # noqa: E731
    elif name == "causal_decoder":
        model = Head(CausalDecoder(4, rand(B, 2, 4)), 4, 2)
        x, y = rand(B, T, 4), rand(B, T, 2)
        loss = lambda z: F.mse_loss(z, y.to(device))  # noqa: E731
    elif name in ("lstm", "gru"):
        rnn = (nn.LSTM if name == "lstm" else nn.GRU)(3, 4, num_layers=2, batch_first=True)
        model = Head(rnn, 4, 2)
        x, y = rand(B, T, 3), rand(B, T, 2)
        loss = lambda z: F.mse_loss(z, y.to(device))  # noqa: E731
    elif name == "embedding_lstm_lm":
        vocab = 7
        model = Head(nn.LSTM(5, 6, batch_first=True), 6, vocab, embed=nn.Embedding(vocab, 5))
        tokens = labels(B, T + 1, n=vocab)
        x, t = tokens[:, :-1], tokens[:, 1:]
        loss = lambda z: F.cross_entropy(z.transpose(1, 2), t.to(device))  # noqa: E731  (B, T, V) logits
    elif name == "conv_norm_silu":
        model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.SiLU(), nn.Conv2d(2, 4, 3),
                              nn.GroupNorm(2, 4), nn.SiLU(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3))
        x, t = rand(4, 1, 6, 6), labels(4, n=3)
        loss = lambda z: F.cross_entropy(z, t.to(device))  # noqa: E731
    else:
        raise KeyError(name)
    return model.to(device=device, dtype=dtype), x.to(device), loss


ARCHITECTURES = ["transformer_encoder", "causal_decoder", "lstm", "gru", "embedding_lstm_lm", "conv_norm_silu"]
FUSED = {"transformer_encoder", "causal_decoder"}  # SDPA picks a fused kernel for these on CPU


def dense_ggn(model, x, loss_fn):
    names = [n for n, _ in model.named_parameters()]
    params = list(model.parameters())
    theta = torch.nn.utils.parameters_to_vector(params).detach().clone()

    def outputs(flat):
        d, off = {}, 0
        for n, p in zip(names, params):
            d[n] = flat[off: off + p.numel()].view_as(p)
            off += p.numel()
        return functional_call(model, d, (x,))

    z = outputs(theta).detach()
    jac = torch.autograd.functional.jacobian(lambda th: outputs(th).reshape(-1), theta)
    hess = torch.autograd.functional.hessian(lambda flat: loss_fn(flat.view_as(z)), z.reshape(-1))
    return jac.T @ hess @ jac


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_ggn_matches_dense_reference_with_default_kernels(name):
    model, x, loss_fn = make(name)

    def closure():
        z = model(x)
        return loss_fn(z), z

    ggn = torch_hf.GGN(model.parameters(), closure)
    reference = dense_ggn(model, x, loss_fn)
    assert reference.norm() > 0
    err = float((ggn.dense() - reference).norm() / reference.norm())
    assert err <= 1e-8, f"{name}: relative error {err:.2e}"
    # The fused CPU attention kernel has no double backward: the operator must have switched,
    # and only there (CPU RNNs, convolutions and norms keep their kernels).
    assert ggn.safe_kernels == (name in FUSED)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_three_hf_steps_lower_the_loss(name, dtype):
    model, x, loss_fn = make(name, dtype=dtype)

    def closure():
        z = model(x)
        return loss_fn(z), z

    opt = HessianFree(model.parameters(), cg_max_iters=20)
    with torch.no_grad():
        before = float(loss_fn(model(x)))
    for _ in range(3):
        opt.step(closure)
    with torch.no_grad():
        after = float(loss_fn(model(x)))
    assert after < before, f"{name}: {before} -> {after}"
    assert any(d.accepted for d in opt.history)


def test_fused_kernels_stay_for_trial_points():
    # Only the curvature operator needs the math attention; trial objectives keep the fused kernel.
    model, x, loss_fn = make("transformer_encoder", dtype=torch.float32)

    def closure():
        z = model(x)
        return loss_fn(z), z

    opt = HessianFree(model.parameters(), cg_max_iters=5)
    opt.step(closure)
    assert opt._safe_kernels is True
    with torch.profiler.profile() as prof:
        opt.step(closure)
    counts: dict[str, int] = {}
    for e in prof.events():
        counts[e.name] = counts.get(e.name, 0) + 1
    # One attention layer: the curvature evaluation once with the math kernel, each trial point fused.
    assert counts.get("aten::_scaled_dot_product_attention_math") == 1
    assert counts.get("aten::_scaled_dot_product_flash_attention_for_cpu") == opt.last_step.objective_evaluations >= 1


def test_compiled_module_trains():
    core = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2)).double()
    model = torch.compile(core, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, generator=g, dtype=torch.float64), torch.randn(16, 2, generator=g, dtype=torch.float64)

    def closure():
        z = model(x)
        return F.mse_loss(z, y), z

    ggn = torch_hf.GGN(model.parameters(), closure)
    assert ggn.safe_kernels
    assert float((ggn.dense() - dense_ggn(core, x, lambda z: F.mse_loss(z, y))).norm()) <= 1e-10
    opt = HessianFree(model.parameters(), cg_max_iters=20)
    losses = [float(opt.step(closure)) for _ in range(3)]
    assert losses[-1] < losses[0]


def test_compiled_module_without_eager_fallback_gets_a_closure_error(monkeypatch):
    # torch < 2.6 has no torch.compiler.set_stance: then the user is told what to do.
    monkeypatch.delattr(torch.compiler, "set_stance", raising=False)
    model = torch.compile(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)), backend="aot_eager")
    x, y = torch.randn(5, 3), torch.randn(5, 2)

    def closure():
        z = model(x)
        return F.mse_loss(z, y), z

    opt = HessianFree(model.parameters())
    with pytest.raises(torch_hf.ClosureError, match=r"torch\.compile.*double backward.*_orig_mod"):
        opt.step(closure)


@CUDA
@pytest.mark.parametrize("name", ARCHITECTURES)
def test_cuda_default_kernels_match_cpu_float64_and_train(name):
    # float32 on the GPU picks cuDNN RNNs and fused attention; the product must still be
    # the float64 CPU one (to float32 accuracy), and three steps must lower the loss.
    cpu_model, cpu_x, cpu_loss = make(name)
    model, x, loss_fn = make(name, dtype=torch.float32, device="cuda")
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in cpu_model.state_dict().items()})

    def closure():
        z = model(x)
        return loss_fn(z), z

    ggn = torch_hf.GGN(model.parameters(), closure)
    v = torch.randn(ggn.numel, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = dense_ggn(cpu_model, cpu_x, cpu_loss) @ v
    got = ggn.mv(v.float().cuda()).double().cpu()
    assert float((got - reference).norm() / reference.norm()) <= 1e-3
    opt = HessianFree(model.parameters(), cg_max_iters=20)
    losses = [float(opt.step(closure)) for _ in range(4)]
    assert losses[-1] < losses[0]
