"""Curvature-matrix-vector products with cached activations (§5, §6, §7.1).

Two linear operators on flat parameter vectors (the layout of
:func:`torch.nn.utils.parameters_to_vector`):

* :class:`GGN` — the generalized Gauss-Newton matrix G = Jᵀ L'' J of §6, where J is
  the Jacobian of the closure's ``outputs`` w.r.t. the parameters and L'' the
  Hessian of the loss w.r.t. those outputs.
* :class:`Hessian` — the exact Hessian H = ∇²f of §5.

Both evaluate the closure **once** at construction and keep its autograd graph
(the activations, §7.1 "activation caching"); every product afterwards is a
backward pass through that cached graph, never a new forward pass.

How the GGN products work (no module or functional form of the model needed):
with ``u`` a dummy cotangent that requires grad, ``g(u) = Jᵀ u`` is built once by
a backward pass with ``create_graph=True``. Evaluated at ``u = ∂L/∂z`` it *is* the
gradient, and since ``g`` is linear in ``u``, differentiating ``⟨g(u), v⟩`` w.r.t.
``u`` gives ``J v`` (the "double-backward" forward-mode product). So

* ``jvp(v) = J v``: one backward through the recorded backward graph,
* ``vjp(u) = Jᵀ u``: one backward through the forward graph,
* ``loss_hvp(u) = L'' u``: closed form for the matching losses of Table 2
  (:mod:`torch_hf.losses`), otherwise double backward through the loss head,
* ``mv(v) = Jᵀ (L'' (J v))``.

``benchmarks/curvature_cost.py`` measures this against ``torch.func.linearize`` +
``torch.func.vjp`` on the same model and against the uncached product.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterable, Iterator, Sequence

import torch
from torch import Tensor

from . import _flat
from .losses import MatchingLoss, recognize

__all__ = ["GGN", "Hessian", "ClosureError", "NonFiniteLossError", "evaluate_closure",
           "twice_differentiable_kernels"]

logger = logging.getLogger("torch_hf")

Closure = Callable[[], "Tensor | tuple[Tensor, Tensor | Sequence[Tensor]]"]


class ClosureError(ValueError):
    """The closure broke the contract of ``closure() -> (loss, outputs)``."""


class NonFiniteLossError(FloatingPointError):
    """The closure returned a loss that is NaN or infinite."""


def _as_param_list(params: Iterable[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params must be an iterable of tensors, not a single tensor")
    plist = [p for p in params]
    for p in plist:
        if not isinstance(p, Tensor):
            raise TypeError(f"params must contain tensors, got {type(p).__name__}")
    plist = [p for p in plist if p.requires_grad]
    if not plist:
        raise ValueError("no parameter requires grad: nothing to differentiate")
    return plist


_CLOSURE_CONTRACT = """HessianFree differentiates the closure itself: it must not call backward(), and it returns the network outputs with the loss.
The usual PyTorch closure

    def closure():
        optimizer.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        return loss

