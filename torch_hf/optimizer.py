"""The Hessian-free optimizer: Algorithm 3 of Martens & Sutskever (2012).

One call of :meth:`HessianFree.step` is one HF iteration:

1. f(θ) and b = −∇f(θ) on the closure's batch S (§12);
2. the curvature operator B (GGN, §6, or Hessian, §5) on S, or on a second batch S'
   given by ``curvature_closure`` (§12.1), its activations cached for all of CG (§7.1);
3. damping λD (§8) and preconditioner P (§11) for this step;
4. δ ← PCG(b, A = B + λD + ηI, x₀ = ζ·δ₍k−1₎, P) (Alg. 2, §10), with η the weight decay;
5. CG-backtracking: the saved iterate with the lowest f (§8.7);
6. ρ = (f(θ+δ) − f(θ)) / M(δ), M the undamped quadratic model (§8.5, eq. 10), and the
   Levenberg-Marquardt update of λ;
7. Armijo backtracking line search f(θ+αδ) ≤ f(θ) + c·α·∇fᵀδ as the last defence (§8.8);
8. θ ← θ + lr·α·δ.

The phases are functions in :mod:`torch_hf.evaluation` and :mod:`torch_hf.phases`, the
damped system :class:`torch_hf.damped.DampedOperator`, the settings :mod:`torch_hf.config`
(docs/design.md has the map).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import time
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _flat
from ._denormals import _denormals_flushed, _flushing_denormals  # noqa: F401 - recipes and tests import them here
from .checkpoint import STATE_VERSION, load_own_state, own_state, split_state_dict  # noqa: F401
from .config import GROUP_KEYS, CGConfig, LineSearchConfig, check_options, check_parts
from .curvature import GGN, CurvatureOperator, Hessian
from .cg import CGResult
from .curvature.capture import CapturedProduct
from .curvature.jacobian import GRAPH_JACOBIAN_MAX_ENTRIES, graph_jacobian
from .damped import DampedOperator, WeightDecay
from .damping import Damping, DampingContext, Tikhonov
from . import regime
from .dense import (DENSE_PRODUCTS_PER_COLUMN, GAUSS_NEWTON_DAMPING, GAUSS_NEWTON_FALLBACK_ALPHA,
                    GAUSS_NEWTON_LINE_SEARCH, SKETCH_STOCHASTIC_TOLERANCE, SKETCH_TOLERANCE,
                    SketchedSolver, centred_step, dense_matrix, dense_solve, gram, output_hessian_scale, residual_solve)
from .diagnostics import StepDiagnostics, record
from .distributed import Reducer, resolve_process_group
from .evaluation import Evaluation, TrialCall, blame, evaluate, first_cases
from .nn import OffloadActivations
from .phases import (TrialObjective, backtrack, cg_backtracking, line_search, overhead_iterations,  # noqa: F401
                     reduction_ratio, solve)
from .preconditioners import GGNDiagonal, Identity, Preconditioner
from .stall import judge_stall, stall_verdict

__all__ = ["HessianFree", "StepDiagnostics", "cg_backtracking"]

logger = logging.getLogger("torch_hf")



class HessianFree(torch.optim.Optimizer):
    r"""Hessian-free optimization (Martens 2010; Martens & Sutskever 2012, Alg. 3).

    Args:
        params: iterable of parameters or of parameter groups. Only ``weight_decay``
            may differ between groups; HF solves one joint quadratic, so other options
            must be equal in all groups.
        curvature: ``"ggn"`` (generalized Gauss-Newton, §6, PSD; the default),
            ``"hessian"`` (exact Hessian, §5; may be indefinite), or a
            :class:`torch_hf.curvature.CurvatureOperator` subclass built as
            ``cls(params, closure, safe_kernels=...)`` (docs/design.md).
        damping: a :mod:`torch_hf.damping` object; ``Tikhonov(init=1.0)`` adapted by the
            Levenberg-Marquardt rule by default.
        preconditioner: a :mod:`torch_hf.preconditioners` object; ``GGNDiagonal(0.75)``
            by default (§11.4, the recipe of §13).
        lr: multiplier of the final update (1.0; lowering it late in training is one of
            §12.2's remedies for minibatch overfitting).
        weight_decay: η of the penalty (η/2)‖θ‖², added exactly to f, ∇f and B (§13).
        cg_max_iters: most CG iterations per step (§8.7: 250).
        cg_min_iters: fewest CG iterations before progress termination.
        cg_tol: relative-progress threshold of §4.
        cg_stop: ``"auto"`` (default): ``"progress"`` once the objective is measured to be
            deterministic (full batch, :mod:`torch_hf.regime`), ``"rate"`` until then and on
            a stochastic one. ``"rate"``: CG also stops once its model decrease per
            iteration falls below the step's average per unit of cost, the rest of the
            step counted in products from the batch sizes (:mod:`torch_hf.cg`; §4's
            economical truncation, more updates per second with minibatches).
            ``"progress"``: the paper's rule alone (precise full-batch fits gain from it).
        cg_decay: ζ, CG starts from ζ·δ₍k−1₎ (§10: 0.95; 0 starts from zero). Where the
            step is solved exactly in residual space on a stochastic objective, its damping
            is centred there instead: δ minimises the Gauss-Newton model plus
            ½λ‖δ − ζδ₍k−1₎‖² (:func:`torch_hf.dense.centred_step`; ``0`` centres it at zero).
        backtracking_factor: CG keeps iterates ⌈γ^m⌉ for CG-backtracking (§8.7); ``None``
            disables backtracking (the last iterate is used).
        line_search_c: Armijo constant c (§8.8: 1e-2); ``None`` disables the line search.
        line_search_beta: step shrink factor of the line search.
        line_search_max_evals: most objective evaluations of the line search.
        trust_radius: if set, Steihaug-Toint truncation of CG at ‖δ‖_P = radius (§8.6).
        cg_check_every: CG reads its termination scalars on the host (a synchronisation
            on an accelerator) every this many iterations; ``None``: 1 on CPU, 5 elsewhere.
        loss_hvp: optional declared L'' for the GGN (see :class:`torch_hf.GGN`).
        process_group: data parallelism (:mod:`torch_hf.distributed`): ``None`` (default)
            averages over the default group when one is initialised with more than one
            process, a group object over that group, ``False`` never. Each closure returns
            the mean loss over its shard; shards of equal size.
        offload_activations: keep the activations cached for CG in host memory (§7.1;
            :class:`torch_hf.nn.OffloadActivations`).
        recompute: GGN products re-run the closure instead of caching its activations
            (:class:`torch_hf.GGN`'s ``recompute``; with ``torch_hf.nn.unroll(...,
            checkpoint="sqrt")`` an RNN keeps O(√T) states during CG, §7.1).
        autocast_dtype: run every closure call under ``torch.autocast`` with this dtype;
            CG vectors and products stay in the parameters' dtype.
        generator: the optimizer's random stream (a CPU ``torch.Generator``), lent to the
            parts that draw random probes and have none of their own (§11.4). ``None``: one
            seeded from the global RNG at construction. Saved by :meth:`state_dict`.
        curvature_batch: the one-closure form of §12.1: the curvature products use the
            first ``curvature_batch`` cases of the gradient batch. The closure then takes
            the cases to evaluate, ``closure(cases=slice(None))``, and the optimizer calls
            ``closure()`` for the gradient and ``closure(slice(0, curvature_batch))`` for
            the curvature. ``None`` (default): the closure takes no argument, and the
            curvature uses the gradient batch or ``step``'s ``curvature_closure``.
        history_size: how many steps' :class:`StepDiagnostics` :attr:`history` keeps
            (``None``: all); :attr:`last_step` is always kept.
        solver: how δ is computed. ``"cg"``: truncated PCG (Alg. 2). ``"dense"``: by
            Cholesky on the dense curvature matrix (:mod:`torch_hf.dense`; small models
            only): ENGD's Gauss-Newton step (ε ≈ 0 in place of λ, its length searched by
            halving), the damped system after a step the line search rejects; CG where
            the matrix is not positive definite. ``"auto"`` (default): dense on a
            deterministic objective (:mod:`torch_hf.regime`) with at most
            ``dense_max_params`` parameters once CG spends more products than the dense
            matrix costs (about ``n/2`` products for n parameters), and CG otherwise. The
            dense solve needs a diagonal damping.
        dense_max_params: the most parameters ``solver="auto"`` solves densely (4096: the
            n³/3-flop factorisation and the n² matrix stay below about a second and
            128 MiB in float64).
        jacobian: where the exact solves of ``solver="auto"`` get the outputs' Jacobian J
            (M × n) for B = c JᵀJ when L'' = cI (:mod:`torch_hf.dense`): ``"auto"``
            (default) reads J off the closure's autograd graph when the outputs are
            computed case by case (:mod:`torch_hf.curvature.jacobian`: three backward
            passes), falling back to the closure's ``jacobian`` attribute
            (:class:`torch_hf.residuals.PointwiseResiduals`), for a closure that has that
            attribute whatever the regime, and for any other on a deterministic objective;
            ``"graph"``: from the graph whatever the regime; ``"closure"``: only the
            closure's attribute; ``"off"``: never (CG, or the dense matrix from products).
            J read from the graph is used only while it has at most 2²⁹ entries (4 GiB
            in float64).
        cuda_graphs: replay the curvature products of a step from a CUDA graph
            (:mod:`torch_hf.curvature.capture`): the first product runs as usual, the
            second is captured, the rest replay it, with the same result; the step then
            runs on a side stream of the parameters' device. ``None`` (default): on when
            the parameters are on a CUDA device, with ``curvature`` ``"ggn"`` or
            ``"hessian"`` and neither ``recompute`` nor ``offload_activations`` (whose
            products run the closure or copy from the host). ``False``: never. A product
            that cannot be captured runs uncaptured, said once in the log, and later steps
            no longer capture.
        flush_denormal: on CPU, treat subnormal floats as zero while the step runs and
            restore the caller's mode afterwards: x86 handles them in slow microcode (a
            CURVES gradient: 111 ms with them, 12 ms without, ``benchmarks/subnormals.py``).

    The closure returns ``(loss, outputs)`` (or only ``loss`` for
    ``curvature="hessian"``) with no ``backward()`` inside (the README's "closure
    contract" says what else it may and may not do).
    ``step`` returns the loss before the update and leaves its diagnostics in
    :attr:`last_step`. A closure that yields a non-finite loss or gradient at the start
    raises :class:`torch_hf.NonFiniteLossError` with the parameters untouched; a
    non-finite objective at a trial point rejects that point, and when no point is
    acceptable the parameters stay exactly as they were and λ is increased.

    Reference: J. Martens and I. Sutskever, *Training Deep and Recurrent Networks with Hessian-Free Optimization*.
    """

    def __init__(
        self,
        params: Iterable,
        curvature: str = "ggn",
        damping: Damping | None = None,
        preconditioner: Preconditioner | None = None,
        *,
        lr: float = 1.0,
        weight_decay: float = 0.0,
        cg_max_iters: int = 250,
        cg_min_iters: int = 1,
        cg_tol: float = 5e-4,
        cg_stop: str = "auto",
        cg_decay: float = 0.95,
        backtracking_factor: float | None = 1.3,
        line_search_c: float | None = 1e-2,
        line_search_beta: float = 0.8,
        line_search_max_evals: int = 20,
        trust_radius: float | None = None,
        cg_check_every: int | None = None,
        loss_hvp: Callable | None = None,
        process_group: Any = None,
        offload_activations: bool = False,
        recompute: bool = False,
        autocast_dtype: torch.dtype | None = None,
        generator: torch.Generator | None = None,
        curvature_batch: int | None = None,
        history_size: int | None = 100,
        flush_denormal: bool = True,
        solver: str = "auto",
        dense_max_params: int = 4096,
        cuda_graphs: bool | None = None,
        jacobian: str = "auto",
    ) -> None:
        if curvature not in ("ggn", "hessian") and not (isinstance(curvature, type)
                                                       and issubclass(curvature, CurvatureOperator)):
            raise ValueError(f"curvature must be 'ggn', 'hessian' or a CurvatureOperator subclass, got {curvature!r}")
        self.cg = CGConfig(cg_max_iters, cg_min_iters, cg_tol, cg_stop, cg_decay, backtracking_factor, trust_radius,
                           cg_check_every)
        self.line_search = LineSearchConfig(line_search_c, line_search_beta, line_search_max_evals)
        check_options(lr, weight_decay, recompute, curvature, autocast_dtype, generator, history_size,
                      curvature_batch, solver, dense_max_params)
        self.solver, self.dense_max_params = solver, dense_max_params
        if jacobian not in ("auto", "graph", "closure", "off"):
            raise ValueError(f"Invalid jacobian: {jacobian!r} (must be 'auto', 'graph', 'closure' or 'off')")
        self.jacobian = jacobian
        self._graph_jacobian_failed = False  # the graph was found not case by case: not read again
        self._jacobian_buffer: Tensor | None = None  # J's memory, kept from step to step
        self._sketched = SketchedSolver()  # the damped residual-space solve without J Jᵀ (torch_hf.dense)
        if cuda_graphs is not None and not isinstance(cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be True, False or None, got {cuda_graphs!r}")
        self.cuda_graphs = cuda_graphs
        self.last_capture: CapturedProduct | None = None  # the last step's captured product, if any
        self._stream = None  # the side stream a capturing step runs on (created on first use)
        self._capture_failure: str | None = None  # why a capture failed: no step captures after it
        self._jacobian: Callable | None = None  # the curvature closure's ``jacobian``, if it has one
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.curvature, self.loss_hvp, self.process_group = curvature, loss_hvp, process_group
        self.damping = Tikhonov(1.0) if damping is None else damping
        self.preconditioner = GGNDiagonal(0.75) if preconditioner is None else preconditioner
        check_parts(self.damping, self.preconditioner)
        self.offload_activations, self.recompute = bool(offload_activations), bool(recompute)
        self.autocast_dtype, self.curvature_batch = autocast_dtype, curvature_batch
        self.history_size, self.flush_denormal = history_size, bool(flush_denormal)
        self.last_offload: OffloadActivations | None = None
        self.last_step: StepDiagnostics | None = None
        self.history: list[StepDiagnostics] = []
        self._reducer: Reducer | None = None
        self._reducer_group: Any = None
        self._trial_call = TrialCall()  # remembers whether the closure needs autograd at trial points
        self._last_trial_evaluations = 2  # the last step's trial objectives: the next one's expected count
        self._warned_stall = False
        self._safe_kernels: bool | None = None  # decided by the first curvature operator
        if generator is None:  # seeded from the global stream, so torch.manual_seed still repeats runs
            generator = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (), dtype=torch.int64)))
        self.generator = generator  # owned here, lent to the parts that have none of their own
        for part in (self.preconditioner, self.damping):
            use = getattr(part, "use_generator", None)
            if use is not None:
                use(generator)

    def add_param_group(self, param_group: dict) -> None:
        """As :meth:`torch.optim.Optimizer.add_param_group`, for the keys a group may hold:
        ``weight_decay`` (per group) and ``lr`` (equal in every group: one joint step)."""
        for key in param_group:
            if key != "params" and key not in GROUP_KEYS:
                raise ValueError(f"HessianFree solves one joint quadratic: '{key}' is a setting of the whole "
                                 "optimizer, not of a parameter group; only weight_decay may differ per group")
        if not param_group.get("weight_decay", self.defaults["weight_decay"]) >= 0:
            raise ValueError(f"Invalid weight_decay: {param_group['weight_decay']} (must be >= 0)")
        if param_group.get("lr", self.defaults["lr"]) != self.defaults["lr"]:
            raise ValueError("HessianFree solves one joint quadratic: 'lr' must be the same in all parameter "
                             f"groups (got {param_group['lr']!r} and {self.defaults['lr']!r})")
        for p in param_group["params"] if not isinstance(param_group["params"], Tensor) else [param_group["params"]]:
            if isinstance(p, Tensor) and p.layout != torch.strided:
                raise ValueError("HessianFree does not support sparse parameters")
        super().add_param_group(param_group)

    # -- helpers ----------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        ps = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not ps:
            raise ValueError("HessianFree has no parameter that requires grad")
        dtypes, devices = {p.dtype for p in ps}, {p.device for p in ps}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"all parameters must share one dtype and device, got {dtypes} on {devices}")
        return ps

    def _lr(self) -> float:
        rates = {g["lr"] for g in self.param_groups}
        if len(rates) > 1:  # a scheduler that treats groups differently
            raise ValueError(f"HessianFree takes one joint step: 'lr' differs between parameter groups ({rates})")
        return rates.pop()

    def _state(self) -> dict:
        return self.state[self._params()[0]]

    def _check_every(self, params: list[Tensor]) -> int:
        # Reading CG's scalars costs a host synchronisation on an accelerator, nothing on CPU.
        return self.cg.check_every or (1 if params[0].device.type == "cpu" else 5)

    def _autocast(self, closure: Callable | None) -> Callable | None:
        if closure is None or self.autocast_dtype is None:
            return closure
        device_type, dtype = self._params()[0].device.type, self.autocast_dtype

        def autocast_closure():
            with torch.autocast(device_type, dtype=dtype):
                return closure()

        return autocast_closure

    def _get_reducer(self) -> Reducer | None:
        group = resolve_process_group(self.process_group)
        if group is None:
            return None
        if self._reducer is None or self._reducer_group is not group:
            self._reducer, self._reducer_group = Reducer(group), group
        return self._reducer

    def _generators(self) -> list[torch.Generator]:
        """Every random stream the step draws from: the optimizer's and its parts' own."""
        found: list[torch.Generator] = []
        for owner in (self, self.preconditioner, getattr(self.damping, "estimator", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
        return found

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """torch.optim's ``{"state", "param_groups"}`` and ``"hessian_free"`` (:mod:`torch_hf.checkpoint`)."""
        out = super().state_dict()
        out["hessian_free"] = own_state(self.damping, self.preconditioner, self.generator,
                                        self._last_trial_evaluations)
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` wrote, or a checkpoint of torch_hf 0.1.0."""
        state_dict, own = split_state_dict(state_dict)
        super().load_state_dict(state_dict)
        load_own_state(self, own, self._state())

    # -- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable, curvature_closure: Callable | None = None) -> Tensor:  # type: ignore[override]
        """One HF iteration (Algorithm 3). Returns the loss before the update.

        Args:
            closure: ``() -> (loss, outputs)`` on the gradient batch, no ``backward()``;
                with ``curvature_batch`` set, ``(cases=slice(None)) -> (loss, outputs)``.
            curvature_closure: the same on a (usually smaller) curvature batch (§12.1);
                the gradient batch (or its first ``curvature_batch`` cases) when ``None``.
        """
        if closure is None or not callable(closure):
            raise TypeError("HessianFree.step requires a closure: step(closure)")
        if curvature_closure is not None and not callable(curvature_closure):
            raise TypeError("curvature_closure must be callable or None")
        if curvature_closure is None and self.curvature_batch is not None:
            curvature_closure = first_cases(closure, self.curvature_batch)
        source = curvature_closure if curvature_closure is not None else closure
        jacobian = getattr(source, "jacobian", None)
        self._jacobian = jacobian if callable(jacobian) else None  # residual space (torch_hf.dense.residual_solve)
        device = self._params()[0].device
        flush = self.flush_denormal and device.type == "cpu"
        stream = self._capture_stream(device)
        if stream is None:
            with _denormals_flushed(flush):
                return self._step(self._autocast(closure), self._autocast(curvature_closure))
        # Capture needs the forward pass and the products on one side stream
        # (torch_hf.curvature.capture); the caller's stream and this one wait for each other.
        caller = torch.cuda.current_stream(device)
        stream.wait_stream(caller)
        try:
            with torch.cuda.stream(stream):
                loss = self._step(self._autocast(closure), self._autocast(curvature_closure))
        finally:
            caller.wait_stream(stream)
            if self.last_capture is not None:
                self.last_capture.release()
                if self.last_capture.failure is not None:  # the same closure fails the same way: stop trying
                    self._capture_failure = self.last_capture.failure
        loss.record_stream(caller)
        return loss

    def _capturing(self, params: list[Tensor]):
        """The stream this step captures on (``_capture_stream``'s, current), else ``None``."""
        if self._stream is None or self._capture_failure is not None:
            return None
        return self._stream if torch.cuda.current_stream(params[0].device) == self._stream else None

    def _capture_stream(self, device: torch.device):
        """The side stream of a step whose products are captured, or ``None``."""
        if self.cuda_graphs is False or device.type != "cuda" or self.recompute or self.offload_activations \
                or self.curvature not in ("ggn", "hessian") or self._capture_failure is not None:
            return None
        if self._stream is None or self._stream.device != device:
            self._stream = torch.cuda.Stream(device)
        return self._stream

    def _step(self, closure: Callable, curvature_closure: Callable | None) -> Tensor:
        """Algorithm 3, one phase per line; ``times`` records each phase's wall time."""
        t_start, times = time.perf_counter(), {}
        params, state = self._params(), self._state()
        state.setdefault("step", 0)
        reducer, decay = self._get_reducer(), WeightDecay.of_groups(self.param_groups, params)
        if reducer is not None and state["step"] == 0:
            reducer.broadcast_parameters(params)
            for generator in self._generators():  # the random probes then agree across the group
                reducer.broadcast_generator(generator, params[0])
        with _timed(times, "gradient_and_curvature"):  # lines 1-2
            ev = evaluate(params, closure, curvature_closure, self._curvature_operator,
                          "extra_hvp" in self.damping.curvature_kwargs(), decay, reducer)
        regime.observe(state, ev.f, ev.resolution)
        deterministic = regime.deterministic(state)
        cg_stop = self.cg.stop if self.cg.stop != "auto" else ("progress" if deterministic else "rate")
        dense = self._use_dense(params, deterministic, state, ev)
        residual = self._residual_space(ev, params, state, decay, reducer, deterministic)  # c of L'' = cI, or None
        with _timed(times, "preconditioner"):  # line 3
            lam, A = self.damping.value, self._damped_system(ev, params, decay, reducer,
                                                             not (dense or residual is not None))
            if residual is not None and not isinstance(A.shift, float):  # the damping is not λI
                residual = None
                if not dense:
                    self._update_preconditioner(ev, decay, reducer)
            if dense and A.shift is None:  # structural damping: not a diagonal shift
                dense = False
                self._update_preconditioner(ev, decay, reducer)
        dense = dense or residual is not None
        with _timed(times, "cg"):  # line 4
            result = None
            gauss_newton = None  # ε of a Gauss-Newton step (torch_hf.dense), when one is taken
            if dense:
                if residual is not None:
                    J = self._outputs_jacobian(params, ev)
                    K = None  # J Jᵀ, formed when a solve needs it
                    mean_diagonal = residual * float(torch.linalg.vector_norm(J)) ** 2 / J.shape[1] if J is not None else 1.0
                else:
                    B = self._dense_from_jacobian(params, ev, reducer)
                    if B is None and self._dense_by_columns(ev.grad.numel(), deterministic, state):
                        B = dense_matrix(ev.curvature, reducer)
                    mean_diagonal = float(B.diagonal().mean()) if B is not None else 1.0
                def exact(shift: float | Tensor, damped: bool) -> CGResult | None:
                    if residual is not None:
                        if J is None:
                            return None
                        u = ev.curvature.output_grads[0]

                        def solve_for(v: Tensor) -> CGResult | None:
                            nonlocal K
                            # A damped system without the Gram matrix where that is the cost (torch_hf.dense)
                            if K is None and damped and self._sketched.applies(J):
                                sketched = self._sketched.solve(J, residual, float(shift), v, SKETCH_TOLERANCE
                                                                if deterministic else SKETCH_STOCHASTIC_TOLERANCE)
                                if sketched is not None:
                                    return sketched
                            if K is None:
                                K = gram(J)
                            return residual_solve(J, residual, shift, v, ev.grad, K)

                        # On batches drawn afresh the damped step is centred at ζ·δ₍k−1₎ (torch_hf.dense)
                        previous = state.get("delta")
                        if damped and regime.describe(state) == "stochastic" and self.cg.decay > 0 \
                                and previous is not None and previous.shape == ev.grad.shape:
                            centred = centred_step(J, residual, float(shift), u, self.cg.decay * previous.to(J.dtype),
                                                   solve_for)
                            if centred is not None:
                                return centred
                        return solve_for(u)
                    return None if B is None else dense_solve(B, shift, decay.diagonal(), ev.grad)

                shift = self.damping.diagonal()
                # The undamped step belongs to a deterministic objective (ENGD's regime): on
                # batches drawn afresh its ε-regularised solve follows J's smallest singular
                # directions of this batch alone (steps of norm ~1e3 on the heat benchmark,
                # ρ near −1e4), which only λ filters (§12).
                if regime.describe(state) != "stochastic" and state.get("dense_step", "gauss-newton") == "gauss-newton":
                    gauss_newton = shift = GAUSS_NEWTON_DAMPING * max(mean_diagonal, 1e-300)
                result = exact(shift, gauss_newton is None)
                if result is None:
                    logger.info("torch_hf: the damped curvature matrix is not positive definite; CG this step")
                    self._update_preconditioner(ev, decay, reducer)
            if result is None:
                overhead = overhead_iterations(ev.batch_ratio, ev.separate_gradient,
                                               not isinstance(self.preconditioner, Identity),
                                               self._last_trial_evaluations) if cg_stop == "rate" else None
                config = self.cg if cg_stop == self.cg.stop else dataclasses.replace(self.cg, stop=cg_stop)
                result = solve(A, ev.grad, state.get("delta"), self.preconditioner, config,
                               self._check_every(params), overhead, self._capturing(params))
                if result.capture_failure is not None:  # the same parts fail the same way: stop trying
                    self._capture_failure = result.capture_failure
                state["cg_products"] = A.products
        with _timed(times, "backtracking_and_line_search"):
            objective = TrialObjective(params, closure, self._trial_call, decay, reducer, ev.theta0)
            chosen, delta, q_chosen, f_best = backtrack(result, objective, self.cg.backtracking_factor is None)
            backtracking_evaluations = objective.evaluations  # line 5
            if self.damping.needs_base_point:
                objective.restore()  # the operator's graph saw θ₀
            if gauss_newton is not None and result.stop_reason == "dense":  # q was damped by ε, not λ
                model_reduction = q_chosen - 0.5 * gauss_newton * float(torch.dot(delta, delta))
            else:
                model_reduction = q_chosen - self.damping.model_penalty(delta, ev.curvature)
            rho, informative = reduction_ratio(model_reduction, f_best, ev.f, ev.resolution)  # line 6
            if informative and gauss_newton is None:  # a Gauss-Newton step is globalised by the line search
                self.damping.update(rho)
            search = self.line_search
            if gauss_newton is not None and search.c is not None:  # its length may be off by decades
                search = dataclasses.replace(search, beta=GAUSS_NEWTON_LINE_SEARCH[0],
                                             max_evals=max(search.max_evals, GAUSS_NEWTON_LINE_SEARCH[1]))
            alpha, f_new, slope = line_search(objective, ev.grad, delta, f_best, ev.f, search, informative)  # line 7
            if gauss_newton is not None and result.stop_reason == "dense" and alpha < GAUSS_NEWTON_FALLBACK_ALPHA:
                # Far from a solution the Gauss-Newton direction may need α ≈ 1e-6: the damped
                # step is offered too, and the lower of the two is taken. (Searching below the
                # threshold only where the damped step fails too saves ~20 evaluations a step
                # early on, but took the damped step where a short Gauss-Newton one was lower:
                # 3.0e-4 against 1.4e-6 at 300 s on the 10,000-point reaction-diffusion PINN.)
                damped = exact(self.damping.diagonal(), True)
                if damped is not None:
                    trial = TrialObjective(params, closure, self._trial_call, decay, reducer, ev.theta0)
                    chosen_d, delta_d, q_d, f_best_d = backtrack(damped, trial, self.cg.backtracking_factor is None)
                    if self.damping.needs_base_point:
                        trial.restore()
                    reduction_d = q_d - self.damping.model_penalty(delta_d, ev.curvature)
                    rho_d, informative_d = reduction_ratio(reduction_d, f_best_d, ev.f, ev.resolution)
                    if informative_d:
                        self.damping.update(rho_d)
                    alpha_d, f_new_d, slope_d = line_search(trial, ev.grad, delta_d, f_best_d, ev.f, self.line_search,
                                                            informative_d)
                    if alpha_d > 0 and (alpha == 0 or f_new_d < f_new):
                        result, chosen, delta, q_chosen, f_best = damped, chosen_d, delta_d, q_d, f_best_d
                        model_reduction, rho, informative = reduction_d, rho_d, informative_d
                        alpha, f_new, slope, gauss_newton = alpha_d, f_new_d, slope_d, None
                    objective.evaluations += trial.evaluations
        self._last_trial_evaluations = objective.evaluations
        step_scale = self._apply(params, ev.theta0, delta, alpha, result.x, state)  # line 8
        if dense:  # a rejected Gauss-Newton step hands the next step to the damped solve, and back
            state["dense_step"] = "levenberg-marquardt" if gauss_newton is not None and step_scale == 0 \
                else "gauss-newton"
        regime.remember(state, ev.f if step_scale == 0.0 else f_new if step_scale == alpha else None)

        def judge() -> tuple[str, str]:
            with _timed(times, "stall_check"):
                return judge_stall(params, closure, decay, reducer, ev.theta0, ev.resolution, self._safe_kernels)

        grad_norm = float(ev.grad.norm())
        stall, warned = stall_verdict(state, informative, judge, grad_norm, ev.resolution, not self._warned_stall)
        self._warned_stall |= warned
        self.last_step = StepDiagnostics(
            step=state["step"], loss_before=ev.f, loss_after=f_new if step_scale == alpha else math.nan, rho=rho,
            damping=lam, damping_next=self.damping.value, cg_iterations=result.iterations,
            cg_stop_reason=result.stop_reason, cg_stop=cg_stop,
            solver=("residual" if residual is not None else "dense") if result.stop_reason == "dense" else "cg",
            regime="deterministic" if deterministic else regime.describe(state),
            chosen_iteration=chosen, line_search_alpha=alpha,
            predicted_reduction=model_reduction, rho_informative=informative, converged=stall == "converged",
            stall=stall, directional_derivative=slope, curvature_products=A.products,
            objective_evaluations=objective.evaluations, backtracking_evaluations=backtracking_evaluations,
            line_search_evaluations=objective.evaluations - backtracking_evaluations,
            grad_norm=grad_norm, step_norm=float(delta.norm()) * step_scale, accepted=step_scale > 0,
            wall_time_s=time.perf_counter() - t_start, times=times)
        record(self.history, self.last_step, self.history_size)
        return ev.loss

    def _curvature_operator(self, closure: Callable, which: str):
        """B on ``closure``'s batch (the closure named ``which`` in errors): the GGN, with the
        damping's extra term, or the Hessian."""
        damping_kwargs = self.damping.curvature_kwargs()
        if isinstance(self.curvature, type):  # a curvature matrix of the user's: (params, closure, **kwargs)
            op_cls, kwargs = self.curvature, damping_kwargs
        elif self.curvature == "ggn":
            op_cls, kwargs = GGN, {"loss_hvp": self.loss_hvp, **damping_kwargs}
            if self.recompute:
                kwargs["recompute"] = True
        elif damping_kwargs:
            raise ValueError(f"{type(self.damping).__name__} damping needs curvature='ggn'")
        else:
            op_cls, kwargs = Hessian, {}
        offload = OffloadActivations() if self.offload_activations else contextlib.nullcontext()
        self.last_offload = offload if self.offload_activations else None
        with offload, blame(which):
            op = op_cls(self._params(), self.damping.augment_closure(closure), safe_kernels=self._safe_kernels,
                        **kwargs)
        self._safe_kernels = op.safe_kernels
        if self._capturing(self._params()) is not None:
            op.mv = self.last_capture = CapturedProduct(op.mv, self._stream)
        return op

    def _damped_system(self, ev: Evaluation, params: list[Tensor], decay: WeightDecay,
                       reducer: Reducer | None, precondition: bool = True) -> DampedOperator:
        """Line 3: this step's damping λD (§8) and preconditioner P (§11; not needed by a
        dense solve), and the damped operator A = B + λD + ηI."""
        # `reduce` only under data parallelism: custom parts need not accept it. The Reducer
        # itself is the callable (its rank and size shard the random estimators' probes).
        self.damping.prepare(DampingContext(curvature=ev.curvature, **({} if reducer is None else {"reduce": reducer})))
        if precondition:
            self._update_preconditioner(ev, decay, reducer)
        return DampedOperator(ev.curvature, self.damping, decay, reducer)

    def _update_preconditioner(self, ev: Evaluation, decay: WeightDecay, reducer: Reducer | None) -> None:
        """P for this step (§11), from B, λD and η (``reduce`` passed only under data parallelism)."""
        self.preconditioner.update(ev.curvature, self.damping.diagonal(), decay.diagonal(),
                                   **({} if reducer is None else {"reduce": reducer}))

    def _use_dense(self, params: list[Tensor], deterministic: bool, state: dict, ev: Evaluation) -> bool:
        """Whether line 4 solves the damped system exactly (:mod:`torch_hf.dense`): always
        with ``solver="dense"``; with ``"auto"`` on a deterministic objective of at most
        ``dense_max_params`` parameters once the last CG cost more products than the dense
        matrix would, or from the second step on, whatever the regime, when the closure gives
        its Jacobian (B = c JᵀJ then needs no forward columns); the damping must turn out
        diagonal: checked once it is prepared."""
        if self.solver == "cg":
            return False
        if self.solver == "dense":
            return True
        n = sum(p.numel() for p in params)
        outputs = getattr(ev.curvature, "outputs", ())
        if state.get("step", 0) >= 1 and n <= self.dense_max_params and self._has_jacobian(deterministic, outputs) \
                and output_hessian_scale(ev.curvature) is not None:
            return True  # B = c JᵀJ from the closure's Jacobian: no forward columns to pay for
        return self._dense_by_columns(n, deterministic, state)

    def _dense_by_columns(self, n: int, deterministic: bool, state: dict) -> bool:
        """B from its n forward columns pays: ``solver="dense"``, or a deterministic objective
        whose last CG cost more products than the columns would."""
        return self.solver == "dense" or (deterministic and n <= self.dense_max_params
                                          and state.get("cg_products", 0) >= DENSE_PRODUCTS_PER_COLUMN * n)

    def _residual_space(self, ev: Evaluation, params: list[Tensor], state: dict, decay: WeightDecay,
                        reducer: Reducer | None, deterministic: bool) -> float | None:
        """c when line 4 solves in residual space (:func:`torch_hf.dense.residual_solve`), else
        ``None``: the outputs' Jacobian is at hand (read off the graph, or the closure's
        ``jacobian``, :class:`torch_hf.residuals.PointwiseResiduals`; see ``jacobian``), its M outputs are fewer than the n
        parameters, L'' = cI, the gradient is the curvature batch's with no weight decay, one
        process; with ``solver="auto"`` from the second step on, whatever the regime (a
        closure that offers J is taken to want it used: it costs about 0.13 products per row
        on the benchmark's Poisson network, a few CG iterations' worth; on the benchmark's
        heat problem, whose points are drawn afresh every step, these steps reached 2.4e-5
        where CG stayed near 1e-2). The damping must turn out λI (checked once it is prepared)."""
        outputs = getattr(ev.curvature, "outputs", ())
        if self.solver == "cg" or not self._has_jacobian(deterministic, outputs) or reducer is not None \
                or decay.active or ev.separate_gradient:
            return None
        m, n = sum(o.numel() for o in outputs), sum(p.numel() for p in params)
        if not 0 < m < n:
            return None
        if self.solver == "auto" and state.get("step", 0) < 1:  # the first step runs CG
            return None
        return output_hessian_scale(ev.curvature)

    def _dense_from_jacobian(self, params: list[Tensor], ev: Evaluation, reducer: Reducer | None) -> Tensor | None:
        """B = c JᵀJ from the closure's Jacobian where it gives one (L'' = cI, one process):
        per point by ``torch.func`` it costs far less than B's n forward columns."""
        if reducer is not None or ev.separate_gradient:
            return None
        c = output_hessian_scale(ev.curvature)
        if c is None:
            return None
        J = self._outputs_jacobian(params, ev)
        return None if J is None else c * gram(J.t())

    def _has_jacobian(self, deterministic: bool, outputs: tuple) -> bool:
        """Whether this step may ask :meth:`_outputs_jacobian` for J (see ``jacobian``)."""
        if self.jacobian == "off":
            return False
        if self._jacobian is not None:
            return True
        if self.jacobian == "closure" or self._graph_jacobian_failed or len(outputs) != 1:
            return False
        m, n = outputs[0].numel(), sum(p.numel() for p in self._params())
        return m * n <= GRAPH_JACOBIAN_MAX_ENTRIES and (self.jacobian == "graph" or deterministic)

    def _outputs_jacobian(self, params: list[Tensor], ev: Evaluation) -> Tensor | None:
        """J (M × n): read off the closure's graph (:func:`~torch_hf.curvature.jacobian.graph_jacobian`),
        else the curvature closure's ``jacobian``, checked against the outputs and the
        parameters; ``None`` when neither gives it."""
        outputs = ev.curvature.outputs
        if self.jacobian != "closure" and not self._graph_jacobian_failed and len(outputs) == 1:
            J = graph_jacobian(outputs[0], params, GRAPH_JACOBIAN_MAX_ENTRIES, self._jacobian_buffer)
            if J is not None:
                self._jacobian_buffer = J
                return J
            self._graph_jacobian_failed = True
            logger.info("torch_hf: the outputs' Jacobian cannot be read off the closure's graph; %s",
                        "the closure's jacobian is used" if self._jacobian is not None else "CG")
        if self._jacobian is None:
            return None
        J = self._jacobian(params)
        m, n = sum(o.numel() for o in ev.curvature.outputs), sum(p.numel() for p in params)
        if not isinstance(J, Tensor) or tuple(J.shape) != (m, n):
            raise ValueError(f"closure.jacobian(params) must return the outputs' Jacobian as an ({m} x {n}) tensor, "
                             f"got {tuple(J.shape) if isinstance(J, Tensor) else type(J).__name__}")
        return J.to(ev.grad.dtype)

    def _apply(self, params: list[Tensor], theta0: Tensor, delta: Tensor, alpha: float, last_iterate: Tensor,
               state: dict) -> float:
        """Line 8: θ ← θ₀ + lr·α·δ (θ₀ itself, bit for bit, when the step is rejected); CG's
        final iterate is kept to start the next CG (§10). Returns lr·α."""
        step_scale = alpha * self._lr()
        # The parameters hold the last trial point: write the chosen one.
        for p, v in zip(params, _flat.unflatten(theta0 if step_scale == 0.0 else theta0 + step_scale * delta,
                                                params)):
            p.copy_(v)
        state["step"] += 1
        state["delta"] = last_iterate.detach().clone()
        return step_scale


@contextlib.contextmanager
def _timed(times: dict, name: str):
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t
