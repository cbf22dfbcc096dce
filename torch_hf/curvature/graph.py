"""Reading the autograd graph a closure recorded: one depth-first walk, the contract checks
built on it (outputs independent of each other, the loss reaching the parameters only
through the outputs, §6.2), and the discovery of linear layers whose per-case factors the
per-layer statistics read (:mod:`torch_hf.curvature.layers`).

The graph's node classes (``AddmmBackward0``) and saved tensors (``_saved_mat1``) are
PyTorch internals: they are read here and nowhere else, and a node that does not look as
expected is skipped (its parameters are then treated as not per-case), never misread.
"""
from __future__ import annotations

from typing import Iterable, Iterator

import torch
from torch import Tensor

from .closure import ClosureError

__all__ = ["node_of", "walk", "check_outputs_independent", "check_loss_through_outputs", "linear_layers"]


def node_of(t: Tensor):
    """The autograd node gradients of ``t`` flow into (AccumulateGrad for leaves)."""
    if t.grad_fn is not None:
        return t.grad_fn
    return torch.autograd.graph.get_gradient_edge(t).node


def children(node) -> list:
    """The nodes ``node`` passes gradients to (``None`` edges left out)."""
    return [c for c, _ in node.next_functions if c is not None]


def walk(roots: Iterable, stop: frozenset[int] = frozenset()) -> Iterator:
    """Every node reachable from ``roots``, once each, depth first; nodes whose ``id`` is in
    ``stop`` are neither yielded nor passed. The nodes seen are kept alive until the walk
    ends: the ids of node wrappers are only unique while they live."""
    stack = [r for r in roots if r is not None]
    visited: set[int] = set()
    alive: list = []
    while stack:
        node = stack.pop()
        if id(node) in visited or id(node) in stop:
            continue
        visited.add(id(node))
        alive.append(node)
        yield node
        stack.extend(children(node))


def check_outputs_independent(outputs: tuple[Tensor, ...]) -> None:
    """Raise when one output is computed from another (L'' would be taken wrongly)."""
    if len(outputs) < 2:
        return
    edges = [(node_of(o), getattr(o, "output_nr", 0)) for o in outputs]
    seen_edges: dict[tuple[int, int], int] = {}
    for i, (n, nr) in enumerate(edges):
        key = (id(n), nr)
        if key in seen_edges:
            raise ClosureError(
                f"outputs {seen_edges[key]} and {i} are the same tensor: pass each output once"
            )
        seen_edges[key] = i
    targets = {id(n): i for i, (n, _) in enumerate(edges)}
    # One walk from all children of all output nodes: reaching an output node means that
    # output feeds another one.
    for node in walk([c for n, _ in edges for c in children(n)]):
        if id(node) in targets:
            raise ClosureError(
                f"output {targets[id(node)]} is used to compute another output; the GGN treats the "
                "outputs as independent coordinates, so return only outputs that are not computed "
                "from each other (e.g. logits and hidden states, not logits and softmax(logits))"
            )


def check_loss_through_outputs(loss: Tensor, outputs: tuple[Tensor, ...], params: list[Tensor]) -> None:
    """Raise when the loss reaches a parameter other than through the outputs."""
    stop_nodes = [node_of(o) for o in outputs]  # kept alive: ids of node wrappers can be reused
    param_ids = {id(p) for p in params}
    for node in walk([loss.grad_fn], stop=frozenset(id(n) for n in stop_nodes)):
        var = getattr(node, "variable", None)
        if var is not None and id(var) in param_ids:
            raise ClosureError(
                "the loss depends on the parameters other than through the outputs (e.g. an L2 "
                "penalty inside the closure); pass weight_decay= to the optimizer instead, or "
                "return the extra term's input as an output"
            )


def linear_layers(outputs: tuple[Tensor, ...], params: list[Tensor], batch: int) -> list[tuple]:
    """The linear layers (``addmm``/``mm`` nodes) whose weight (and bias) are used only there
    and whose input rows are the cases: ``[(node, input, weight_index, bias_index or None)]``."""
    index = {id(p): i for i, p in enumerate(params)}
    # Every node wrapper is held before the edges are counted: PyTorch may hand out a new
    # wrapper (and a recycled id) for a node whose last wrapper died (seen on torch 2.11).
    nodes = list(walk(node_of(o) for o in outputs))
    uses: dict[int, int] = {}  # how many edges point at each node: a parameter used twice is not per-case
    for node in nodes:
        for child in children(node):
            uses[id(child)] = uses.get(id(child), 0) + 1

    def param_behind(node, through_t: bool) -> int | None:
        if node is None:
            return None
        if through_t:
            if type(node).__name__ != "TBackward0" or uses.get(id(node), 0) != 1:
                return None
            node = node.next_functions[0][0]
        var = getattr(node, "variable", None)
        if var is None or id(var) not in index or uses.get(id(node), 0) != 1:
            return None
        return index[id(var)]

    found = []
    for node in nodes:
        parts = _matmul_parts(node)
        if parts is None:
            continue
        x, w_edge, b_edge = parts
        w = param_behind(w_edge, through_t=True)
        if w is None or x is None or x.dim() != 2 or x.shape[0] != batch:
            continue
        b = param_behind(b_edge, through_t=False) if b_edge is not None else None
        if b is not None and params[b].dim() != 1:
            b = None
        found.append((node, x, w, b))
    return found