becomes

    def closure():
        outputs = model(x)
        return loss_fn(outputs, y), outputs"""


def _grad_signature(params: Sequence[Tensor] | None) -> list:
    return [] if params is None else [None if p.grad is None else (id(p.grad), p.grad._version) for p in params]


def evaluate_closure(closure: Closure, need_outputs: bool, extras: list | None = None,
                     params: Sequence[Tensor] | None = None) -> tuple[Tensor, tuple[Tensor, ...] | None]:
    """Call ``closure`` with grad enabled and check what it returned.

    Returns ``(loss, outputs)`` with ``outputs`` normalised to a tuple (or ``None``
    when the closure returned only the loss and ``need_outputs`` is false). With a list
    ``extras``, the closure must return ``(loss, outputs, extra_outputs)`` (structural
    damping's hidden states, §8.4) and the extra outputs, as a tuple, are appended to it.
    With ``params``, a closure that calls ``backward()`` (the standard PyTorch closure) is
    caught by the change of their ``.grad`` and told the contract.
    """
    if not callable(closure):
        raise TypeError(f"closure must be callable, got {type(closure).__name__}")
    before = _grad_signature(params)
    with torch.enable_grad():
        result = closure()
    if params is not None and _grad_signature(params) != before:
        raise ClosureError("the closure changed the parameters' .grad (it called backward() or zero_grad()). "
                           + _CLOSURE_CONTRACT)
    if extras is not None:
        if not (isinstance(result, (tuple, list)) and len(result) == 3):
            raise ClosureError("with structural damping the closure must return (loss, outputs, hidden_states); "
                               f"got {type(result).__name__}"
                               + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else ""))
        hidden = result[2]
        hidden = (hidden,) if isinstance(hidden, Tensor) else tuple(hidden)
        if not hidden or not all(isinstance(h, Tensor) and h.requires_grad for h in hidden):
            raise ClosureError("hidden_states must be a tensor or a tuple of tensors that depend on the parameters")
        extras.append(hidden)
        result = result[:2]
    if isinstance(result, Tensor):
        loss, outputs = result, None
    elif isinstance(result, (tuple, list)) and len(result) == 2:
        loss, outputs = result
    else:
        raise ClosureError(
            "closure must return (loss, outputs) or, for curvature='hessian', the loss alone; "
            f"got {type(result).__name__}" + (f" of length {len(result)}" if isinstance(result, (tuple, list)) else "")
        )
    if not isinstance(loss, Tensor):
        raise ClosureError(f"the loss returned by the closure must be a tensor, got {type(loss).__name__}")
    if loss.numel() != 1:
        swapped = isinstance(outputs, Tensor) and outputs.numel() == 1
        raise ClosureError(f"the loss must be a scalar, got a tensor of shape {tuple(loss.shape)}"
                           + (". The second item is a scalar: the closure seems to return (outputs, loss); "
                              "return (loss, outputs), the loss first" if swapped else ""))
    if loss.dim() != 0:
        loss = loss.reshape(())
    if not bool(torch.isfinite(loss)):
        raise NonFiniteLossError(f"the closure returned a non-finite loss ({loss.item()})")
    if not loss.requires_grad:
        raise ClosureError("the loss does not depend on the parameters (it has no autograd graph)")
    if outputs is None:
        if need_outputs:
            raise ClosureError("curvature='ggn' needs the network outputs: the closure returned only the loss. "
                               + _CLOSURE_CONTRACT)
        return loss, None
    if isinstance(outputs, Tensor):
        outputs = (outputs,)
    elif isinstance(outputs, (tuple, list)) and outputs and all(isinstance(o, Tensor) for o in outputs):
        outputs = tuple(outputs)
    else:
        raise ClosureError("outputs must be a tensor or a non-empty tuple of tensors")
    for i, out in enumerate(outputs):
        if not out.requires_grad:
            raise ClosureError(f"output {i} does not depend on the parameters (requires_grad is False)")
    return loss, outputs


@contextlib.contextmanager
def twice_differentiable_kernels() -> Iterator[None]:
    """Run the enclosed closure calls with kernels whose backward pass can itself be
    differentiated, as every curvature product needs (§7.1's cached products differentiate
    the recorded backward; the Hessian differentiates the gradient):

    * attention through :func:`torch.nn.functional.scaled_dot_product_attention` uses the
      math backend (the flash and memory-efficient kernels have no double backward);
    * cuDNN is off (its RNN backward has no derivative; LSTM and GRU fall back to the
      native kernels, which have one);
    * ``torch.compile``'d modules and functions run eagerly (AOTAutograd has no double
      backward; needs ``torch.compiler.set_stance``, torch ≥ 2.6).

    Trial-point evaluations stay outside, with the fast kernels. :class:`GGN` and
    :class:`Hessian` enter this context by themselves when a first product fails without it.
    """
    with contextlib.ExitStack() as stack:
        try:
            from torch.nn.attention import SDPBackend, sdpa_kernel

            stack.enter_context(sdpa_kernel(SDPBackend.MATH))
        except ImportError:  # torch < 2.2
            stack.enter_context(torch.backends.cuda.sdp_kernel(enable_flash=False, enable_mem_efficient=False,
                                                               enable_math=True))
        set_stance = getattr(torch.compiler, "set_stance", None)
        if set_stance is not None:
            stack.enter_context(set_stance("force_eager"))
        cudnn_was = torch.backends.cudnn.enabled
        torch.backends.cudnn.enabled = False
        try:
            yield
        finally:
            torch.backends.cudnn.enabled = cudnn_was


def _kernels(safe: bool):
    return twice_differentiable_kernels() if safe else contextlib.nullcontext()


_COMPILE_HINT = (
    "HF differentiates the closure's backward pass (every curvature product is a derivative of the "
    "gradient), and a torch.compile'd module has no double backward{why}. Call the uncompiled module "
    "in the closure (model._orig_mod for model = torch.compile(m)), or use torch >= 2.6, where torch_hf "
    "runs compiled code eagerly for the curvature operator and compiled for trial points."
)


def _build_with_kernel_fallback(op, build: Callable[[], None], probe: Callable[[], object],
                                safe_kernels: bool | None) -> None:
    """Build a curvature operator; with ``safe_kernels=None`` try the closure's own kernels
    first and rebuild under :func:`twice_differentiable_kernels` when a first product
    (``probe``) fails for want of a double backward. Sets ``op.safe_kernels``."""
    if safe_kernels is not None:
        op.safe_kernels = bool(safe_kernels)
        with _kernels(op.safe_kernels):
            build()
        return
    op.safe_kernels = False
    try:
        build()
        probe()
        return
    except torch.cuda.OutOfMemoryError:
        raise  # no kernel choice helps; don't run the closure again
    except (RuntimeError, NotImplementedError) as exc:  # raised by the build too (compiled backward)
        first = exc
    op.safe_kernels = True
    try:
        with twice_differentiable_kernels():
            build()
        probe()
    except (RuntimeError, NotImplementedError) as exc:
        text = f"{first} {exc}"
        if "compile" in text or "aot_autograd" in text:
            raise ClosureError(_COMPILE_HINT.format(why=f" ({str(exc).splitlines()[0]})")) from exc
        raise
    logger.info("torch_hf: the closure's kernels have no double backward (%s); the curvature operator "
                "evaluates it with twice-differentiable ones", str(first).splitlines()[0][:160])


def _node(t: Tensor):
    """The autograd node gradients of ``t`` flow into (AccumulateGrad for leaves)."""
    if t.grad_fn is not None:
        return t.grad_fn
    return torch.autograd.graph.get_gradient_edge(t).node


def _check_outputs_independent(outputs: tuple[Tensor, ...]) -> None:
    """Raise when one output is computed from another (L'' would be taken wrongly)."""
    if len(outputs) < 2:
        return
    edges = [(_node(o), getattr(o, "output_nr", 0)) for o in outputs]
    seen_edges: dict[tuple[int, int], int] = {}
    for i, (n, nr) in enumerate(edges):
        key = (id(n), nr)
        if key in seen_edges:
            raise ClosureError(
                f"outputs {seen_edges[key]} and {i} are the same tensor: pass each output once"
            )
        seen_edges[key] = i
    targets = {id(n): i for i, (n, _) in enumerate(edges)}
    # One DFS from all children of all output nodes: reaching an output node means
    # that output feeds another one.
    stack = [c for n, _ in edges for c, _ in n.next_functions if c is not None]
    visited: set[int] = set()
    alive = [n for n, _ in edges]  # ids of node wrappers are only unique while they live
    while stack:
        node = stack.pop()
        if id(node) in visited:
            continue
        visited.add(id(node))
        alive.append(node)
        if id(node) in targets:
            raise ClosureError(
                f"output {targets[id(node)]} is used to compute another output; the GGN treats the "
                "outputs as independent coordinates, so return only outputs that are not computed "
                "from each other (e.g. logits and hidden states, not logits and softmax(logits))"
            )
        stack.extend(c for c, _ in node.next_functions if c is not None)


def _check_loss_through_outputs(loss: Tensor, outputs: tuple[Tensor, ...], params: list[Tensor]) -> None:
    """Raise when the loss reaches a parameter other than through the outputs."""
    stop_nodes = [_node(o) for o in outputs]  # kept alive: ids of node wrappers can be reused
    stop = {id(n) for n in stop_nodes}
    param_ids = {id(p) for p in params}
    stack = [loss.grad_fn]
    visited: set[int] = set()
    alive: list = []
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited or id(node) in stop:
            continue
        visited.add(id(node))
        alive.append(node)
        var = getattr(node, "variable", None)
        if var is not None and id(var) in param_ids:
            raise ClosureError(
                "the loss depends on the parameters other than through the outputs (e.g. an L2 "
                "penalty inside the closure); pass weight_decay= to the optimizer instead, or "
                "return the extra term's input as an output"
            )
        stack.extend(c for c, _ in node.next_functions)


class _CurvatureBase:
    params: list[Tensor]
    _loss: Tensor
    _grad: Tensor

    @property
    def loss(self) -> Tensor:
        """The loss of the closure evaluation this operator was built from (detached)."""
        return self._loss

    @property
    def grad(self) -> Tensor:
        """The flat gradient ∇f of that evaluation (detached)."""
        return self._grad

    @property
    def numel(self) -> int:
        return self._grad.numel()

    def _check_vector(self, v: Tensor, name: str = "v") -> None:
        if not isinstance(v, Tensor) or v.dim() != 1 or v.numel() != self.numel:
            shape = tuple(v.shape) if isinstance(v, Tensor) else type(v).__name__
            raise ValueError(f"{name} must be a flat vector of {self.numel} entries, got {shape}")

    def mv(self, v: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __matmul__(self, v: Tensor) -> Tensor:
        return self.mv(v)

    def dense(self) -> Tensor:
        """The whole matrix, column by column (tiny models only: n products)."""
        n = self.numel
        eye = torch.eye(n, dtype=self._grad.dtype, device=self._grad.device)
        return torch.stack([self.mv(eye[i]) for i in range(n)], dim=1)


class GGN(_CurvatureBase):
    r"""Generalized Gauss-Newton operator G = Jᵀ L'' J (§6) with cached activations (§7.1).

    Args:
        params: the parameters (tensors with ``requires_grad``; others are skipped).
        closure: takes no arguments and returns ``(loss, outputs)`` where ``outputs``
            is a tensor or a tuple of tensors, ``loss`` depends on the parameters only
            through ``outputs`` and is convex in them (fold the output nonlinearity into
            the loss, §6.2). No ``backward()`` inside.
        loss_hvp: optional ``(u_1, ..., u_k) -> (L''u)_1, ..., (L''u)_k`` overriding the
            output Hessian (declared closed form). By default a recognised matching
            loss (:mod:`torch_hf.losses`) uses its closed form, anything else exact
            double backward.
        extra_hvp: for structural damping (§8.4, :class:`torch_hf.damping.Structural`):
            the closure then returns ``(loss, outputs, extras)`` (e.g. hidden states),
            and the operator becomes Jᵀ L'' J + J_eᵀ E J_e with ``E u = extra_hvp(u, extras)``
            (``u`` and ``extras`` tuples shaped like the extras),
            computed in the same two passes per product (the extras join the outputs
            as coordinates the loss does not use).
        recompute: cache nothing (§7.1's memory-saving alternative): every product
            re-runs the closure — J v by forward-mode AD with no graph, Jᵀ w by one
            reverse pass — so a model unrolled with ``torch_hf.nn.unroll(...,
            checkpoint="sqrt")`` holds O(√T) states during CG instead of all T steps'
            activations. The closure must be deterministic (no dropout). About 1.5–2×
            the time of a cached product.
        safe_kernels: evaluate the closure under :func:`twice_differentiable_kernels`
            (math attention, no cuDNN, compiled code run eagerly). ``None`` (default):
            only when a first product with the closure's own kernels fails for want of a
            double backward — fused attention, cuDNN RNNs, ``torch.compile``; the
            attribute ``safe_kernels`` then tells which was used.

    Without ``recompute`` the closure is evaluated once, here. ``mv``, ``jvp``, ``vjp`` and ``loss_hvp`` then
    reuse its activations. Vectors over parameters are flat; vectors over outputs are
    tuples shaped like the outputs.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        closure: Closure,
        loss_hvp: Callable[..., Sequence[Tensor]] | None = None,
        extra_hvp: Callable[..., Sequence[Tensor]] | None = None,
        recompute: bool = False,
        safe_kernels: bool | None = None,
    ) -> None:
        self.params = _as_param_list(params)
        self.recompute = bool(recompute)
        self._closure = closure
        self._extra_hvp = extra_hvp
        self._user_loss_hvp = loss_hvp
        self.safe_kernels = False
        _build_with_kernel_fallback(self, self._build, lambda: self._jvp_all(torch.ones_like(self._grad)),
                                    safe_kernels)

    def _build(self) -> None:
        """Evaluate the closure and record g(u) = Jᵀu (the cached activations)."""
        extra_hvp, loss_hvp, closure = self._extra_hvp, self._user_loss_hvp, self._closure
        box: list | None = [] if extra_hvp is not None else None
        loss, outputs = evaluate_closure(closure, need_outputs=True, extras=box, params=self.params)
        assert outputs is not None
        _check_outputs_independent(outputs)
        _check_loss_through_outputs(loss, outputs, self.params)
        self.outputs = outputs
        self.extras: tuple[Tensor, ...] = box[0] if box else ()
        self.matching_loss: MatchingLoss | None = None
        if loss_hvp is None and len(outputs) == 1:
            self.matching_loss = recognize(loss, outputs[0])
        need_head_graph = loss_hvp is None and self.matching_loss is None
        with torch.enable_grad():
            grad_z = torch.autograd.grad(loss, outputs, create_graph=need_head_graph, allow_unused=True)
            grad_z = tuple(torch.zeros_like(o) if g is None else g for o, g in zip(outputs, grad_z))
            self._grad_z = grad_z
            # g(u) = Jᵀ u, recorded so that d⟨g(u), v⟩/du = J v; at u = ∂L/∂z it is ∇f.
            # The extras' cotangents are zero at the gradient, so g(u) is still ∇f there.
            self._u = tuple(g.detach().requires_grad_(True) for g in grad_z) + tuple(
                torch.zeros_like(e).requires_grad_(True) for e in self.extras)
            if self.recompute:  # the gradient only; the network's saved tensors are freed here
                jt_u = torch.autograd.grad(outputs + self.extras, self.params, self._u, allow_unused=True)
                live = [i for i, g in enumerate(jt_u) if g is not None]
                if not live:
                    raise ClosureError("the outputs do not depend on any of the parameters")
                self._grad = _flat.flatten(jt_u, self.params)
                self._loss = loss.detach()
                self._jt_u_live = []
                return
            jt_u = torch.autograd.grad(outputs + self.extras, self.params, self._u, create_graph=True,
                                       allow_unused=True)
        self._jt_u_live = [(i, g) for i, g in enumerate(jt_u) if g is not None and g.requires_grad]
        if not self._jt_u_live:
            raise ClosureError("the outputs do not depend on any of the parameters")
        self._grad = _flat.flatten([None if g is None else g.detach() for g in jt_u], self.params)
        self._loss = loss.detach()

    # -- the factors of G ---------------------------------------------------------
    def jvp(self, v: Tensor) -> tuple[Tensor, ...]:
        """J v: the change of each output along the flat parameter direction ``v``."""
        return self._jvp_all(v)[: len(self.outputs)]

    def extras_jvp(self, v: Tensor) -> tuple[Tensor, ...]:
        """J_e v for the extra outputs (structural damping's hidden states)."""
        return self._jvp_all(v)[len(self.outputs):]

    def _jvp_all(self, v: Tensor) -> tuple[Tensor, ...]:
        self._check_vector(v)
        parts = _flat.unflatten(v, self.params)
        if self.recompute:
            return self._forward_mode_jvp(parts)
        live = [g for _, g in self._jt_u_live]
        with torch.enable_grad():
            jv = torch.autograd.grad(
                live, self._u, [parts[i] for i, _ in self._jt_u_live], retain_graph=True, allow_unused=True
            )
        return tuple(torch.zeros_like(o) if t is None else t for o, t in zip(self.outputs + self.extras, jv))

    def vjp(self, u: Tensor | Sequence[Tensor]) -> Tensor:
        """Jᵀ u as a flat parameter vector, for ``u`` shaped like the outputs."""
        u = self._as_output_tuple(u, "u")
        outputs, _ = self._graph_outputs()
        with torch.enable_grad():
            g = torch.autograd.grad(outputs, self.params, u, retain_graph=not self.recompute, allow_unused=True)
        return _flat.flatten(g, self.params)

    def _graph_outputs(self) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Outputs and extras with a live graph: the cached ones, or a fresh forward pass."""
        if not self.recompute:
            return self.outputs, self.extras
        with torch.enable_grad(), _kernels(self.safe_kernels):
            return self._split(self._closure())

    def _split(self, result) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Outputs and extras of a recomputed closure call. The closure passed the full
        checks of :func:`evaluate_closure` once, in ``__init__``; they are not repeated per
        product (the finite-loss check would cost a host synchronisation each time)."""
        if not isinstance(result, (tuple, list)) or len(result) != (3 if self.extras else 2):
            raise ClosureError("the closure changed what it returns between calls")
        outputs = (result[1],) if isinstance(result[1], Tensor) else tuple(result[1])
        extras = ()
        if self.extras:
            extras = (result[2],) if isinstance(result[2], Tensor) else tuple(result[2])
        return outputs, extras

    def _forward_mode_jvp(self, parts: list[Tensor]) -> tuple[Tensor, ...]:
        """J v by forward-mode AD: the parameters become dual tensors in place (same
        values), the closure runs once with no autograd graph, the outputs' tangents are
        J v; leaving the dual level drops the tangents again."""
        import torch.autograd.forward_ad as fwAD

        versions = [p._version for p in self.params]
        try:
            with torch.no_grad(), fwAD.dual_level(), _kernels(self.safe_kernels):
                for p, t in zip(self.params, parts):
                    p.copy_(fwAD.make_dual(p.detach().clone(), t))
                outputs, extras = self._split(self._closure())
                tangents = [fwAD.unpack_dual(o).tangent for o in outputs + extras]
                return tuple(torch.zeros_like(o) if t is None else t.clone() for o, t in
                             zip(self.outputs + self.extras, tangents))
        finally:
            # The values were rewritten bit for bit: put the version counters back, so
            # graphs that saved the parameters (other operators, the user's) stay usable.
            reset = getattr(torch._C._autograd, "_unsafe_set_version_counter", None)
            if reset is not None:
                reset(tuple(self.params), tuple(versions))

    def loss_hvp(self, u: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...]:
        """L'' u: the loss Hessian w.r.t. the outputs times ``u`` (shaped like the outputs)."""
        u = self._as_output_tuple(u, "u")
        if self._user_loss_hvp is not None:
            out = self._user_loss_hvp(*u)
            return self._as_output_tuple(out, "loss_hvp's result")
        if self.matching_loss is not None:
            return (self.matching_loss.hvp(u[0]),)
        with torch.enable_grad():
            out = torch.autograd.grad(self._grad_z, self.outputs, u, retain_graph=True, allow_unused=True)
        return tuple(torch.zeros_like(o) if t is None else t for o, t in zip(self.outputs, out))

    def mv(self, v: Tensor) -> Tensor:
        """G v = Jᵀ (L'' (J v)) (+ J_eᵀ E J_e v with extras) with no forward pass."""
        if not self.extras:
            return self.vjp(self.loss_hvp(self.jvp(v)))
        jv = self._jvp_all(v)
        n = len(self.outputs)
        ev = tuple(self._extra_hvp(jv[n:], self.extras))
        w = self.loss_hvp(jv[:n]) + ev
        outputs, extras = self._graph_outputs()
        with torch.enable_grad():
            g = torch.autograd.grad(outputs + extras, self.params, w, retain_graph=not self.recompute,
                                    allow_unused=True)
        return _flat.flatten(g, self.params)

    def loss_sqrt_hvp(self, v: Tensor | Sequence[Tensor]) -> tuple[Tensor, ...] | None:
        """S v with S Sᵀ = L'' (for §11.4's estimator), or ``None`` without a closed form."""
        if self.matching_loss is None:
            return None
        v = self._as_output_tuple(v, "v")
        return (self.matching_loss.sqrt_hvp(v[0]),)

    def squared_vjp(self, cotangents: Tensor | Sequence[Tensor]) -> tuple[Tensor, Tensor]:
        """Sum over cases of the squared per-case parts of Jᵀ c (§11.3–11.4).

        For a cotangent ``c`` whose first dimension indexes the cases, returns
        ``(d, per_case)`` where, for parameters of a linear layer applied once to a
        (cases × features) input, ``d = Σ_i sq(J_iᵀ c_i)`` is computed from the layer's
        input and output gradient as in Algorithm 6 (no per-case storage), and for all
        other parameters ``d = sq(Jᵀ c)`` of the whole batch. ``per_case`` is a boolean
        flat mask telling which entries are the per-case sums.
        """
        c = self._as_output_tuple(cotangents, "cotangents")
        return _squared_vjp(self._graph_outputs()[0], self.params, c)

    def layer_vjp(self, cotangents: Tensor | Sequence[Tensor],
                  on_layer: Callable[[Tensor, Tensor, int, int | None], None]) -> tuple[Tensor | None, ...]:
        """Jᵀ c per parameter (``None`` where unused), calling ``on_layer(x, delta, w, b)``
        for every linear layer applied once to a (cases × features) input ``x``: ``delta``
        is the cotangent of the layer's output and ``w`` / ``b`` index its weight and bias
        (``b`` may be ``None``) in ``params``. The Kronecker factors of K-FAC are read there."""
        c = self._as_output_tuple(cotangents, "cotangents")
        return _layer_backward(self._graph_outputs()[0], self.params, c, on_layer)

    def _as_output_tuple(self, u, name: str) -> tuple[Tensor, ...]:
        if isinstance(u, Tensor):
            u = (u,)
        u = tuple(u)
        if len(u) != len(self.outputs) or any(a.shape != o.shape for a, o in zip(u, self.outputs)):
            raise ValueError(
                f"{name} must match the outputs' shapes {[tuple(o.shape) for o in self.outputs]}, "
                f"got {[tuple(a.shape) for a in u]}"
            )
        return u


