"""K-FAC (Martens & Grosse 2015) as CG's preconditioner: Kronecker-factored GGN blocks of
the linear layers, the GGN diagonal elsewhere."""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from ..curvature import GGN
from ..distributed import shard_of
from .base import GeneratorOwner, Preconditioner, _per_case_probes, damped_power, moving_average_
from .diagonal import GGNDiagonal

__all__ = ["KFAC"]

logger = logging.getLogger("torch_hf")


class KFAC(GeneratorOwner, Preconditioner):
    r"""Kronecker-factored GGN blocks (K-FAC, Martens & Grosse 2015) as CG's preconditioner.

    For a linear layer z = W x + b applied once to a (cases × features) input, write
    W̃ = [W b] and x̃ = [x; 1]. Its GGN block, Σ_i x̃_i x̃_iᵀ ⊗ δ_i δ_iᵀ with δ_i the
    per-case cotangent of z under c = S v (v Rademacher, S Sᵀ = L'', so E[c cᵀ] = L''),
    is approximated by A ⊗ G with

        A = mean_i x̃_i x̃_iᵀ,   G = Σ_i δ_i δ_iᵀ,

    each an exponential moving average over steps (``decay``), since one curvature
    batch gives a noisy G. With γ the layer's damping (its mean entry of λD, plus the
    weight decay) the preconditioner is factored Tikhonov damping (M&G §6.3):

        P = (A + π √γ I)^ξ ⊗ (G + √γ / π I)^ξ,   π² = (tr A / dim A) / (tr G / dim G),

    applied as P⁻¹ vec(V) = vec(G_γ^{−ξ} V A_γ^{−ξ}) for the layer's slice V of the
    residual (out × (in + 1)), two matrix products per layer. The factors' eigenbases are
    recomputed every ``inverse_every`` updates; the damping enters fresh every update
    (λ moves every step). Parameters outside such layers (convolutions, weights shared
    over time steps, layer norms) get the diagonal preconditioner (d + γ)^ξ' with the
    unbiased whole-batch estimate d = sq(Jᵀ S v) of diag(G), from the same backward pass.

    Costs per HF step: one backward pass for the factors (as :class:`GGNDiagonal`), the
    factors' outer products, the damped inverses (O(in³ + out³) per layer; with the
    eigendecompositions of every ``inverse_every``-th update, 5 products per update on
    CURVES at ``inverse_every=5``), and per CG iteration two matrix products per layer of
    about in·out·(in + out) multiply-adds — as much as a curvature product on roughly
    (in + out) / 5 cases (0.95 products on CURVES at 250 cases, 0.51 on a narrower
    autoencoder: ``benchmarks/preconditioner_cost.py``), so it pays only where it saves
    CG iterations in proportion (``docs/autoencoders.md`` has the measurements).

    Args:
        decay: β in [0, 1) of the factors' moving average (bias-corrected); 0 uses each
            step's factors alone.
        inverse_every: refresh the eigendecompositions every this many updates.
        exponent: ξ in (0, 1] of the Kronecker blocks (1: the K-FAC block inverse).
        fallback_exponent: ξ' of the diagonal used elsewhere (§13: 0.75).
        generator: optional ``torch.Generator`` for the Rademacher vectors.

    The sampled cotangents need ``curvature='ggn'`` with a matching loss
    (:mod:`torch_hf.losses`, whose closed-form S gives them). Otherwise (another loss, or
    ``curvature='hessian'``) every parameter gets :class:`GGNDiagonal`'s preconditioner
    (Hutchinson's estimate there) with ``fallback_exponent``, and this is logged once.
    """

    def __init__(self, decay: float = 0.95, inverse_every: int = 1, exponent: float = 1.0,
                 fallback_exponent: float = 0.75, generator: torch.Generator | None = None) -> None:
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        if int(inverse_every) != inverse_every or inverse_every < 1:
            raise ValueError(f"inverse_every must be a positive integer, got {inverse_every}")
        for name, value in (("exponent", exponent), ("fallback_exponent", fallback_exponent)):
            if not 0 < value <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {value}")
        self.decay, self.inverse_every = float(decay), int(inverse_every)
        self.exponent, self.fallback_exponent = float(exponent), float(fallback_exponent)
        self.generator = generator
        self._layers: list[tuple[int, int | None]] = []  # (weight index, bias index)
        self._A: list[Tensor] = []
        self._G: list[Tensor] = []
        self._updates = 0
        self._eig: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._inv: list[tuple[Tensor, Tensor]] = []
        self._diag_inverse: Tensor | None = None
        self._diag: Tensor | None = None
        self._shapes: list[torch.Size] = []
        self._covered: Tensor | None = None
        self._fallback: GGNDiagonal | None = None
        self.shard: tuple[int, int] | None = None  # (rank, world size) under data parallelism

    # -- statistics ---------------------------------------------------------------
    def _factors(self, ggn: GGN) -> tuple[list[tuple[int, int | None]], list[Tensor], list[Tensor], Tensor]:
        v = tuple(_per_case_probes(o, self.generator, self.shard) for o in ggn.outputs)
        c = ggn.loss_sqrt_hvp(v)
        found: dict[int, tuple[int | None, Tensor, Tensor]] = {}

        def on_layer(x: Tensor, delta: Tensor, w: int, b: int | None) -> None:
            x = x.detach()
            if b is not None:
                x = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
            delta = delta.detach()
            found[w] = (b, x.t() @ x / x.shape[0], delta.t() @ delta)

        grads = ggn.layer_vjp(c, on_layer)
        layers = sorted((w, b) for w, (b, _, _) in found.items())
        sq = torch.cat([torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.square().reshape(-1)
                        for p, g in zip(ggn.params, grads)])
        return layers, [found[w][1] for w, _ in layers], [found[w][2] for w, _ in layers], sq

    def update(self, curvature, damping_diagonal: Tensor | float | None = 0.0, weight_decay: float = 0.0,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        if not isinstance(curvature, GGN) or curvature.matching_loss is None:
            if self._fallback is None:
                logger.info("KFAC: no closed-form output factor (curvature %s, no matching loss): using "
                            "GGNDiagonal(%s) for every parameter", type(curvature).__name__, self.fallback_exponent)
                self._fallback = GGNDiagonal(self.fallback_exponent, generator=self.generator)
            self._fallback.update(curvature, damping_diagonal, weight_decay, reduce)
            return
        self._fallback = None
        ggn = curvature
        self.shard = shard_of(reduce)
        layers, A, G, sq = self._factors(ggn)
        if reduce is not None:  # one collective for every factor and the diagonal
            flat = reduce(torch.cat([t.reshape(-1) for t in A + G] + [sq]))
            parts = flat.split([t.numel() for t in A + G] + [sq.numel()])
            A = [p.view_as(t) for p, t in zip(parts[: len(A)], A)]
            G = [p.view_as(t) for p, t in zip(parts[len(A): len(A) + len(G)], G)]
            sq = parts[-1]
        shapes = [p.shape for p in ggn.params]
        if layers != self._layers or shapes != self._shapes or len(self._A) != len(A):
            self._layers, self._shapes, self._updates = layers, shapes, 0
            self._A, self._G = [torch.zeros_like(a) for a in A], [torch.zeros_like(g) for g in G]
            self._average_sq = torch.zeros_like(sq)
        self._updates += 1
        for avg, new in zip(self._A + self._G + [self._average_sq], A + G + [sq]):
            moving_average_(avg, new, self.decay)
        correction = 1 - self.decay**self._updates
        if (self._updates - 1) % self.inverse_every == 0 or len(self._eig) != len(layers):
            self._eig = []
            for a, g in zip(self._A, self._G):
                sa, qa = torch.linalg.eigh(a / correction)
                sg, qg = torch.linalg.eigh(g / correction)
                self._eig.append((sa.clamp_min(0), qa, sg.clamp_min(0), qg))
        self._form_inverses(ggn.params, damping_diagonal, weight_decay, self._average_sq / correction)

    def _form_inverses(self, params: list[Tensor], damping_diagonal, weight_decay, d: Tensor) -> None:
        total = sum(p.numel() for p in params)
        shift = torch.zeros(total, dtype=d.dtype, device=d.device)
        for extra in (damping_diagonal, weight_decay):
            if extra is not None:
                shift = shift + extra
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        covered = torch.zeros(total, dtype=torch.bool, device=d.device)
        self._inv, diag = [], d.new_zeros(total)
        for (w, b), (sa, qa, sg, qg) in zip(self._layers, self._eig):
            idx = [w] if b is None else [w, b]
            gamma = torch.cat([shift[offsets[i]:offsets[i + 1]] for i in idx]).mean().clamp_min(0)
            # π balances the damping between the factors; 1 when either factor is all zero
            # (a tensor expression: no host sync on accelerators)
            mean_a, mean_g = sa.mean(), sg.mean()
            both = (mean_a > 0) & (mean_g > 0)
            pi = torch.where(both, (mean_a / mean_g.clamp_min(torch.finfo(sg.dtype).tiny)).sqrt(),
                             torch.ones_like(mean_a))
            floor = torch.finfo(sa.dtype).tiny ** 0.5
            ta = (sa + pi * gamma.sqrt()).clamp_min(floor)
            tg = (sg + gamma.sqrt() / pi).clamp_min(floor)
            xi = self.exponent
            a_inv = (qa * ta.pow(-xi)) @ qa.t()
            g_inv = (qg * tg.pow(-xi)) @ qg.t()
            self._inv.append((g_inv, a_inv))
            # diag(P) of the block, for the trust region's norm: diag(Pg) ⊗ diag(Pa)
            block = ((qg.square() @ tg.pow(xi))[:, None] * (qa.square() @ ta.pow(xi))[None, :])
            diag[offsets[w]:offsets[w + 1]] = block[:, : params[w].shape[-1]].reshape(-1)
            covered[offsets[w]:offsets[w + 1]] = True
            if b is not None:
                diag[offsets[b]:offsets[b + 1]] = block[:, -1]
                covered[offsets[b]:offsets[b + 1]] = True
        rest = damped_power(d.clamp_min(0) + shift, self.fallback_exponent)
        diag = torch.where(covered, diag, rest)
        self._covered, self._diag = covered, diag
        self._diag_inverse = torch.where(covered, torch.zeros_like(rest), rest.reciprocal())
        self._offsets = offsets

    # -- application --------------------------------------------------------------
    def solve(self, r: Tensor) -> Tensor:
        if self._fallback is not None:
            return self._fallback.solve(r)
        if self._diag_inverse is None:
            raise RuntimeError("KFAC.solve called before update()")
        out = r * self._diag_inverse
        o = self._offsets
        for (w, b), (g_inv, a_inv) in zip(self._layers, self._inv):
            rows = self._shapes[w][0]
            v = r[o[w]:o[w + 1]].view(rows, -1)
            if b is not None:
                v = torch.cat([v, r[o[b]:o[b + 1]].view(rows, 1)], dim=1)
            y = g_inv @ v @ a_inv
            if b is None:
                out[o[w]:o[w + 1]] = y.reshape(-1)
            else:
                out[o[w]:o[w + 1]] = y[:, :-1].reshape(-1)
                out[o[b]:o[b + 1]] = y[:, -1]
        return out

    def diagonal(self) -> Tensor | None:
        return self._fallback.diagonal() if self._fallback is not None else self._diag

    def state_dict(self) -> dict:
        state: dict = {}
        if self._layers:
            state = {"layers": [list(wb) for wb in self._layers], "A": [a.clone() for a in self._A],
                     "G": [g.clone() for g in self._G], "sq": self._average_sq.clone(), "updates": self._updates,
                     "shapes": [list(s) for s in self._shapes],
                     "eig": [list(e) for e in self._eig]}  # a resumed run refreshes on the same updates
        return self._save_generator(state)

    def load_state_dict(self, state: dict) -> None:
        if "layers" in state:
            self._layers = [tuple(wb) for wb in state["layers"]]
            self._A, self._G = [a.clone() for a in state["A"]], [g.clone() for g in state["G"]]
            self._average_sq, self._updates = state["sq"].clone(), int(state["updates"])
            self._shapes = [torch.Size(s) for s in state["shapes"]]
            self._eig = [tuple(t.clone() for t in e) for e in state.get("eig", [])]
        self._load_generator(state)

    def __repr__(self) -> str:
        return (f"KFAC(decay={self.decay}, inverse_every={self.inverse_every}, exponent={self.exponent}, "
                f"fallback_exponent={self.fallback_exponent})")
