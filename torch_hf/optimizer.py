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

The phases are functions in :mod:`torch_hf.phases`; the damped system is
:class:`torch_hf.damped.DampedOperator`; the settings are validated once in
:mod:`torch_hf.config`.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _flat
from ._denormals import _denormals_flushed, _flushing_denormals  # noqa: F401 - recipes and tests import them here
from .config import GROUP_KEYS, CGConfig, LineSearchConfig
from .curvature import GGN, ClosureError, Hessian, NonFiniteLossError, evaluate_closure
from .damped import DampedOperator, WeightDecay
from .damping import Damping, DampingContext, Tikhonov
from .diagnostics import StepDiagnostics
from .distributed import Reducer, resolve_process_group
from .nn import OffloadActivations
from .phases import TrialObjective, backtrack, cg_backtracking, line_search, reduction_ratio, solve
from .preconditioners import GGNDiagonal, Identity, Preconditioner
from .stall import STALL_STEPS, judge_stall, stall_message

__all__ = ["HessianFree", "StepDiagnostics", "cg_backtracking"]

logger = logging.getLogger("torch_hf")

# Costs relative to one curvature-vector product on the same batch, for cg_stop="rate"
# (docs/benchmarks.md: a GGN product costs 1.27 gradients; a forward pass about a third).
_GRADIENT_PER_PRODUCT = 0.8
_FORWARD_PER_PRODUCT = 0.3
# The version of what state_dict() writes; 1 (and no key) is torch_hf 0.1.0's layout.
STATE_VERSION = 2


@dataclass(frozen=True)
class Evaluation:
    """Lines 1–2 of a step: the curvature operator B, the closure's loss (what ``step``
    returns), f and ∇f at θ₀ with the weight decay, and the batch sizes' ratio."""

    curvature: Any
    loss: Tensor
    f: float
    grad: Tensor
    theta0: Tensor
    resolution: float  # the loss's float resolution at θ₀
    separate_gradient: bool  # the gradient batch is not the curvature batch
    batch_ratio: float  # gradient batch / curvature batch (by the outputs' sizes)