def _linear_layers(outputs: tuple[Tensor, ...], params: list[Tensor], batch: int):
    """Find ``addmm``/``mm`` nodes of linear layers whose weight (and bias) are used only
    there and whose input rows are the cases. Returns ``[(node, input, weight_index,
    bias_index or None)]``."""
    index = {id(p): i for i, p in enumerate(params)}
    uses: dict[int, int] = {}
    nodes = []
    stack = [_node(o) for o in outputs]
    visited: set[int] = set()
    while stack:
        node = stack.pop()
        if node is None or id(node) in visited:
            continue
        visited.add(id(node))
        nodes.append(node)
        for child, _ in node.next_functions:
            if child is not None:
                uses[id(child)] = uses.get(id(child), 0) + 1
                stack.append(child)

    def param_behind(node, through_t: bool):
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
        kind = type(node).__name__
        try:
            if kind == "AddmmBackward0":
                x, w_edge, b_edge = node._saved_mat1, node.next_functions[2][0], node.next_functions[0][0]
                if node._saved_alpha != 1 or node._saved_beta != 1:
                    continue
            elif kind == "MmBackward0":
                x, w_edge, b_edge = node._saved_self, node.next_functions[1][0], None
            else:
                continue
        except (AttributeError, RuntimeError):
            continue
        w = param_behind(w_edge, through_t=True)
        if w is None or x is None or x.dim() != 2 or x.shape[0] != batch:
            continue
        b = param_behind(b_edge, through_t=False) if b_edge is not None else None
        if b is not None and params[b].dim() != 1:
            b = None
        found.append((node, x, w, b))
    return found


