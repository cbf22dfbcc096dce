"""The outputs' Jacobian J (M × n) read off the autograd graph the closure recorded, one
row per output, for outputs that are computed case by case (a PINN's residuals at their
points, a regression's predictions): the per-case gradient trick applied to every use of
every weight, including the several uses a weight has in a graph built with
``create_graph`` (a Laplacian's passes).

For a use Y = A P of a weight P (A: rows × k, one row per case), the cotangent G of Y in
one backward pass of Σ_j z_j holds, in row ρ, ∂z_σ(ρ)/∂Y_ρ when row ρ reaches only the
output σ(ρ); then ∂z_σ(ρ)/∂P collects A_ρ ⊗ G_ρ over the rows and uses that reach it. σ is
read from a second backward pass with the cotangent (1, 2, …, M): its G is (σ(ρ) + 1)·G_ρ.
The result is checked against one vector-Jacobian product with a random cotangent, so a
graph that does not have this structure (cases that interact, a weight used another way)
gives ``None``, never a wrong J.

Cost: three backward passes and the outer products (M·n·uses multiply-adds, one batched
matrix product per weight): on the heat benchmark's 116,865-parameter network with 3,500
residuals, 9 s (about 4 s of it the first touch of J's 3.3 GB, which a reused ``out``
saves) against 49 s for ``torch.func.vmap`` of ``jacrev`` point by point; on the 116,097-
parameter Poisson network 0.08× its cost (``benchmarks/jacobian_cost.py``).
"""
from __future__ import annotations

import logging

import torch
from torch import Tensor

from .graph import left_factor, parameter_uses

__all__ = ["graph_jacobian", "GRAPH_JACOBIAN_MAX_ENTRIES"]

logger = logging.getLogger("torch_hf")

GRAPH_JACOBIAN_MAX_ENTRIES = 1 << 29  # the largest J the optimizer reads: 4 GiB in float64
_CHUNK_ENTRIES = 1 << 21  # rows × weight entries formed at once: 16 MB in float64, below malloc's mmap threshold


def graph_jacobian(outputs: Tensor, params: list[Tensor], max_entries: int | None = None,
                   out: Tensor | None = None) -> Tensor | None:
    """J = ∂z/∂θ (M × n, columns the flat ``params`` in order) of the 1-D ``outputs`` z from
    their autograd graph (kept: it is backpropagated through with ``retain_graph``), or
    ``None`` when the graph is not case by case in the sense above, when J would have more
    than ``max_entries`` entries, or when J fails its check against a random
    vector-Jacobian product. ``out``: an (M × n) buffer to write J into (a large J's first
    touch of fresh memory costs about as much as reading it off the graph)."""
    with torch.enable_grad():  # a view taken under no_grad would leave the graph
        z = outputs.reshape(-1)
    m, n = z.numel(), sum(p.numel() for p in params)
    if z.grad_fn is None or m == 0 or (max_entries is not None and m * n > max_entries):
        return None
    uses = parameter_uses((z,), params)
    if uses is None:
        return None
    nodes = {id(node): node for node, *_ in uses}
    ones = _cotangents(z, torch.ones_like(z), nodes, params)
    coded = _cotangents(z, torch.arange(1, m + 1, dtype=z.dtype, device=z.device), nodes, params)
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    if out is not None and out.shape == (m, n) and out.dtype == z.dtype and out.device == z.device:
        J = out.zero_()
    else:
        J = torch.zeros(m, n, dtype=z.dtype, device=z.device)
    rows_of: dict[int, Tensor | None] = {}
    maps: list[Tensor] = []
    groups: dict[tuple, list] = {}  # (param, case map) -> [(left, right)] or [G] for biases
    for node, kind, i, transposed, scale in uses:
        if id(node) not in rows_of:
            sigma = _case_map(ones.get(id(node)), coded.get(id(node)), m)
            # uses with the same rows share one batched product
            same = [s for s in maps if sigma is not None and s.shape == sigma.shape and torch.equal(s, sigma)]
            rows_of[id(node)] = same[0] if same else sigma
            if sigma is not None and not same:
                maps.append(sigma)
        sigma, G = rows_of[id(node)], ones.get(id(node))
        if G is None:  # no gradient reached it: it contributes nothing
            continue
        if sigma is None:
            return None
        key = (i, id(sigma))
        if kind == "bias":
            groups.setdefault(key, [sigma]).append((scale * G.reshape(-1, params[i].numel()), None))
        else:
            A = left_factor(node).detach()
            G = G if scale == 1.0 else scale * G
            groups.setdefault(key, [sigma]).append((G, A) if transposed else (A, G))
    with torch.no_grad():
        _assemble(J, groups, params, offsets)
    return J if _agrees(J, z, params) else None


