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

The package, one concern a module: :mod:`~torch_hf.curvature.closure` (the closure
contract), :mod:`~torch_hf.curvature.kernels` (the kernel fallback),
:mod:`~torch_hf.curvature.graph` (the one graph walk, the contract checks and layer
discovery), :mod:`~torch_hf.curvature.base` (:class:`CurvatureOperator`),
:mod:`~torch_hf.curvature.ggn`, :mod:`~torch_hf.curvature.hessian`, and
:mod:`~torch_hf.curvature.layers` (per-layer statistics for the preconditioners), and
:mod:`~torch_hf.curvature.capture` (products replayed from a CUDA graph), and
:mod:`~torch_hf.curvature.jacobian` (the outputs' Jacobian read off the graph).
"""
from .base import CurvatureOperator
from .closure import ClosureError, NonFiniteLossError, evaluate_closure
from .ggn import GGN
from .hessian import Hessian
from .kernels import twice_differentiable_kernels

__all__ = ["GGN", "Hessian", "CurvatureOperator", "ClosureError", "NonFiniteLossError", "evaluate_closure",
           "twice_differentiable_kernels"]