def _layer_backward(outputs: tuple[Tensor, ...], params: list[Tensor], c: tuple[Tensor, ...],
                    on_layer: Callable[[Tensor, Tensor, int, int | None], None]) -> tuple[Tensor | None, ...]:
    """Jᵀ c for every parameter, calling ``on_layer(x, delta, weight_index, bias_index)``
    on the way for each linear layer applied once to a (cases × features) input ``x``,
    with ``delta`` the cotangent of its output (cases × out): the per-case factors of
    the layer's gradient, J_iᵀ c_i = delta_i ⊗ x_i (Algorithm 6's structure)."""
    batch = outputs[0].shape[0] if outputs[0].dim() > 0 else 1
    handles = []

    def make_hook(x, w, b):
        def hook(grad_outputs):
            if grad_outputs[0] is not None:
                on_layer(x, grad_outputs[0], w, b)
            return None
        return hook

    for node, x, w, b in _linear_layers(outputs, params, batch):
        handles.append(node.register_prehook(make_hook(x, w, b)))
    try:
        with torch.enable_grad():
            return torch.autograd.grad(outputs, params, c, retain_graph=True, allow_unused=True)
    finally:
        for h in handles:
            h.remove()


def _squared_vjp(outputs: tuple[Tensor, ...], params: list[Tensor], c: tuple[Tensor, ...]) -> tuple[Tensor, Tensor]:
    per_case: dict[int, Tensor] = {}

    def on_layer(x, delta, w, b):
        d2 = delta.square()
        per_case[w] = d2.t() @ x.square()
        if b is not None:
            per_case[b] = d2.sum(0)

    grads = _layer_backward(outputs, params, c, on_layer)
    parts, mask = [], []
    for i, (p, g) in enumerate(zip(params, grads)):
        if i in per_case:
            parts.append(per_case[i].reshape(-1))
            mask.append(torch.ones(p.numel(), dtype=torch.bool, device=p.device))
        else:
            parts.append(torch.zeros(p.numel(), dtype=p.dtype, device=p.device) if g is None else g.square().reshape(-1))
            mask.append(torch.zeros(p.numel(), dtype=torch.bool, device=p.device))
    return torch.cat(parts), torch.cat(mask)