class HessianFree(torch.optim.Optimizer):
    r"""Hessian-free optimization (Martens 2010; Martens & Sutskever 2012, Alg. 3).

    Args:
        params: iterable of parameters or of parameter groups. Only ``weight_decay``
            may differ between groups; HF solves one joint quadratic, so other options
            must be equal in all groups.
        curvature: ``"ggn"`` (generalized Gauss-Newton, §6, PSD; the default) or
            ``"hessian"`` (exact Hessian, §5; may be indefinite).
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
        cg_stop: ``"rate"`` (default): CG also stops once its recent decrease of the
            quadratic model per iteration falls below the step's average decrease per unit
            of cost, counting the rest of the step (curvature evaluation, preconditioner,
            the gradient on a larger gradient batch, trial objectives) in products
            (:func:`torch_hf.cg.cg`). That is the economical truncation §4 alludes to; with
            minibatches it buys more updates per second. The costs are counted from the
            batch sizes, not timed, so runs are reproducible. ``"progress"``: only the
            relative-progress test (``cg_tol``) and ``cg_max_iters``, the paper's rule;
            prefer it for full-batch precise fits (PINNs, regression to 1e-8), where long
            CG runs pay off.
        cg_decay: ζ, CG starts from ζ·δ₍k−1₎ (§10: 0.95; 0 starts from zero).
        backtracking_factor: CG keeps iterates ⌈γ^m⌉ for CG-backtracking (§8.7); ``None``
            disables backtracking (the last iterate is used).
        line_search_c: Armijo constant c (§8.8: 1e-2); ``None`` disables the line search.
        line_search_beta: step shrink factor of the line search.
        line_search_max_evals: most objective evaluations of the line search.
        trust_radius: if set, Steihaug-Toint truncation of CG at ‖δ‖_P = radius (§8.6).
        cg_check_every: CG reads its termination scalars on the host (a synchronisation
            on an accelerator) every this many iterations; ``None``: 1 on CPU, 5 elsewhere.
            Between checks CG may run a few iterations past the progress criterion.
        loss_hvp: optional declared L'' for the GGN (see :class:`torch_hf.GGN`).
        process_group: data parallelism (:mod:`torch_hf.distributed`). ``None`` (default)
            averages loss, gradient, curvature products, diagonal estimates and trial
            objectives over the default ``torch.distributed`` group when one is
            initialised with more than one process; a group object uses that group;
            ``False`` never communicates. Each process's closure must return the mean
            loss over its shard, shards of equal size; parameters are broadcast from
            rank 0 on the first step.
        offload_activations: keep the activations cached for CG in host memory and copy
            them to the device for each product (§7.1; :class:`torch_hf.nn.OffloadActivations`).
            A no-op for tensors already on the CPU.
        recompute: GGN products re-run the closure instead of caching its activations
            (forward-mode J v + one reverse pass; :class:`torch_hf.GGN`'s ``recompute``):
            with ``torch_hf.nn.unroll(..., checkpoint="sqrt")`` a T-step RNN keeps O(√T)
            states during CG (§7.1).
        autocast_dtype: run every closure call under ``torch.autocast`` with this dtype
            (e.g. ``torch.bfloat16``) on the parameters' device type; gradients, CG
            vectors and products stay in the parameters' dtype (float32).
        generator: the optimizer's random stream (a CPU ``torch.Generator``): the random
            probes of the GGN-diagonal preconditioner (§11.4) and of scale-sensitive
            damping come from it unless those objects were given a generator of their
            own. ``None``: a new generator seeded from the global RNG at construction
            (so ``torch.manual_seed`` still makes runs repeatable). Its state is part of
            :meth:`state_dict`, so a saved and reloaded run continues bit for bit.
        curvature_batch: the one-closure form of §12.1: the curvature products use the
            first ``curvature_batch`` cases of the gradient batch. The closure then takes
            the cases to evaluate, ``closure(cases=slice(None))``, and the optimizer calls
            ``closure()`` for the gradient and ``closure(slice(0, curvature_batch))`` for
            the curvature. ``None`` (default): the closure takes no argument, and the
            curvature uses the gradient batch or ``step``'s ``curvature_closure``.
        history_size: how many :class:`StepDiagnostics` :attr:`history` keeps (the
            latest); ``None`` keeps all, 0 none. :attr:`last_step` is always kept.
        flush_denormal: on CPU, treat subnormal floats as zero while the step runs
            (``torch.set_flush_denormal``), and restore the caller's mode afterwards.
            Deep logistic networks at sparse initialization back-propagate values below
            float32's normal range, which x86 CPUs handle in slow microcode: on the CURVES
            autoencoder a gradient on 250 cases costs 111 ms with subnormals and 12 ms
            without (1 thread, ``benchmarks/subnormals.py``). Values this small
            (< 1.2e-38 in float32) carry nothing the step can use. No effect on other devices or where the CPU lacks the mode.

    The closure returns ``(loss, outputs)`` (or only ``loss`` for
    ``curvature="hessian"``) with no ``backward()`` inside (the README's "closure
    contract" says what else it may and may not do).
    ``step`` returns the loss before the update and leaves its diagnostics in
    :attr:`last_step`. A closure that yields a non-finite loss or gradient at the start
    raises :class:`torch_hf.NonFiniteLossError` with the parameters untouched; a
    non-finite objective at a trial point rejects that point, and when no point is
    acceptable the parameters stay exactly as they were and λ is increased.

    Reference: J. Martens and I. Sutskever, *Training Deep and Recurrent Networks with
    Hessian-Free Optimization*, 2012.
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
        cg_stop: str = "rate",
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
    ) -> None:
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        self.cg = CGConfig(cg_max_iters, cg_min_iters, cg_tol, cg_stop, cg_decay, backtracking_factor, trust_radius,
                           cg_check_every)
        self.line_search = LineSearchConfig(line_search_c, line_search_beta, line_search_max_evals)
        _check_options(lr, weight_decay, recompute, curvature, autocast_dtype, generator, history_size,
                       curvature_batch)
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay})
        self.curvature, self.loss_hvp, self.process_group = curvature, loss_hvp, process_group
        self.damping = Tikhonov(1.0) if damping is None else damping
        self.preconditioner = GGNDiagonal(0.75) if preconditioner is None else preconditioner
        _check_parts(self.damping, self.preconditioner)
        self.offload_activations, self.recompute = bool(offload_activations), bool(recompute)
        self.autocast_dtype, self.curvature_batch = autocast_dtype, curvature_batch
        self.history_size, self.flush_denormal = history_size, bool(flush_denormal)
        self.last_offload: OffloadActivations | None = None
        self.last_step: StepDiagnostics | None = None
        self.history: list[StepDiagnostics] = []
        self._reducer: Reducer | None = None
        self._reducer_group: Any = None
        self._trial_needs_grad = False
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
        if self.cg.check_every is not None:
            return self.cg.check_every
        # Reading CG's scalars costs a host synchronisation on an accelerator, nothing on CPU.
        return 1 if params[0].device.type == "cpu" else 5

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
        """torch.optim's ``{"state", "param_groups"}`` (the step counter and δ₍k−1₎ per the
        first parameter) and ``"hessian_free"``: the version, λ and its rule's state, the
        preconditioner's state, the random stream and the expected trial count. Reading it
        changes nothing."""
        out = super().state_dict()
        out["hessian_free"] = {
            "version": STATE_VERSION, "damping": self.damping.state_dict(),
            "preconditioner": self.preconditioner.state_dict(),
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the parameters' dtype.
            "generator": self.generator.get_state().tolist(),
            # cg_stop="rate" counts the next step's trial objectives from the last step's
            "last_trial_evaluations": self._last_trial_evaluations}
        return out

    def load_state_dict(self, state_dict: dict) -> None:
        """Load what :meth:`state_dict` wrote, or a checkpoint of torch_hf 0.1.0 (its extra
        state inside the first parameter's, its settings in every parameter group)."""
        state_dict = dict(state_dict)
        own = state_dict.pop("hessian_free", None)
        state_dict["param_groups"] = [{k: v for k, v in g.items() if k == "params" or k in GROUP_KEYS}
                                      for g in state_dict["param_groups"]]
        super().load_state_dict(state_dict)
        if own is None:  # 0.1.0: the same entries, kept in the first parameter's state
            st = self._state()
            own = {k: st.pop(k) for k in ("damping", "preconditioner", "generator", "last_trial_evaluations")
                   if k in st}
        if "damping" in own:
            self.damping.load_state_dict(own["damping"])
        if "preconditioner" in own:
            self.preconditioner.load_state_dict(own["preconditioner"])
        if "generator" in own:
            self.generator.set_state(torch.tensor(own["generator"], dtype=torch.uint8))
        if "last_trial_evaluations" in own:
            self._last_trial_evaluations = int(own["last_trial_evaluations"])

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
            curvature_closure = self._first_cases(closure)
        flush = self.flush_denormal and self._params()[0].device.type == "cpu"
        with _denormals_flushed(flush):
            return self._step(self._autocast(closure), self._autocast(curvature_closure))

    def _first_cases(self, closure: Callable) -> Callable:
        """The curvature closure of the one-closure form: ``closure(slice(0, curvature_batch))``."""
        try:
            takes_cases = bool(inspect.signature(closure).parameters)
        except (TypeError, ValueError):  # a builtin or C callable: assume it does
            takes_cases = True
        if not takes_cases:
            raise ClosureError(f"curvature_batch={self.curvature_batch} needs a closure that takes the cases to "
                               "evaluate: def closure(cases=slice(None)): xb, yb = x[cases], y[cases]; ...; "
                               "or pass a curvature_closure to step()")
        cases = slice(0, self.curvature_batch)
        return lambda: closure(cases)

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
            ev = self._evaluate(params, closure, curvature_closure, decay, reducer)
        with _timed(times, "preconditioner"):  # line 3
            lam, A = self.damping.value, self._damped_system(ev, params, decay, reducer)
        with _timed(times, "cg"):  # line 4
            overhead = self._overhead_iterations(ev) if self.cg.stop == "rate" else None
            result = solve(A, ev.grad, state.get("delta"), self.preconditioner, self.cg,
                           self._check_every(params), overhead)
        with _timed(times, "backtracking_and_line_search"):
            objective = TrialObjective(params, closure, self._call_at_trial_point, decay, reducer, ev.theta0)
            chosen, delta, q_chosen, f_best = backtrack(result, objective, self.cg.backtracking_factor is None)
            backtracking_evaluations = objective.evaluations  # line 5
            if self.damping.needs_base_point:
                objective.restore()  # the operator's graph saw θ₀
            model_reduction = q_chosen - self.damping.model_penalty(delta, ev.curvature)
            rho, informative = reduction_ratio(model_reduction, f_best, ev.f, ev.resolution)  # line 6
            if informative:
                self.damping.update(rho)
            alpha, f_new, slope = line_search(objective, ev.grad, delta, f_best, ev.f, self.line_search,
                                              informative)  # line 7
        self._last_trial_evaluations = objective.evaluations
        step_scale = self._apply(params, ev.theta0, delta, alpha, result.x, state)  # line 8
        stall = self._stall_verdict(params, closure, decay, reducer, ev, informative, state, times)
        self._record(StepDiagnostics(
            step=state["step"], loss_before=ev.f, loss_after=f_new if step_scale == alpha else math.nan, rho=rho,
            damping=lam, damping_next=self.damping.value, cg_iterations=result.iterations,
            cg_stop_reason=result.stop_reason, chosen_iteration=chosen, line_search_alpha=alpha,
            predicted_reduction=model_reduction, rho_informative=informative, converged=stall == "converged",
            stall=stall, directional_derivative=slope, curvature_products=A.products,
            objective_evaluations=objective.evaluations, backtracking_evaluations=backtracking_evaluations,
            line_search_evaluations=objective.evaluations - backtracking_evaluations,
            grad_norm=float(ev.grad.norm()), step_norm=float(delta.norm()) * step_scale, accepted=step_scale > 0,
            wall_time_s=time.perf_counter() - t_start, times=times))
        return ev.loss

    def _evaluate(self, params: list[Tensor], closure: Callable, curvature_closure: Callable | None,
                  decay: WeightDecay, reducer: Reducer | None) -> Evaluation:
        """Lines 1-2: f(θ) and ∇f on the gradient batch, and the curvature operator B on
        the curvature batch (the same batch when ``curvature_closure`` is None), its
        activations cached for CG (§7.1). A :class:`NonFiniteLossError` leaves θ as it is;
        under data parallelism every process raises it, none is left waiting."""
        failure: NonFiniteLossError | None = None
        separate, ratio = False, 1.0
        try:
            op = self._curvature_operator(params, closure, curvature_closure)
            if curvature_closure is None:
                f_loss, f_grad = op.loss, op.grad
            else:
                separate = True
                extras: list | None = [] if "extra_hvp" in self.damping.curvature_kwargs() else None
                with _blame("closure (the gradient batch)"):
                    loss_t, outs = evaluate_closure(closure, need_outputs=False, extras=extras, params=params)
                if outs and op.outputs and op.outputs[0].numel():
                    ratio = outs[0].numel() / op.outputs[0].numel()
                with torch.enable_grad():
                    grads = torch.autograd.grad(loss_t, params, allow_unused=True)
                f_loss, f_grad = loss_t.detach(), _flat.flatten(grads, params)
        except NonFiniteLossError as exc:
            if reducer is None:
                raise
            failure = exc  # tell the other processes before raising
        if reducer is not None:
            # One all-reduce carries the loss and any failure: a NaN from a failed process
            # makes the mean NaN everywhere, so every process raises.
            mean_loss = reducer.mean_float(math.nan if failure is not None else float(f_loss), params[0])
            if not math.isfinite(mean_loss):
                raise failure or NonFiniteLossError("the loss is not finite on another process of the group")
            f_loss = torch.tensor(mean_loss, dtype=f_loss.dtype, device=f_loss.device)
            f_grad = reducer.mean(f_grad)
        theta0 = torch.cat([p.detach().reshape(-1) for p in params])
        f = float(f_loss) + decay.penalty(theta0)
        grad = decay.gradient(f_grad, theta0)
        if not bool(torch.isfinite(grad).all()):
            which = "closure (the gradient batch)" if separate else "the closure"
            raise NonFiniteLossError(f"{which}: the gradient of the loss is not finite at the current parameters, "
                                     "though the loss is (an inf·0 or a non-differentiable point, such as sqrt at 0)")
        resolution = 8 * torch.finfo(f_loss.dtype).eps * max(abs(f), 1e-30)
        return Evaluation(op, f_loss, f, grad, theta0, resolution, separate, ratio)

    def _curvature_operator(self, params: list[Tensor], closure: Callable, curvature_closure: Callable | None):
        """B on the curvature batch: the GGN (with the damping's extra term) or the Hessian."""
        damping_kwargs = self.damping.curvature_kwargs()
        if self.curvature == "ggn":
            op_cls, kwargs = GGN, {"loss_hvp": self.loss_hvp, **damping_kwargs}
            if self.recompute:
                kwargs["recompute"] = True
        elif damping_kwargs:
            raise ValueError(f"{type(self.damping).__name__} damping needs curvature='ggn'")
        else:
            op_cls, kwargs = Hessian, {}
        offload = OffloadActivations() if self.offload_activations else contextlib.nullcontext()
        self.last_offload = offload if self.offload_activations else None
        which = "curvature_closure (the curvature batch)" if curvature_closure is not None else "the closure"
        with offload, _blame(which):
            op = op_cls(params, self.damping.augment_closure(curvature_closure or closure),
                        safe_kernels=self._safe_kernels, **kwargs)
        self._safe_kernels = op.safe_kernels
        return op

    def _damped_system(self, ev: Evaluation, params: list[Tensor], decay: WeightDecay,
                       reducer: Reducer | None) -> DampedOperator:
        """Line 3: this step's damping λD (§8) and preconditioner P (§11), and the damped
        operator A = B + λD + ηI."""
        # `reduce` only under data parallelism: custom preconditioners need not accept it. The
        # Reducer itself is the callable (its rank and size shard the random estimators' probes).
        reduce_kwargs = {} if reducer is None else {"reduce": reducer}
        self.damping.prepare(DampingContext(curvature=ev.curvature, **reduce_kwargs))
        self.preconditioner.update(ev.curvature, self.damping.diagonal(), decay.diagonal(), **reduce_kwargs)
        return DampedOperator(ev.curvature, self.damping, decay, reducer)

    def _overhead_iterations(self, ev: Evaluation) -> float:
        """What this step costs outside CG, in CG iterations (products on the curvature
        batch), for ``cg_stop="rate"``: counted, not timed, so runs stay reproducible and
        every process of a group stops CG at the same iteration. The curvature evaluation
        and the preconditioner's estimate cost about one product each; a gradient on the
        gradient batch ``r`` times the curvature batch ``_GRADIENT_PER_PRODUCT·r``; each
        trial objective (as many as the last step needed) ``_FORWARD_PER_PRODUCT·r``."""
        r = ev.batch_ratio
        cost = 1.0 + (0.0 if isinstance(self.preconditioner, Identity) else 1.0)
        if ev.separate_gradient:
            cost += _GRADIENT_PER_PRODUCT * r
        return cost + self._last_trial_evaluations * _FORWARD_PER_PRODUCT * r

    def _call_at_trial_point(self, closure: Callable):
        """Run the closure for a trial objective: under ``no_grad`` (no graph is kept, so
        trial points cost a plain forward pass), unless the closure differentiates inside
        (a PINN's Δu by ``torch.autograd.grad``): then it raises under ``no_grad``, is called
        again with grad enabled, and from then on always so (logged once). ``torch.func``
        transforms work under ``no_grad`` as they are."""
        if not self._trial_needs_grad:
            try:
                with torch.no_grad():
                    return closure()
            except torch.cuda.OutOfMemoryError:
                raise
            except RuntimeError as no_grad_error:
                with torch.enable_grad():  # a second failure propagates, chained to the first
                    result = closure()
                self._trial_needs_grad = True
                logger.info("torch_hf: the closure needs autograd at trial points (%s); evaluating them with "
                            "grad enabled from now on", str(no_grad_error).splitlines()[0][:120])
                return result
        with torch.enable_grad():
            return closure()

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

    def _stall_verdict(self, params: list[Tensor], closure: Callable, decay: WeightDecay, reducer: Reducer | None,
                       ev: Evaluation, informative: bool, state: dict, times: dict) -> str:
        """Count the steps in a row below the loss's float resolution; at ``STALL_STEPS``
        judge once whether θ is a minimum (:func:`torch_hf.stall.judge_stall`) and warn,
        once per optimizer, unless it is. The verdict holds until a step is informative."""
        if informative:
            state["uninformative_steps"], state["stall"] = 0, ""
            return ""
        state["uninformative_steps"] = state.get("uninformative_steps", 0) + 1
        if state["uninformative_steps"] < STALL_STEPS:
            return ""
        if not state.get("stall"):
            with _timed(times, "stall_check"):
                state["stall"], detail = judge_stall(params, closure, decay, reducer, ev.theta0, ev.resolution,
                                                     self._safe_kernels)
            logger.info("torch_hf: %d steps below the loss's float resolution: %s (%s)",
                        state["uninformative_steps"], state["stall"], detail)
            if state["stall"] != "converged" and not self._warned_stall:
                self._warned_stall = True
                warnings.warn(stall_message(state["stall"], state["uninformative_steps"], float(ev.grad.norm()),
                                            ev.resolution, detail), RuntimeWarning, stacklevel=4)
        return state["stall"]

    def _record(self, diag: StepDiagnostics) -> None:
        self.last_step = diag
        if self.history_size != 0:
            self.history.append(diag)
            if self.history_size is not None and len(self.history) > self.history_size:
                del self.history[: len(self.history) - self.history_size]
        logger.debug("torch_hf step %d: loss %.6g -> %.6g, rho %.3g, lambda %.3g, cg %d (%s), alpha %.3g",
                     diag.step, diag.loss_before, diag.loss_after, diag.rho, diag.damping, diag.cg_iterations,
                     diag.cg_stop_reason, diag.line_search_alpha)


@contextlib.contextmanager
def _timed(times: dict, name: str):
    t = time.perf_counter()
    yield
    times[name] = time.perf_counter() - t


@contextlib.contextmanager
def _blame(which: str):
    """Name the closure behind a contract violation or a non-finite value."""
    try:
        yield
    except (ClosureError, NonFiniteLossError) as exc:
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(which):
            exc.args = (f"{which}: {exc.args[0]}",) + exc.args[1:]
        raise


def _check_options(lr, weight_decay, recompute, curvature, autocast_dtype, generator, history_size,
                   curvature_batch) -> None:
    """The constructor's checks of what is not a part or a config object (each error names its argument)."""
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"Invalid lr: {lr} (must be > 0)")
    if not weight_decay >= 0:
        raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
    if recompute and curvature != "ggn":
        raise ValueError("recompute=True needs curvature='ggn'")
    if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
        raise TypeError(f"autocast_dtype must be a torch.dtype or None, got {autocast_dtype!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if history_size is not None and not (isinstance(history_size, int) and history_size >= 0):
        raise ValueError(f"Invalid history_size: {history_size} (must be an int >= 0, or None)")
    if curvature_batch is not None and not (isinstance(curvature_batch, int) and curvature_batch >= 1):
        raise ValueError(f"Invalid curvature_batch: {curvature_batch} (must be an int >= 1, or None)")


def _check_parts(damping: Any, preconditioner: Any) -> None:
    if not isinstance(damping, Damping):
        raise TypeError(f"damping must be a torch_hf.damping.Damping, got {type(damping).__name__}")
    for name in ("update", "solve", "diagonal"):
        if not callable(getattr(preconditioner, name, None)):
            raise TypeError(f"preconditioner must have a {name}() method (see torch_hf.preconditioners)")
