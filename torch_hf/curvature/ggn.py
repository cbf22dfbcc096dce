"""The generalized Gauss-Newton matrix G = Jᵀ L'' J (§6) with cached activations (§7.1)."""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor

from .. import _flat
from ..losses import MatchingLoss, recognize
from .base import CurvatureOperator
from .closure import Closure, ClosureError, as_param_list, evaluate_closure
from .graph import check_loss_through_outputs, check_outputs_independent
from .kernels import build_with_kernel_fallback, kernels
from .layers import layer_backward, squared_vjp

__all__ = ["GGN"]


class GGN(CurvatureOperator):
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
        self.params = as_param_list(params)
        self.recompute = bool(recompute)
        self._closure = closure
        self._extra_hvp = extra_hvp
        self._user_loss_hvp = loss_hvp
        self.safe_kernels = False
        build_with_kernel_fallback(self, self._build, lambda: self._jvp_all(torch.ones_like(self._grad)),
                                    safe_kernels)

    def _build(self) -> None:
        """Evaluate the closure and record g(u) = Jᵀu (the cached activations)."""
        extra_hvp, loss_hvp, closure = self._extra_hvp, self._user_loss_hvp, self._closure
        box: list | None = [] if extra_hvp is not None else None
        loss, outputs = evaluate_closure(closure, need_outputs=True, extras=box, params=self.params)
        assert outputs is not None
        check_outputs_independent(outputs)
        check_loss_through_outputs(loss, outputs, self.params)
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

    @property
    def output_grads(self) -> tuple[Tensor, ...]:
        """∂L/∂z for each output z: the cotangents whose Jᵀ is the gradient (the empirical
        Fisher's per-case gradients are read from them, §11.3)."""
        return self._grad_z

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
        with torch.enable_grad(), kernels(self.safe_kernels):
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
            with torch.no_grad(), fwAD.dual_level(), kernels(self.safe_kernels):
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

    def mm(self, V: Tensor) -> Tensor:
        """G V for a (numel × k) block: J V, L''(J V) and Jᵀ(·) each as one batched pass
        (``is_grads_batched``) through the cached graph on an accelerator. On CPU, and where
        a batched pass is not available (recompute, extras, an op without a batching rule),
        one product per column: there the loop is the faster (a PINN's 257 columns: 0.49 s
        against 0.69 s batched)."""
        if V.dim() != 2 or V.shape[0] != self.numel:
            raise ValueError(f"V must be a ({self.numel} x k) matrix, got {tuple(V.shape)}")
        if self.recompute or self.extras or V.device.type == "cpu":
            return super().mm(V)
        k = V.shape[1]
        try:
            w = self._loss_hvp_columns(self._jv_columns(V))
            with torch.enable_grad():
                g = torch.autograd.grad(self.outputs, self.params, w, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
        except RuntimeError:
            return super().mm(V)
        return _flat.flatten_columns(g, self.params, k)

    def dense(self, chunk: int = 64) -> Tensor:
        """G = (J V)ᵀ L'' (J V) with V = I: the columns of J by forward products only (no
        Jᵀ pass), batched on accelerators, then one matrix product; 0.1 to 0.3 products
        per column on CPU (``benchmarks/dense_solve.py``). With extras, column by column.
        """
        if self.extras:
            return super().dense(chunk)
        n = self.numel
        eye = torch.eye(n, dtype=self._grad.dtype, device=self._grad.device)
        J_blocks, W_blocks = [], []
        for start in range(0, n, chunk):
            V = eye[:, start:start + chunk]
            jv = self._jv_columns(V)
            w = self._loss_hvp_columns(jv)
            J_blocks.append(torch.cat([t.reshape(t.shape[0], -1) for t in jv], dim=1))
            W_blocks.append(torch.cat([t.reshape(t.shape[0], -1) for t in w], dim=1))
        J, W = torch.cat(J_blocks), torch.cat(W_blocks)  # (n × outputs)
        G = J @ W.t()
        return 0.5 * (G + G.t())  # symmetric to rounding, exactly

    def _jv_columns(self, V: Tensor) -> tuple[Tensor, ...]:
        """J V for a block of k columns, each output batched as (k, *output.shape)."""
        k = V.shape[1]
        if not (self.recompute or V.device.type == "cpu"):
            parts = _flat.unflatten_columns(V, self.params)
            try:
                with torch.enable_grad():
                    jv = torch.autograd.grad([g for _, g in self._jt_u_live], self._u,
                                             [parts[i] for i, _ in self._jt_u_live], retain_graph=True,
                                             allow_unused=True, is_grads_batched=True)
                return tuple(o.new_zeros((k, *o.shape)) if t is None else t for o, t in zip(self.outputs, jv))
            except RuntimeError:
                pass
        cols = [self.jvp(V[:, i]) for i in range(k)]
        return tuple(torch.stack([c[j] for c in cols]) for j in range(len(self.outputs)))

    def _loss_hvp_columns(self, jv: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
        """L'' applied to each of k batched output directions: vmapped for a closed form,
        one batched double backward otherwise, a loop where neither is available."""
        try:
            if self.matching_loss is not None or self._user_loss_hvp is not None:
                return tuple(torch.func.vmap(lambda *u: tuple(self.loss_hvp(u)))(*jv))
            with torch.enable_grad():
                w = torch.autograd.grad(self._grad_z, self.outputs, jv, retain_graph=True, allow_unused=True,
                                        is_grads_batched=True)
            return tuple(torch.zeros_like(u) if t is None else t for u, t in zip(jv, w))
        except RuntimeError:
            pass
        k = jv[0].shape[0]
        cols = [self.loss_hvp(tuple(t[i] for t in jv)) for i in range(k)]
        return tuple(torch.stack([c[j] for c in cols]) for j in range(len(self.outputs)))

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
        return squared_vjp(self._graph_outputs()[0], self.params, c)

    def layer_vjp(self, cotangents: Tensor | Sequence[Tensor],
                  on_layer: Callable[[Tensor, Tensor, int, int | None], None]) -> tuple[Tensor | None, ...]:
        """Jᵀ c per parameter (``None`` where unused), calling ``on_layer(x, delta, w, b)``
        for every linear layer applied once to a (cases × features) input ``x``: ``delta``
        is the cotangent of the layer's output and ``w`` / ``b`` index its weight and bias
        (``b`` may be ``None``) in ``params``. The Kronecker factors of K-FAC are read there."""
        c = self._as_output_tuple(cotangents, "cotangents")
        return layer_backward(self._graph_outputs()[0], self.params, c, on_layer)

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
