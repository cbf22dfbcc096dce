"""Preconditioners for CG (§11).

The diagonal ones are P = (d + λD + κ)^ξ (§11.2), where d estimates
diag(B) of the curvature batch (including weight decay), λD is the damping's diagonal
(added exactly, §11.2: "d should approximate diag(B̂), not diag(B)"), κ ≥ 0 pulls P
toward a multiple of the identity, and ξ ∈ (0, 1] (0.75 in §13) makes it gentler.

Protocol used by :class:`torch_hf.HessianFree`:

* ``update(curvature, damping_diagonal, weight_decay, reduce=None)`` — once per step
  (``reduce`` is given only under data parallelism);
* ``solve(r)`` — P⁻¹ r (Algorithm 2's "solution of P y = r");
* ``diagonal()`` — diag(P), or ``None`` for the identity (the trust-region norm);
* ``estimate(curvature)`` — the raw estimate d (shared with scale-sensitive damping).

Estimators:

* :class:`EmpiricalFisherDiagonal` (§11.3): d = (1/N) Σ_i sq(∇ℓ_i) over the N cases,
  the per-case gradients summed in squares without storing them (Algorithm 6) for
  linear layers.
* :class:`GGNDiagonal` (§11.4, Chapelle & Erhan): unbiased d = mean over samples of
  sq(Jᵀ S v) with Rademacher v and S Sᵀ = L'', per case for linear layers.

Beyond §11's diagonals, :class:`KFAC` preconditions each linear layer with a
Kronecker-factored approximation of its GGN block (Martens & Grosse 2015).
"""
from __future__ import annotations

import logging
from typing import Callable

import torch
from torch import Tensor

from .curvature import GGN, Hessian
from .distributed import shard_of

logger = logging.getLogger("torch_hf")

__all__ = ["Preconditioner", "Identity", "DiagonalPreconditioner", "EmpiricalFisherDiagonal", "GGNDiagonal", "KFAC"]