class Hessian(_CurvatureBase):
    r"""Exact Hessian operator H = ∇²f (§5) with the gradient graph cached.

    The gradient is computed once with ``create_graph=True``; each ``mv(v)`` is then
    one backward pass through that graph (Hv = ∂⟨∇f, v⟩/∂θ, the same product as
    Pearlmutter's R-operator, evaluated reverse-over-reverse). H may be indefinite.

    Args:
        params: the parameters.
        closure: returns ``loss`` or ``(loss, outputs)`` (the outputs take no part in the
            products; they are kept, detached, as ``outputs`` so that callers can compare
            batch sizes as they do with :class:`GGN`).
        safe_kernels: as for :class:`GGN`.
    """

    def __init__(self, params: Iterable[Tensor], closure: Closure, safe_kernels: bool | None = None) -> None:
        self.params = _as_param_list(params)
        self._closure = closure
        self.safe_kernels = False
        _build_with_kernel_fallback(self, self._build, lambda: self.mv(torch.ones_like(self._grad)), safe_kernels)

    def _build(self) -> None:
        loss, outputs = evaluate_closure(self._closure, need_outputs=False, params=self.params)
        self.outputs = tuple(o.detach() for o in outputs or ())
        with torch.enable_grad():
            grads = torch.autograd.grad(loss, self.params, create_graph=True, allow_unused=True)
        self._live = [(i, g) for i, g in enumerate(grads) if g is not None and g.requires_grad]
        self._grad = _flat.flatten([None if g is None else g.detach() for g in grads], self.params)
        self._loss = loss.detach()

    def mv(self, v: Tensor) -> Tensor:
        """H v with no forward pass."""
        self._check_vector(v)
        if not self._live:
            return torch.zeros_like(v)
        parts = _flat.unflatten(v, self.params)
        with torch.enable_grad():
            hv = torch.autograd.grad(
                [g for _, g in self._live], self.params, [parts[i] for i, _ in self._live],
                retain_graph=True, allow_unused=True,
            )
        return _flat.flatten(hv, self.params)