def _matmul_parts(node) -> tuple | None:
    """``(input, weight edge, bias edge or None)`` of a plain ``x @ Wᵀ (+ b)`` node, else ``None``."""
    kind = type(node).__name__
    try:
        if kind == "AddmmBackward0":
            if node._saved_alpha != 1 or node._saved_beta != 1:
                return None
            return node._saved_mat1, node.next_functions[2][0], node.next_functions[0][0]
        if kind == "MmBackward0":
            return node._saved_self, node.next_functions[1][0], None
    except (AttributeError, RuntimeError):
        return None
    return None


_VIEWS = frozenset({"AliasBackward0", "ViewBackward0", "UnsafeViewBackward0", "TBackward0"})


def parameter_uses(outputs: tuple[Tensor, ...], params: list[Tensor]) -> list[tuple] | None:
    """Every use of every parameter in the graph of ``outputs``, each one a node whose
    output rows can be cases: ``[(node, kind, param_index, transposed, scale)]`` with ``kind``

    * ``"mm"``: ``Y = A @ (s·P)`` (``AddmmBackward0``/``MmBackward0``, P the parameter or
      its transpose when ``transposed``, reached through views and products with a number
      s, ``scale``), A the node's saved left factor;
    * ``"bias"``: ``Y = X + s·b`` with ``b`` a 1-D parameter broadcast over rows
      (``AddBackward0``, or the bias of ``AddmmBackward0``).

    ``None`` when some parameter is reached any other way (a convolution, a scale, a
    reshaped weight): the per-case Jacobian is then not read from the graph."""
    index = {id(p): i for i, p in enumerate(params)}
    nodes = list(walk(node_of(o) for o in outputs))
    parents: dict[int, list[tuple]] = {}  # node id -> [(parent node, input position)]
    for node in nodes:
        for position, (child, _) in enumerate(node.next_functions):
            if child is not None:
                parents.setdefault(id(child), []).append((node, position))
    leaves = {}
    for node in nodes:
        var = getattr(node, "variable", None)
        if var is not None and id(var) in index:
            leaves[index[id(var)]] = node
    if len(leaves) != len(params):
        return None  # a parameter the outputs do not reach: its columns would be zero, but say so
    uses = []
    for i, leaf in leaves.items():
        stack = [(leaf, False, 1.0)]
        while stack:
            node, transposed, scale = stack.pop()
            for parent, position in parents.get(id(node), []):
                kind = type(parent).__name__
                if kind in _VIEWS:
                    stack.append((parent, transposed ^ (kind == "TBackward0"), scale))
                    continue
                factor = _number(parent) if kind == "MulBackward1" else None  # vmap writes b·1
                if factor is not None:
                    stack.append((parent, transposed, scale * factor))
                    continue
                use = _use_kind(parent, kind, position, params[i], transposed)
                if use is None:
                    return None
                uses.append((parent, use, i, transposed, scale))
    return uses


def _number(node) -> float | None:
    try:
        other = node._saved_other
    except (AttributeError, RuntimeError):
        return None
    if isinstance(other, (int, float)):
        return float(other)
    return float(other) if isinstance(other, Tensor) and other.numel() == 1 and other.dim() == 0 else None


def _use_kind(node, kind: str, position: int, param: Tensor, transposed: bool) -> str | None:
    try:
        if kind == "MmBackward0" and position == 1 or kind == "AddmmBackward0" and position == 2:
            if kind == "AddmmBackward0" and (node._saved_alpha != 1 or node._saved_beta != 1):
                return None
            left = node._saved_self if kind == "MmBackward0" else node._saved_mat1
            if param.dim() != 2 or left.dim() != 2 or left.shape[1] != param.shape[1 if transposed else 0]:
                return None
            return "mm"
        if param.dim() == 1 and not transposed and (
                kind == "AddmmBackward0" and position == 0 and node._saved_beta == 1
                or kind == "AddBackward0" and (position == 0 or node._saved_alpha == 1)):
            return "bias"
    except (AttributeError, RuntimeError):
        return None
    return None


def left_factor(node) -> Tensor:
    """A of a ``"mm"`` use (``Y = A @ P``)."""
    return node._saved_self if type(node).__name__ == "MmBackward0" else node._saved_mat1