class Preconditioner:
    """Base protocol; see the module docstring."""

    def update(self, curvature, damping_diagonal: Tensor | float | None = 0.0, weight_decay: float = 0.0,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        """Recompute P for this step's curvature operator. ``reduce`` averages a
        per-process estimate over the data-parallel group (see :mod:`torch_hf.distributed`)."""

    def solve(self, r: Tensor) -> Tensor:
        """P⁻¹ r."""
        return r

    def diagonal(self) -> Tensor | None:
        """diag(P), or ``None`` when P = I."""
        return None

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Identity(Preconditioner):
    """No preconditioning, P = I."""

    def __repr__(self) -> str:
        return "Identity()"


class DiagonalPreconditioner(Preconditioner):
    """P = (d + λD + κ)^ξ from an estimate ``d`` of diag(B) (§11.2).

    Args:
        exponent: ξ in (0, 1] (§13: 0.75).
        kappa: κ ≥ 0, added before the power.
        decay: β in [0, 1): d is the exponential moving average of the per-step
            estimates, d_k = β d_{k−1} + (1 − β) d̂_k (bias-corrected as in Adam), so a
            noisy one-sample estimate on a small curvature batch is averaged over steps;
            0 (default) uses each step's estimate alone, as the paper does.
    """

    def __init__(self, exponent: float = 0.75, kappa: float = 0.0, decay: float = 0.0) -> None:
        if not 0 < exponent <= 1:
            raise ValueError(f"exponent must be in (0, 1], got {exponent}")
        if not kappa >= 0:
            raise ValueError(f"kappa must be >= 0, got {kappa}")
        if not 0 <= decay < 1:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.exponent, self.kappa, self.decay = exponent, kappa, decay
        self._inverse: Tensor | None = None
        self._diag: Tensor | None = None
        self._average: Tensor | None = None
        self._updates = 0
        self.last_estimate: Tensor | None = None
        # (rank, world size) under data parallelism, set from ``reduce`` by each update: a
        # random estimator draws the whole batch's per-case probes and keeps its share.
        self.shard: tuple[int, int] | None = None

    def estimate(self, curvature) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def update(self, curvature, damping_diagonal: Tensor | float | None = 0.0, weight_decay: float = 0.0,
               reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.shard = shard_of(reduce)
        d = self.estimate(curvature)
        if reduce is not None:
            d = reduce(d)
        d = d.clamp_min(0)
        if self.decay > 0:
            if self._average is None or self._average.shape != d.shape:
                self._average, self._updates = torch.zeros_like(d), 0
            self._updates += 1
            self._average.mul_(self.decay).add_(d, alpha=1 - self.decay)
            d = self._average / (1 - self.decay**self._updates)
        self.last_estimate = d
        extra = damping_diagonal if damping_diagonal is not None else 0.0
        base = d + weight_decay + extra + self.kappa
        # An all-zero row (unused parameter, no damping) would make P singular.
        floor = torch.finfo(base.dtype).tiny ** 0.5
        p = base.clamp_min(floor).pow(self.exponent)
        self._diag = p
        self._inverse = p.reciprocal()

    def solve(self, r: Tensor) -> Tensor:
        if self._inverse is None:
            raise RuntimeError(f"{type(self).__name__}.solve called before update()")
        return r * self._inverse

    def diagonal(self) -> Tensor | None:
        return self._diag

    def state_dict(self) -> dict:
        if self._average is None:
            return {}
        return {"average": self._average.clone(), "updates": self._updates}

    def load_state_dict(self, state: dict) -> None:
        if "average" in state:
            self._average, self._updates = state["average"].clone(), int(state["updates"])

    def __repr__(self) -> str:
        return f"{type(self).__name__}(exponent={self.exponent}, kappa={self.kappa}, decay={self.decay})"


def _require_ggn(curvature, who: str) -> GGN:
    if not isinstance(curvature, GGN):
        raise TypeError(f"{who} needs the network outputs: use it with curvature='ggn' (got {type(curvature).__name__})")
    return curvature


def _rademacher_like(like: Tensor, gen: torch.Generator | None) -> Tensor:
    bits = torch.randint(0, 2, like.shape, generator=gen, device="cpu" if gen is not None else like.device)
    return bits.to(device=like.device, dtype=like.dtype) * 2 - 1


def _per_case_probes(like: Tensor, gen: torch.Generator | None, shard: tuple[int, int] | None) -> Tensor:
    """Rademacher probes for the cases of ``like`` (an output, batch first). Under data
    parallelism (``shard`` = (rank, world size)) the probes of all the group's cases are
    drawn and this rank's share kept: the group then draws exactly what one process would
    on the whole batch, given the same stream."""
    if shard is None:
        return _rademacher_like(like, gen)
    rank, world = shard
    return _rademacher_like(like.expand(world, *like.shape), gen)[rank]


class EmpiricalFisherDiagonal(DiagonalPreconditioner):
    """diag of the empirical Fisher, d = (1/N) Σ_i sq(∇ℓ_i) (§11.3), with f = (1/N) Σ_i ℓ_i.

    The per-case gradients of linear layers are squared and summed inside one backward
    pass (Algorithm 6). Parameters that are not in such a layer (convolutions, weights
    shared across time steps) would need per-case storage; for them this raises
    ``NotImplementedError`` unless ``allow_batch_fallback=True``, which uses
    N·sq(∇f) instead (a biased stand-in). Prefer :class:`GGNDiagonal` there: its fallback
    stays unbiased.
    """

    def __init__(self, exponent: float = 0.75, kappa: float = 0.0, allow_batch_fallback: bool = False,
                 decay: float = 0.0) -> None:
        super().__init__(exponent, kappa, decay)
        self.allow_batch_fallback = allow_batch_fallback

    def estimate(self, curvature) -> Tensor:
        ggn = _require_ggn(curvature, "EmpiricalFisherDiagonal")
        n_cases = ggn.outputs[0].shape[0]
        d, per_case = ggn.squared_vjp(ggn.output_grads)
        if not bool(per_case.all()) and not self.allow_batch_fallback:
            raise NotImplementedError(
                f"EmpiricalFisherDiagonal computes per-case squared gradients only for linear layers applied once "
                f"to a (cases x features) input; {int((~per_case).sum())} parameter entries are elsewhere. "
                "Use GGNDiagonal, or allow_batch_fallback=True"
            )
        return d * n_cases


class GGNDiagonal(DiagonalPreconditioner):
    """Unbiased estimate of diag(G) (§11.4): mean over ``samples`` of sq(Jᵀ S v) with
    Rademacher v (lower variance than Gaussian, Martens et al. 2012) and S Sᵀ = L''.

    The squares are taken per case for linear layers (Algorithm 6's structure), over
    the whole batch elsewhere (still unbiased, noisier). Without a closed-form S (a
    loss other than the matching losses) or with ``curvature='hessian'`` it uses
    Hutchinson's estimator v ⊙ (B v), also unbiased, clamped at zero.

    Args:
        exponent: ξ (§13: 0.75).
        kappa: κ.
        samples: number of random vectors averaged.
        generator: optional ``torch.Generator`` for reproducible samples.
        decay: moving average of the estimates over steps (see :class:`DiagonalPreconditioner`).
    """

    def __init__(self, exponent: float = 0.75, kappa: float = 0.0, samples: int = 1,
                 generator: torch.Generator | None = None, decay: float = 0.0) -> None:
        super().__init__(exponent, kappa, decay)
        if samples < 1:
            raise ValueError(f"samples must be >= 1, got {samples}")
        self.samples, self.generator = samples, generator

    def estimate(self, curvature) -> Tensor:
        total = None
        for _ in range(self.samples):
            if isinstance(curvature, GGN) and curvature.matching_loss is not None:
                v = tuple(_per_case_probes(o, self.generator, self.shard) for o in curvature.outputs)
                d, _ = curvature.squared_vjp(curvature.loss_sqrt_hvp(v))
            elif isinstance(curvature, (GGN, Hessian)):
                v = _rademacher_like(curvature.grad, self.generator)  # in parameter space: one draw for the group
                d = v * curvature.mv(v)  # Hutchinson; clamped after averaging
            else:
                raise TypeError(f"GGNDiagonal cannot estimate the diagonal of {type(curvature).__name__}")
            total = d if total is None else total + d
        return total / self.samples

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.generator is not None:
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the parameters' dtype.
            state["generator"] = self.generator.get_state().tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.generator is not None and "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))


class KFAC(Preconditioner):
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
            avg.mul_(self.decay).add_(new, alpha=1 - self.decay)
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
        floor = torch.finfo(d.dtype).tiny ** 0.5
        rest = (d.clamp_min(0) + shift).clamp_min(floor).pow(self.fallback_exponent)
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
        if self.generator is not None:
            state["generator"] = self.generator.get_state().tolist()
        return state

    def load_state_dict(self, state: dict) -> None:
        if "layers" in state:
            self._layers = [tuple(wb) for wb in state["layers"]]
            self._A, self._G = [a.clone() for a in state["A"]], [g.clone() for g in state["G"]]
            self._average_sq, self._updates = state["sq"].clone(), int(state["updates"])
            self._shapes = [torch.Size(s) for s in state["shapes"]]
            self._eig = [tuple(t.clone() for t in e) for e in state.get("eig", [])]
        if self.generator is not None and "generator" in state:
            self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    def __repr__(self) -> str:
        return (f"KFAC(decay={self.decay}, inverse_every={self.inverse_every}, exponent={self.exponent}, "
                f"fallback_exponent={self.fallback_exponent})")
