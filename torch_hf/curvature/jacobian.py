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

A system of equations gives several outputs per case (the real and imaginary parts of a
Schrödinger residual at one point): a row then reaches several outputs and the two passes
cannot tell them apart. The outputs are then split into colours no row reaches twice, read
from how z was built, the terms of its concatenation (``torch.cat``, as
:func:`torch_hf.residuals.residual_loss` builds it) and, within a term of shape (N × k)
flattened, its k components; the two passes run per colour, and the rows a colour does not
reach are skipped.

Cost: three backward passes and the outer products (M·n·uses multiply-adds, one batched
matrix product per weight and chunk of rows, added in place into J's rows where they come
in case order): on the heat benchmark's 116,865-parameter network with 3,500 residuals,
2.0–2.4 s with ``out`` reused (the outer products 0.3 s of it; the first call, which
touches J's 3.3 GB, 10–30 s) against 49 s for ``torch.func.vmap`` of ``jacrev`` point by
point; on the 116,097-parameter Poisson network 0.08× its cost (``benchmarks/jacobian_cost.py``;
docs/benchmarks.md, the heat step made faster).
"""
from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from .graph import left_factor, parameter_uses

__all__ = ["graph_jacobian", "GRAPH_JACOBIAN_MAX_ENTRIES"]

logger = logging.getLogger("torch_hf")

GRAPH_JACOBIAN_MAX_ENTRIES = 1 << 29  # the largest J the optimizer reads: 4 GiB in float64
# Two backward passes per colour: past this many (a wide vector output, e.g. an
# autoencoder's pixels) CG's products cost less than reading J.
MAX_COLORS = 32
_CHUNK_ENTRIES = 1 << 19  # rows × weight entries formed at once: 4 MB in float64, cache-resident


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
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += p.numel()
    if out is not None and out.shape == (m, n) and out.dtype == z.dtype and out.device == z.device:
        J = out.zero_()
    else:
        J = torch.zeros(m, n, dtype=z.dtype, device=z.device)
    # All outputs at once; where a row reaches several (a system's equations at one point),
    # one colour per residual term and per component of a term (see _output_colors).
    filled = _fill(J, z, uses, params, offsets, None)
    if not filled:
        colors = _output_colors(z)
        if colors is not None and 1 < len(colors) <= MAX_COLORS:
            filled = _fill(J.zero_(), z, uses, params, offsets, colors)
    return J if filled and _agrees(J, z, params) else None


def _fill(J: Tensor, z: Tensor, uses: list[tuple], params: list[Tensor], offsets: list[int],
          colors: list[Tensor] | None) -> bool:
    """Add the rows of J colour by colour (``None``: all outputs as one colour); ``False``
    when a row reaches several outputs of one colour."""
    m = z.numel()
    nodes = {id(node): node for node, *_ in uses}
    index = torch.arange(1, m + 1, dtype=z.dtype, device=z.device)
    for color in colors if colors is not None else [None]:
        if color is None:
            ones_seed, coded_seed = torch.ones_like(z), index
        else:
            ones_seed = torch.zeros_like(z).index_fill_(0, color, 1.0)
            coded_seed = ones_seed * index
        ones = _cotangents(z, ones_seed, nodes, params)
        coded = _cotangents(z, coded_seed, nodes, params)
        rows_of: dict[int, tuple | None] = {}
        maps: list[Tensor] = []
        groups: dict[tuple, list] = {}  # (param, case map) -> [(left, right)] or [G] for biases
        for node, kind, i, transposed, scale in uses:
            G = ones.get(id(node))
            if id(node) not in rows_of:
                sigma = _case_map(G, coded.get(id(node)), m)
                live = None
                if sigma is not None and colors is not None:  # rows of other colours: zero, skipped
                    alive = G.abs().amax(dim=1) != 0
                    live = None if bool(alive.all()) else alive.nonzero().squeeze(1)
                    sigma = sigma if live is None else sigma[live]
                # uses with the same rows share one batched product
                same = [s for s in maps if sigma is not None and s.shape == sigma.shape and torch.equal(s, sigma)]
                rows_of[id(node)] = None if sigma is None else (same[0] if same else sigma, live)
                if sigma is not None and not same:
                    maps.append(sigma)
            if G is None:  # no gradient reached it: it contributes nothing
                continue
            if rows_of[id(node)] is None:
                return False
            sigma, live = rows_of[id(node)]
            if len(sigma) == 0:
                continue
            G = G if live is None else G[live]
            key = (i, id(sigma))
            if kind == "bias":
                groups.setdefault(key, [sigma]).append((scale * G.reshape(-1, params[i].numel()), None))
            else:
                A = left_factor(node).detach()
                A = A if live is None else A.reshape(-1, A.shape[-1])[live]
                G = G if scale == 1.0 else scale * G
                groups.setdefault(key, [sigma]).append((G, A) if transposed else (A, G))
        with torch.no_grad():
            _assemble(J, groups, params, offsets)
    return True


# Nodes between a residual term and the concatenation of the terms that keep its entries
# in place (residual_loss's reshape and 1/√N).
_ELEMENTWISE_SCALE = {"DivBackward0", "MulBackward0", "ViewBackward0", "ReshapeAliasBackward0",
                      "UnsafeViewBackward0", "SqueezeBackward0", "SqueezeBackward1", "NegBackward0"}


def _output_colors(z: Tensor) -> list[Tensor] | None:
    """Sets of outputs that no row of a case-by-case graph reaches twice, read from how z
    was built: the terms of a concatenation (``torch.cat``, as
    :func:`torch_hf.residuals.residual_loss` builds it), and within a term of shape
    (N, k, ...) flattened, each of its components. ``None`` where z's sizes cannot be read."""
    node = z.grad_fn
    while node is not None and type(node).__name__ in ("ViewBackward0", "ReshapeAliasBackward0") \
            and _components(node, z.numel()) == 1:  # a flattened (N × k) output is one term
        node = node.next_functions[0][0]
    if node is not None and type(node).__name__ == "CatBackward0" and node._saved_dim in (0, -1):
        parts = [c for c, _ in node.next_functions]
    else:
        parts = [z.grad_fn]
    colors, start = [], 0
    for part in parts:
        meta = getattr(part, "_input_metadata", None) if part is not None else None
        if not meta:
            return None
        size = math.prod(int(d) for d in meta[0].shape)
        width = _components(part, size)
        colors += [torch.arange(start + j, start + size, width, device=z.device) for j in range(width)]
        start += size
    return colors if start == z.numel() else None


def _components(node, size: int) -> int:
    """k where the term behind ``node`` was an (N × k …) tensor flattened row by row: its
    entries i·k + j for j = 0…k−1 belong to one case."""
    for _ in range(8):
        if node is None or type(node).__name__ not in _ELEMENTWISE_SCALE:
            return 1
        shape = getattr(node, "_saved_self_sym_sizes", None)
        if shape is not None and len(shape) >= 2 and math.prod(int(d) for d in shape) == size:
            return size // int(shape[0])
        node = node.next_functions[0][0]
    return 1


def _assemble(J: Tensor, groups: dict, params: list[Tensor], offsets: list[int]) -> None:
    for (i, _), (sigma, *parts) in groups.items():
        cols = J[:, offsets[i]:offsets[i] + params[i].numel()]
        if parts[0][1] is None:
            cols.index_add_(0, sigma, sum(g for g, _ in parts).to(J.dtype))
            continue
        lefts, rights = [x for x, _ in parts], [y for _, y in parts]
        a, b = lefts[0].shape[1], rights[0].shape[1]
        # Rows in case order (one row per case, cases consecutive: a batched closure's
        # residuals) are added in place into J's rows, with no block and no index.
        start = int(sigma[0]) if len(sigma) else 0
        consecutive = bool(len(sigma)) and torch.equal(sigma, torch.arange(start, start + len(sigma),
                                                                         device=sigma.device))
        step = max(1, _CHUNK_ENTRIES // params[i].numel())
        for s in range(0, len(sigma), step):
            # Stacked chunk by chunk: small and cache-resident, never a fresh large buffer.
            L = torch.stack([x[s:s + step] for x in lefts], dim=2).to(J.dtype)   # rows × a × uses
            R = torch.stack([y[s:s + step] for y in rights], dim=1).to(J.dtype)  # rows × uses × b
            if consecutive:
                cols[start + s:start + s + L.shape[0]].view(-1, a, b).baddbmm_(L, R)
            else:
                cols.index_add_(0, sigma[s:s + step], torch.bmm(L, R).reshape(-1, a * b))


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