def _assemble(J: Tensor, groups: dict, params: list[Tensor], offsets: list[int]) -> None:
    for (i, _), (sigma, *parts) in groups.items():
        cols = J[:, offsets[i]:offsets[i] + params[i].numel()]
        if parts[0][1] is None:
            cols.index_add_(0, sigma, sum(g for g, _ in parts).to(J.dtype))
            continue
        left = torch.stack([a for a, _ in parts], dim=2)   # rows × a × uses
        right = torch.stack([b for _, b in parts], dim=1)  # rows × uses × b
        step = max(1, _CHUNK_ENTRIES // params[i].numel())
        for s in range(0, len(sigma), step):
            block = torch.bmm(left[s:s + step], right[s:s + step]).reshape(-1, params[i].numel())
            cols.index_add_(0, sigma[s:s + step], block.to(J.dtype))


def _cotangents(z: Tensor, seed: Tensor, nodes: dict, params: list[Tensor]) -> dict[int, Tensor]:
    """The cotangent of each node's output in one backward pass of ⟨seed, z⟩."""
    found: dict[int, Tensor] = {}

    def hook_for(key: int):
        def hook(grad_outputs):
            if grad_outputs[0] is not None:
                found[key] = grad_outputs[0].detach()
            return None
        return hook

    handles = [node.register_prehook(hook_for(key)) for key, node in nodes.items()]
    try:
        with torch.enable_grad():
            torch.autograd.grad(z, params, seed, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {k: g.reshape(-1, g.shape[-1]) if g.dim() != 2 else g for k, g in found.items()}


def _case_map(ones: Tensor | None, coded: Tensor | None, m: int) -> Tensor | None:
    """σ(ρ) for each row ρ of a node's output (rows that reach no output map to 0: their
    cotangent is zero), or ``None`` when a row reaches several outputs."""
    if ones is None or coded is None or ones.shape != coded.shape:
        return None
    big = ones.abs().argmax(dim=1, keepdim=True)
    g1, gc = ones.gather(1, big).squeeze(1), coded.gather(1, big).squeeze(1)
    alive = g1 != 0
    sigma = torch.zeros(len(g1), dtype=torch.long, device=g1.device)
    ratio = gc[alive] / g1[alive]
    sigma[alive] = torch.round(ratio).long() - 1
    # Row by row, relative to the row's largest entry: the two passes round differently.
    rtol = 1e-8 if ones.dtype == torch.float64 else 1e-4
    scale = (sigma + 1).unsqueeze(1).to(coded.dtype)
    error = (coded - scale * ones).abs().amax(dim=1)
    if bool(((sigma < 0) | (sigma >= m)).any()) or bool((error > rtol * scale.squeeze(1) * ones.abs().amax(dim=1)).any()):
        return None
    return sigma


def _agrees(J: Tensor, z: Tensor, params: list[Tensor]) -> bool:
    """Jᵀw against the vector-Jacobian product of a random w (a seeded generator: the
    caller's random stream is left alone)."""
    gen = torch.Generator(device=z.device).manual_seed(0x5EED)
    w = torch.randn(z.shape, generator=gen, dtype=z.dtype, device=z.device)
    with torch.enable_grad():
        grads = torch.autograd.grad(z, params, w, retain_graph=True, allow_unused=True)
    exact = torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])
    with torch.no_grad():
        mine = J.t() @ w
    tolerance = 1e-8 if z.dtype == torch.float64 else 1e-3
    error = float((mine - exact).norm()) / max(float(exact.norm()), 1e-300)
    if error > tolerance:
        logger.info("torch_hf: the Jacobian read from the graph misses its check (relative error %.1e); "
                    "the graph is not case by case", error)
        return False
    return True
