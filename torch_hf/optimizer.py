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
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from . import _flat
from .cg import cg
from .curvature import GGN, ClosureError, Hessian, NonFiniteLossError, evaluate_closure
from .damping import Damping, DampingContext, Tikhonov
from .distributed import Reducer, resolve_process_group
from .lanczos import lanczos_extremes
from .nn import OffloadActivations
from .preconditioners import GGNDiagonal, Identity, Preconditioner

__all__ = ["HessianFree", "StepDiagnostics", "cg_backtracking"]

logger = logging.getLogger("torch_hf")

# Hyper-parameters that apply to the whole optimizer (HF solves one joint quadratic).
# Costs relative to one curvature-vector product on the same batch, for cg_stop="rate"
# (docs/benchmarks.md: a GGN product costs 1.27 gradients; a forward pass about a third).
_GRADIENT_PER_PRODUCT = 0.8
_FORWARD_PER_PRODUCT = 0.3

# A stall: this many steps in a row below the loss's float resolution; the Hessian is then
# probed with this many Lanczos steps, and a lowest eigenvalue below −ratio × the largest
# magnitude is a saddle (rounding leaves PSD spectra within ~1e-8 of that in float32 runs).
_STALL_STEPS = 3
_STALL_LANCZOS_STEPS = 20
_SADDLE_RATIO = 1e-3

_GLOBAL = ("lr", "cg_max_iters", "cg_min_iters", "cg_tol", "cg_stop", "cg_decay", "backtracking_factor",
           "line_search_c", "line_search_beta", "line_search_max_evals", "trust_radius")


@dataclass
class StepDiagnostics:
    """What one HF step did (``opt.last_step``).

    ``rho_informative`` is ``False`` when the step changed the loss, and the model predicted
    a change, below the loss's float resolution (ρ is rounding noise then, and λ is left
    alone). After ``3`` such steps in a row the optimizer looks at the exact Hessian once
    (:mod:`torch_hf.lanczos`) and ``stall`` says what it found: ``"converged"`` (no negative
    curvature: a minimum, reached to the loss's resolution; ``converged`` is then ``True``),
    ``"saddle"`` (a negative eigenvalue the Gauss-Newton matrix does not see), ``"plateau"``
    (curvature too small for any step to change the loss resolvably) or ``"unknown"`` (the
    Hessian could not be evaluated). Only the last three warn.
    """

    step: int = 0
    loss_before: float = float("nan")
    loss_after: float = float("nan")
    rho: float = float("nan")
    damping: float = float("nan")
    damping_next: float = float("nan")
    cg_iterations: int = 0
    cg_stop_reason: str = ""
    chosen_iteration: int = 0
    line_search_alpha: float = float("nan")
    predicted_reduction: float = float("nan")
    rho_informative: bool = True
    converged: bool = False
    stall: str = ""
    directional_derivative: float = float("nan")
    curvature_products: int = 0
    objective_evaluations: int = 0
    backtracking_evaluations: int = 0
    line_search_evaluations: int = 0
    grad_norm: float = float("nan")
    step_norm: float = 0.0
    accepted: bool = False
    wall_time_s: float = 0.0
    times: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)


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
        history_size: how many :class:`StepDiagnostics` :attr:`history` keeps (the
            latest); ``None`` keeps all, 0 none. :attr:`last_step` is always kept.
        flush_denormal: on CPU, treat subnormal floats as zero while the step runs
            (``torch.set_flush_denormal``), and restore the caller's mode afterwards.
            Deep logistic networks at sparse initialization back-propagate values below
            float32's normal range, which x86 CPUs handle in slow microcode: on the CURVES
            autoencoder a gradient on 250 cases costs 111 ms with subnormals and 12 ms
            without (1 thread, ``benchmarks/subnormals.py``). Values this small
            (< 1.2e-38 in float32) carry nothing the step can use. No effect on other devices or where the CPU lacks the mode.

    The closure takes no arguments and returns ``(loss, outputs)`` (or only ``loss`` for
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
        history_size: int | None = 100,
        flush_denormal: bool = True,
    ) -> None:
        if curvature not in ("ggn", "hessian"):
            raise ValueError(f"curvature must be 'ggn' or 'hessian', got {curvature!r}")
        if not (isinstance(lr, (int, float)) and lr > 0):
            raise ValueError(f"Invalid lr: {lr} (must be > 0)")
        if not weight_decay >= 0:
            raise ValueError(f"Invalid weight_decay: {weight_decay} (must be >= 0)")
        if not (isinstance(cg_max_iters, int) and cg_max_iters >= 1):
            raise ValueError(f"Invalid cg_max_iters: {cg_max_iters} (must be an int >= 1)")
        if not (isinstance(cg_min_iters, int) and 0 <= cg_min_iters <= cg_max_iters):
            raise ValueError(f"Invalid cg_min_iters: {cg_min_iters} (must be an int in [0, cg_max_iters])")
        if not cg_tol >= 0:
            raise ValueError(f"Invalid cg_tol: {cg_tol} (must be >= 0)")
        if cg_stop not in ("progress", "rate"):
            raise ValueError(f"Invalid cg_stop: {cg_stop!r} (must be 'progress' or 'rate')")
        if not 0 <= cg_decay <= 1:
            raise ValueError(f"Invalid cg_decay: {cg_decay} (must be in [0, 1])")
        if backtracking_factor is not None and not backtracking_factor > 1:
            raise ValueError(f"Invalid backtracking_factor: {backtracking_factor} (must be > 1, or None)")
        if line_search_c is not None and not 0 < line_search_c < 1:
            raise ValueError(f"Invalid line_search_c: {line_search_c} (must be in (0, 1), or None)")
        if not 0 < line_search_beta < 1:
            raise ValueError(f"Invalid line_search_beta: {line_search_beta} (must be in (0, 1))")
        if not (isinstance(line_search_max_evals, int) and line_search_max_evals >= 1):
            raise ValueError(f"Invalid line_search_max_evals: {line_search_max_evals} (must be an int >= 1)")
        if trust_radius is not None and not trust_radius > 0:
            raise ValueError(f"Invalid trust_radius: {trust_radius} (must be > 0, or None)")
        if cg_check_every is not None and not (isinstance(cg_check_every, int) and cg_check_every >= 1):
            raise ValueError(f"Invalid cg_check_every: {cg_check_every} (must be an int >= 1, or None)")
        if history_size is not None and not (isinstance(history_size, int) and history_size >= 0):
            raise ValueError(f"Invalid history_size: {history_size} (must be an int >= 0, or None)")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        damping = Tikhonov(1.0) if damping is None else damping
        preconditioner = GGNDiagonal(0.75) if preconditioner is None else preconditioner
        if not isinstance(damping, Damping):
            raise TypeError(f"damping must be a torch_hf.damping.Damping, got {type(damping).__name__}")
        for name in ("update", "solve", "diagonal"):
            if not callable(getattr(preconditioner, name, None)):
                raise TypeError(f"preconditioner must have a {name}() method (see torch_hf.preconditioners)")
        defaults = dict(lr=lr, weight_decay=weight_decay, cg_max_iters=cg_max_iters, cg_min_iters=cg_min_iters,
                        cg_tol=cg_tol, cg_stop=cg_stop, cg_decay=cg_decay, backtracking_factor=backtracking_factor,
                        line_search_c=line_search_c, line_search_beta=line_search_beta,
                        line_search_max_evals=line_search_max_evals, trust_radius=trust_radius)
        super().__init__(params, defaults)
        for group in self.param_groups:
            for key in _GLOBAL:
                if group[key] != defaults[key]:
                    raise ValueError(
                        f"HessianFree solves one joint quadratic: '{key}' must be the same in all parameter "
                        f"groups (got {group[key]!r} and {defaults[key]!r}); only weight_decay may differ"
                    )
            if not group["weight_decay"] >= 0:
                raise ValueError(f"Invalid weight_decay: {group['weight_decay']} (must be >= 0)")
            for p in group["params"]:
                if p.layout != torch.strided:
                    raise ValueError("HessianFree does not support sparse parameters")
        self.curvature = curvature
        self.damping = damping
        self.preconditioner = preconditioner
        self.cg_check_every = cg_check_every
        self.loss_hvp = loss_hvp
        self.process_group = process_group
        if autocast_dtype is not None and not isinstance(autocast_dtype, torch.dtype):
            raise TypeError(f"autocast_dtype must be a torch.dtype or None, got {autocast_dtype!r}")
        self.offload_activations = bool(offload_activations)
        if recompute and curvature != "ggn":
            raise ValueError("recompute=True needs curvature='ggn'")
        self.recompute = bool(recompute)
        self.autocast_dtype = autocast_dtype
        self.last_offload: OffloadActivations | None = None
        self._reducer: Reducer | None = None
        self._reducer_group: Any = None
        self.last_step: StepDiagnostics | None = None
        self.history: list[StepDiagnostics] = []
        self.history_size = history_size
        self.flush_denormal = bool(flush_denormal)
        self._trial_needs_grad = False
        self._last_trial_evaluations = 2  # the last step's trial objectives: the next one's expected count
        self._warned_stall = False
        self._safe_kernels: bool | None = None  # decided by the first curvature operator
        if generator is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        for user in (preconditioner, getattr(damping, "estimator", None)):
            if user is not None and hasattr(user, "generator") and getattr(user, "generator") is None:
                user.generator = generator

    # -- flat helpers -------------------------------------------------------------------
    def _params(self) -> list[Tensor]:
        ps = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        if not ps:
            raise ValueError("HessianFree has no parameter that requires grad")
        dtypes = {p.dtype for p in ps}
        devices = {p.device for p in ps}
        if len(dtypes) > 1 or len(devices) > 1:
            raise ValueError(f"all parameters must share one dtype and device, got {dtypes} on {devices}")
        return ps

    def _weight_decay_vector(self, params: list[Tensor]) -> Tensor | float:
        rates = [(g["weight_decay"], [p for p in g["params"] if p.requires_grad]) for g in self.param_groups]
        if len({r for r, _ in rates}) == 1:
            return float(rates[0][0])
        return torch.cat([torch.full((p.numel(),), float(r), dtype=p.dtype, device=p.device)
                          for r, ps in rates for p in ps])

    @staticmethod
    def _write(params: list[Tensor], flat: Tensor) -> None:
        for p, v in zip(params, _flat.unflatten(flat, params)):
            p.copy_(v)

    @staticmethod
    def _write_trial(params: list[Tensor], flat: Tensor) -> None:
        # Through .data: the version counters stay as they are, so the curvature operator
        # (whose graph saved the parameters) can still be used once θ₀ is written back —
        # structural damping's model penalty needs J_h δ after backtracking.
        for p, v in zip(params, _flat.unflatten(flat, params)):
            p.data.copy_(v)

    def _state(self) -> dict:
        return self.state[self._params()[0]]

    def _check_every(self, params: list[Tensor]) -> int:
        if self.cg_check_every is not None:
            return self.cg_check_every
        # Reading CG's scalars costs a host synchronisation on an accelerator, nothing on CPU.
        return 1 if params[0].device.type == "cpu" else 5

    def _generators(self) -> list[torch.Generator]:
        """Every random stream the step draws from: the optimizer's and any of its parts' own."""
        found: list[torch.Generator] = []
        for owner in (self, self.preconditioner, getattr(self.damping, "estimator", None)):
            gen = getattr(owner, "generator", None)
            if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
                found.append(gen)
        return found

    def _autocast(self, closure: Callable) -> Callable:
        device_type = self._params()[0].device.type
        dtype = self.autocast_dtype

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

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        if self.param_groups and self._params():
            st = self._state()
            st["damping"] = self.damping.state_dict()
            st["preconditioner"] = self.preconditioner.state_dict()
            # A list, not a tensor: Optimizer.load_state_dict casts tensors to the parameters' dtype.
            st["generator"] = self.generator.get_state().tolist()
            # cg_stop="rate" counts the next step's trial objectives from the last step's
            st["last_trial_evaluations"] = self._last_trial_evaluations
        return super().state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        super().load_state_dict(state_dict)
        st = self._state()
        if "damping" in st:
            self.damping.load_state_dict(st["damping"])
        if "preconditioner" in st:
            self.preconditioner.load_state_dict(st["preconditioner"])
        if "generator" in st:
            self.generator.set_state(torch.tensor(st["generator"], dtype=torch.uint8))
        if "last_trial_evaluations" in st:
            self._last_trial_evaluations = int(st["last_trial_evaluations"])

    # -- the step ----------------------------------------------------------------------
    def _objective(self, closure: Callable, params: list[Tensor], weight_decay,
                   reducer: Reducer | None = None) -> float:
        """f at the current parameters (a trial point), +inf if non-finite."""
        result = self._call_at_trial_point(closure)
        loss = result[0] if isinstance(result, (tuple, list)) else result
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ClosureError("at a trial point the closure must return a scalar loss tensor (or (loss, outputs)); "
                               f"got {type(loss).__name__}"
                               + (f" of shape {tuple(loss.shape)}" if isinstance(loss, Tensor) else ""))
        value = float(loss)
        if reducer is not None:
            value = reducer.mean_float(value, params[0])
        if _nonzero(weight_decay):
            theta = torch.cat([p.reshape(-1) for p in params])
            value += 0.5 * float((weight_decay * theta * theta).sum())
        return value if math.isfinite(value) else math.inf

    def _call_at_trial_point(self, closure: Callable):
        """Run the closure for a trial objective: under ``no_grad`` (no graph is kept, so
        trial points cost a plain forward pass), unless the closure differentiates inside.

        A closure whose outputs are themselves derivatives (a PINN's Δu by
        ``torch.autograd.grad`` with respect to the inputs) needs autograd at trial points
        too. Under ``no_grad`` it raises; it is then called again with grad enabled, and
        from then on always so (one failed call per optimizer, logged). ``torch.func``
        transforms work under ``no_grad`` as they are and never trigger this.
        """
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

    def _stall_verdict(self, s: "_Step", informative: bool, state: dict) -> str:
        """After ``_STALL_STEPS`` steps in a row below the loss's float resolution, tell a
        minimum from a saddle or plateau with the exact Hessian (the GGN, being PSD, sees
        neither) and warn, once per optimizer, unless it is a minimum. The verdict holds
        until a step changes the loss resolvably again."""
        if informative:
            state["uninformative_steps"], state["stall"] = 0, ""
            return ""
        state["uninformative_steps"] = state.get("uninformative_steps", 0) + 1
        if state["uninformative_steps"] < _STALL_STEPS:
            return ""
        if not state.get("stall"):
            with self._timed(s, "stall_check"):
                state["stall"], detail = self._judge_stall(s)
            logger.info("torch_hf: %d steps below the loss's float resolution: %s (%s)",
                        state["uninformative_steps"], state["stall"], detail)
            if state["stall"] != "converged" and not self._warned_stall:
                self._warned_stall = True
                warnings.warn(_stall_message(state["stall"], state["uninformative_steps"], float(s.grad.norm()),
                                             s.resolution, detail), RuntimeWarning, stacklevel=4)
        return state["stall"]

    def _judge_stall(self, s: "_Step") -> tuple[str, str]:
        """Extreme eigenvalues of the objective's Hessian ∇²f + ηI at θ (a few Lanczos steps
        from a fixed start, so every process of a group computes the same): ``"saddle"`` if
        the lowest is negative beyond rounding, ``"plateau"`` if a step as long as θ itself
        would change f by less than its resolution, else ``"converged"``."""
        try:
            hessian = Hessian(s.params, _loss_only(s.closure), safe_kernels=self._safe_kernels)

            def mv(v: Tensor) -> Tensor:
                out = hessian.mv(v)
                if s.reducer is not None:
                    s.reducer.mean_(out)
                if _nonzero(s.wd):
                    out = out.addcmul_(s.wd, v) if isinstance(s.wd, Tensor) else out.add_(v, alpha=s.wd)
                return out

            ends = lanczos_extremes(mv, hessian.numel, _STALL_LANCZOS_STEPS, torch.Generator().manual_seed(0),
                                    dtype=s.grad.dtype, device=s.grad.device)
        except Exception as exc:  # noqa: BLE001 - the check is advice; the step itself is done
            return "unknown", f"the Hessian could not be evaluated: {type(exc).__name__}: {exc}"
        low, high = ends.lowest, ends.highest
        scale = max(abs(low), abs(high))
        detail = f"Hessian eigenvalues from {low:.3g} to {high:.3g}, {ends.steps} Lanczos steps"
        if 0.5 * scale * max(float(s.theta0.norm()), 1.0) ** 2 <= s.resolution:
            return "plateau", detail
        if low < -_SADDLE_RATIO * scale:
            return "saddle", detail
        return "converged", detail

    @torch.no_grad()
    def step(self, closure: Callable, curvature_closure: Callable | None = None) -> Tensor:  # type: ignore[override]
        """One HF iteration (Algorithm 3). Returns the loss before the update.

        Args:
            closure: ``() -> (loss, outputs)`` on the gradient batch, no ``backward()``.
            curvature_closure: the same on a (usually smaller) curvature batch (§12.1);
                the gradient batch is used when ``None``.
        """
        if closure is None or not callable(closure):
            raise TypeError("HessianFree.step requires a closure: step(closure)")
        if curvature_closure is not None and not callable(curvature_closure):
            raise TypeError("curvature_closure must be callable or None")
        flush = self.flush_denormal and self._params()[0].device.type == "cpu"
        with _denormals_flushed(flush):
            return self._step(closure, curvature_closure)

    def _step(self, closure: Callable, curvature_closure: Callable | None) -> Tensor:
        """Algorithm 3, one phase per method; ``times`` records each phase's wall time."""
        if self.autocast_dtype is not None:
            closure = self._autocast(closure)
            curvature_closure = self._autocast(curvature_closure) if curvature_closure is not None else None
        t_start = time.perf_counter()
        params = self._params()
        state = self._state()
        state.setdefault("step", 0)
        s = _Step(params=params, wd=self._weight_decay_vector(params), reducer=self._get_reducer(), closure=closure)
        if s.reducer is not None and state["step"] == 0:
            s.reducer.broadcast_parameters(params)
            for generator in self._generators():  # the random probes then agree across the group
                s.reducer.broadcast_generator(generator, params[0])
        # Algorithm 3, lines 1-2: gradient, loss and curvature operator; 3: damping and
        # preconditioner; 4: CG; 5: CG-backtracking; 6: ρ and λ; 7: line search; 8: update.
        with self._timed(s, "gradient_and_curvature"):
            op, f_loss = self._gradient_and_curvature(s, curvature_closure)
        with self._timed(s, "preconditioner"):
            lam, damped_mv = self._damping_and_preconditioner(s, op)
        with self._timed(s, "cg"):
            result = self._solve(s, op, damped_mv, state)
        with self._timed(s, "backtracking_and_line_search"):
            chosen_it, delta, q_chosen, f_best = self._backtrack(s, result)
            rho, model_reduction, informative = self._adapt_damping(s, op, delta, q_chosen, f_best, state)
            alpha, f_new, slope = self._line_search(s, delta, f_best, informative)
        self._last_trial_evaluations = s.evals
        step_scale = self._apply(s, delta, alpha, result, state)
        stall = self._stall_verdict(s, informative, state)
        if step_scale != alpha:  # lr != 1: f at the final point is not the one measured
            f_new = float("nan")
        diag = StepDiagnostics(
            step=state["step"], loss_before=s.loss_before, loss_after=f_new, rho=rho, damping=lam,
            damping_next=self.damping.value, cg_iterations=result.iterations, cg_stop_reason=result.stop_reason,
            chosen_iteration=chosen_it, line_search_alpha=alpha, predicted_reduction=model_reduction,
            rho_informative=informative, converged=stall == "converged", stall=stall, directional_derivative=slope, curvature_products=s.products,
            objective_evaluations=s.evals, backtracking_evaluations=s.backtracking_evals,
            line_search_evaluations=s.evals - s.backtracking_evals, grad_norm=float(s.grad.norm()),
            step_norm=float(delta.norm()) * step_scale, accepted=step_scale > 0,
            wall_time_s=time.perf_counter() - t_start, times=s.times,
        )
        self._record(diag)
        return f_loss

    @staticmethod
    @contextlib.contextmanager
    def _timed(s: "_Step", name: str):
        t = time.perf_counter()
        yield
        s.times[name] = time.perf_counter() - t

    def _gradient_and_curvature(self, s: "_Step", curvature_closure: Callable | None):
        """Lines 1-2: f(θ) and ∇f on the gradient batch, and the curvature operator B on
        the curvature batch (the same batch when ``curvature_closure`` is None), its
        activations cached for CG (§7.1). Sets ``s.loss_before``, ``s.grad``, ``s.theta0``;
        a :class:`NonFiniteLossError` leaves θ as it is."""
        params, reducer, closure = s.params, s.reducer, s.closure
        op_cls = GGN if self.curvature == "ggn" else Hessian
        op_kwargs: dict[str, Any] = {"loss_hvp": self.loss_hvp} if op_cls is GGN else {}
        damping_kwargs = self.damping.curvature_kwargs()
        if damping_kwargs and op_cls is not GGN:
            raise ValueError(f"{type(self.damping).__name__} damping needs curvature='ggn'")
        op_kwargs.update(damping_kwargs)
        if self.recompute:
            op_kwargs["recompute"] = True
        op_kwargs["safe_kernels"] = self._safe_kernels
        extras: list | None = [] if "extra_hvp" in damping_kwargs else None
        curv_closure = self.damping.augment_closure(curvature_closure or closure)
        failure: NonFiniteLossError | None = None
        offload = OffloadActivations() if self.offload_activations else contextlib.nullcontext()
        self.last_offload = offload if self.offload_activations else None
        try:
            with offload, _blame("curvature_closure (the curvature batch)" if curvature_closure is not None
                                 else "the closure"):
                op = op_cls(params, curv_closure, **op_kwargs)
            self._safe_kernels = op.safe_kernels
            if curvature_closure is None and curv_closure is closure:
                f_loss, f_grad = op.loss, op.grad
            else:
                with _blame("closure (the gradient batch)"):
                    loss_t, outs = evaluate_closure(closure, need_outputs=False, extras=extras, params=params)
                s.separate_gradient = True
                if outs and op.outputs and op.outputs[0].numel():
                    s.batch_ratio = outs[0].numel() / op.outputs[0].numel()
                with torch.enable_grad():
                    grads = torch.autograd.grad(loss_t, params, allow_unused=True)
                f_loss, f_grad = loss_t.detach(), _flat.flatten(grads, params)
        except NonFiniteLossError as exc:
            if reducer is None:
                raise
            failure = exc  # tell the other processes before raising, so none is left waiting
        if reducer is not None:
            # One all-reduce carries the loss and any failure: a NaN from a failed process
            # makes the mean NaN everywhere, so every process raises and none is left waiting.
            mean_loss = reducer.mean_float(math.nan if failure is not None else float(f_loss), params[0])
            if not math.isfinite(mean_loss):
                raise failure or NonFiniteLossError("the loss is not finite on another process of the group")
            f_loss = torch.tensor(mean_loss, dtype=f_loss.dtype, device=f_loss.device)
            f_grad = reducer.mean(f_grad)
        s.theta0 = torch.cat([p.detach().reshape(-1) for p in params])
        s.loss_before, s.grad = float(f_loss), f_grad
        if _nonzero(s.wd):
            s.grad = f_grad + s.wd * s.theta0
            s.loss_before += 0.5 * float((s.wd * s.theta0 * s.theta0).sum())
        if not bool(torch.isfinite(s.grad).all()):
            which = "closure (the gradient batch)" if s.separate_gradient else "the closure"
            raise NonFiniteLossError(f"{which}: the gradient of the loss is not finite at the current parameters, "
                                     "though the loss is (an inf·0 or a non-differentiable point, such as sqrt at 0)")
        s.float_eps = torch.finfo(f_loss.dtype).eps
        return op, f_loss

    def _damping_and_preconditioner(self, s: "_Step", op) -> tuple[float, Callable[[Tensor], Tensor]]:
        """Line 3: this step's damping λD (§8) and preconditioner P (§11); returns λ and
        the damped product v ↦ (B + λD + ηI) v, averaged over the process group."""
        lam = self.damping.value
        reducer, wd = s.reducer, s.wd
        # `reduce` only under data parallelism: custom preconditioners need not accept it. The
        # Reducer itself is the callable (its rank and size shard the random estimators' probes).
        reduce_kwargs = {} if reducer is None else {"reduce": reducer}
        self.damping.prepare(DampingContext(curvature=op, params=s.params, **reduce_kwargs))
        self.preconditioner.update(op, self.damping.diagonal(), wd if isinstance(wd, Tensor) else float(wd),
                                   **reduce_kwargs)
        damping_diagonal = self.damping.diagonal()
        has_wd = _nonzero(wd)
        # λD diagonal: it and the weight decay are folded into one fused pass per product.
        shift = None if damping_diagonal is None else damping_diagonal + wd

        def damped_mv(v: Tensor) -> Tensor:
            s.products += 1
            out = op.mv(v)
            if reducer is not None:
                reducer.mean_(out)
            if shift is not None:
                return out.addcmul_(shift, v) if isinstance(shift, Tensor) else out.add_(v, alpha=shift)
            out.add_(self.damping.mv(v))
            if not has_wd:
                return out
            return out.addcmul_(wd, v) if isinstance(wd, Tensor) else out.add_(v, alpha=wd)

        return lam, damped_mv

    def _solve(self, s: "_Step", op, damped_mv: Callable[[Tensor], Tensor], state: dict):
        """Line 4: δ ← PCG(−∇f, A, x₀ = ζ·δ₍k−1₎, P) (Alg. 2, §10), keeping the iterates
        ⌈γ^m⌉ for backtracking."""
        group = self.param_groups[0]
        prev = state.get("delta")
        usable = prev is not None and group["cg_decay"] > 0 and prev.shape == s.grad.shape
        x0 = prev * group["cg_decay"] if usable else None
        factor = group["backtracking_factor"] or 1e9  # None: only the last iterate is kept
        trust_metric = self.preconditioner.diagonal() if group["trust_radius"] is not None else None
        cg_kwargs = dict(precondition=self.preconditioner.solve, max_iters=group["cg_max_iters"],
                         min_iters=group["cg_min_iters"], tol=group["cg_tol"], backtracking_factor=factor,
                         trust_radius=group["trust_radius"], trust_metric=trust_metric,
                         check_every=self._check_every(s.params),
                         overhead_iters=self._overhead_iterations(s, op) if group["cg_stop"] == "rate" else None)
        try:
            return cg(damped_mv, -s.grad, x0, **cg_kwargs)
        except FloatingPointError:
            if x0 is None:
                raise
            logger.warning("torch_hf: non-finite product at the CG initialisation; restarting CG from zero")
            return cg(damped_mv, -s.grad, None, **cg_kwargs)

    def _overhead_iterations(self, s: "_Step", op) -> float:
        """What this step costs outside CG, in CG iterations (products on the curvature
        batch), for ``cg_stop="rate"``: counted, not timed, so runs stay reproducible and
        every process of a group stops CG at the same iteration. The curvature evaluation
        and the preconditioner's estimate cost about one product each; a gradient on the
        gradient batch ``r`` times the curvature batch ``_GRADIENT_PER_PRODUCT·r``; each
        trial objective (as many as the last step needed) ``_FORWARD_PER_PRODUCT·r``."""
        r = s.batch_ratio
        cost = 1.0 + (0.0 if isinstance(self.preconditioner, Identity) else 1.0)
        if s.separate_gradient:
            cost += _GRADIENT_PER_PRODUCT * r
        return cost + self._last_trial_evaluations * _FORWARD_PER_PRODUCT * r

    def _f_at(self, s: "_Step", delta: Tensor, alpha: float = 1.0) -> float:
        """The objective at the trial point θ₀ + α·δ (left written in the parameters)."""
        s.evals += 1
        self._write_trial(s.params, s.theta0 + alpha * delta)
        return self._objective(s.closure, s.params, s.wd, s.reducer)

    def _backtrack(self, s: "_Step", result) -> tuple[int, Tensor, float, float]:
        """Line 5: CG-backtracking (§8.7), walking back from the last saved iterate while f
        improves. Returns (CG iteration, δ, q(δ), f(θ₀ + δ))."""
        saved = result.saved
        if self.param_groups[0]["backtracking_factor"] is None:
            saved = saved[-1:]
        j, f_best = cg_backtracking([x for _, x, _ in saved], lambda d: self._f_at(s, d))
        s.backtracking_evals = s.evals
        chosen_it, delta, q_chosen = saved[j]
        return chosen_it, delta, q_chosen, f_best

    def _adapt_damping(self, s: "_Step", op, delta: Tensor, q_chosen: float, f_best: float,
                       state: dict) -> tuple[float, float, bool]:
        """Line 6: ρ = (f(θ+δ) − f(θ)) / M(δ) against the undamped model M(δ) = q(δ) − ½ δᵀλDδ
        (§8.5, eq. 10) and the Levenberg-Marquardt update of λ. Steps whose actual and
        predicted changes are both below the loss's float resolution leave λ alone.
        Returns (ρ, M(δ), whether ρ was informative)."""
        if type(self.damping).model_penalty is not Damping.model_penalty:
            self._write_trial(s.params, s.theta0)  # the operator's graph saw θ₀
        model_reduction = q_chosen - self.damping.model_penalty(delta, op)
        actual = f_best - s.loss_before
        rho = actual / model_reduction if model_reduction < 0 else (-math.inf if math.isfinite(actual) else math.nan)
        if not math.isfinite(f_best):
            rho = math.nan
        # Below the loss's float resolution f(θ+δ) − f(θ) is rounding, not information:
        # ρ would read 0 and λ would grow on noise (a full-batch run then stalls silently).
        s.resolution = resolution = 8 * s.float_eps * max(abs(s.loss_before), 1e-30)
        informative = not (math.isfinite(f_best) and abs(actual) <= resolution and abs(model_reduction) <= resolution)
        if informative:
            self.damping.update(rho)
        return rho, model_reduction, informative

    def _line_search(self, s: "_Step", delta: Tensor, f_best: float, informative: bool = True
                     ) -> tuple[float, float, float]:
        """Line 7: Armijo backtracking f(θ+αδ) ≤ f(θ) + c·α·∇fᵀδ (§8.8). Returns (α, f, ∇fᵀδ);
        α = 0 when δ is not a descent direction or no α passes. A descent step whose actual and
        predicted changes are both below the loss's float resolution is taken whole: comparing
        f there compares rounding, and the step cannot change f by more than that rounding,
        while the model's step still carries θ to the minimum to the gradient's precision."""
        group = self.param_groups[0]
        slope = float(torch.dot(s.grad, delta))
        alpha, f_new = 1.0, f_best
        c = group["line_search_c"]
        if slope >= 0 or not math.isfinite(slope):
            return 0.0, s.loss_before, slope  # not a descent direction: no step
        if not informative:
            return alpha, f_new, slope
        if c is not None:
            tries = 0
            while not (f_new <= s.loss_before + c * alpha * slope):
                if tries >= group["line_search_max_evals"]:
                    return 0.0, s.loss_before, slope
                alpha *= group["line_search_beta"]
                f_new = self._f_at(s, delta, alpha)
                tries += 1
        elif not math.isfinite(f_new):
            return 0.0, s.loss_before, slope
        return alpha, f_new, slope

    def _apply(self, s: "_Step", delta: Tensor, alpha: float, result, state: dict) -> float:
        """Line 8: θ ← θ₀ + lr·α·δ (θ₀ itself, bit for bit, when the step is rejected); CG's
        final iterate is kept to start the next CG (§10). Returns lr·α."""
        step_scale = alpha * self.param_groups[0]["lr"]
        # The parameters hold the last trial point: write the chosen one.
        self._write(s.params, s.theta0 if step_scale == 0.0 else s.theta0 + step_scale * delta)
        state["step"] += 1
        state["delta"] = result.x.detach().clone()
        state["damping"] = self.damping.state_dict()
        state["preconditioner"] = self.preconditioner.state_dict()
        return step_scale

    def _record(self, diag: StepDiagnostics) -> None:
        self.last_step = diag
        if self.history_size != 0:
            self.history.append(diag)
            if self.history_size is not None and len(self.history) > self.history_size:
                del self.history[: len(self.history) - self.history_size]
        logger.debug("torch_hf step %d: loss %.6g -> %.6g, rho %.3g, lambda %.3g, cg %d (%s), alpha %.3g",
                     diag.step, diag.loss_before, diag.loss_after, diag.rho, diag.damping, diag.cg_iterations,
                     diag.cg_stop_reason, diag.line_search_alpha)


@dataclass
class _Step:
    """What the phases of one step share."""

    params: list
    wd: Any
    reducer: Any
    closure: Callable
    theta0: Tensor | None = None
    grad: Tensor | None = None
    loss_before: float = math.nan
    float_eps: float = 0.0
    resolution: float = 0.0  # the loss's float resolution at θ₀
    separate_gradient: bool = False  # the gradient batch is not the curvature batch
    batch_ratio: float = 1.0  # gradient batch / curvature batch (by the outputs' sizes)
    products: int = 0
    evals: int = 0
    backtracking_evals: int = 0
    times: dict = field(default_factory=dict)


def cg_backtracking(iterates: list[Tensor], objective: Callable[[Tensor], float]) -> tuple[int, float]:
    """CG-backtracking (§8.7, Martens 2010): evaluate the objective at the last saved
    iterate, then walk back through earlier ones while it keeps decreasing.

    Returns the index of the chosen iterate and its objective value. Non-finite values
    count as +inf, so a diverged tail is walked past.
    """
    if not iterates:
        raise ValueError("no CG iterates to choose from")
    j = len(iterates) - 1
    best = objective(iterates[j])
    while j > 0:
        previous = objective(iterates[j - 1])
        if previous < best or not math.isfinite(best):
            best, j = previous, j - 1
        else:
            break
    return j, best


@contextlib.contextmanager
def _denormals_flushed(enabled: bool):
    """Flush subnormal floats to zero inside the block (CPU), restoring the caller's mode.
    Yields whether flushing is in force inside the block.

    torch has no getter for the mode, so it is read off one multiplication: with
    flush-to-zero a float32 subnormal times one is zero."""
    already = _flushing_denormals()
    if not enabled or already:
        yield already
        return
    supported = torch.set_flush_denormal(True)
    try:
        yield supported
    finally:
        if supported:
            torch.set_flush_denormal(False)


def _flushing_denormals() -> bool:
    return float(torch.tensor([1e-39], dtype=torch.float32).mul(1.0)) == 0.0


@contextlib.contextmanager
def _blame(which: str):
    """Name the closure behind a contract violation or a non-finite value."""
    try:
        yield
    except (ClosureError, NonFiniteLossError) as exc:
        if exc.args and isinstance(exc.args[0], str) and not exc.args[0].startswith(which):
            exc.args = (f"{which}: {exc.args[0]}",) + exc.args[1:]
        raise


def _loss_only(closure: Callable) -> Callable[[], Tensor]:
    """The closure's loss alone (the Hessian of f needs no outputs or hidden states)."""
    def loss_closure() -> Tensor:
        result = closure()
        return result[0] if isinstance(result, (tuple, list)) else result
    return loss_closure


def _stall_message(verdict: str, count: int, grad_norm: float, resolution: float, detail: str) -> str:
    what = {"saddle": "HF has stalled at a saddle point: the Hessian has a negative eigenvalue that the "
                      "Gauss-Newton matrix does not see",
            "plateau": "HF has stalled on a plateau: the loss's curvature is too small for any step to change it "
                       "resolvably",
            "unknown": "HF has stalled, and whether at a minimum could not be checked"}[verdict]
    return (f"torch_hf: {what} ({detail}). {count} HF steps in a row changed the loss by less than its float "
            f"resolution ({resolution:.2g}) at gradient norm {grad_norm:.2g}; λ is left as it is, since ρ "
            "carries no information there. Likely causes: dense default init or saturated units (try "
            "torch_hf.nn.sparse_init_), a loss in float32 that cannot resolve further progress (use float64). "
            "Minibatches or a smaller curvature batch (§12) help leave a plateau; curvature='hessian' with "
            "trust_radius follows negative curvature out of a saddle.")


def _nonzero(wd) -> bool:
    return bool(wd.any()) if isinstance(wd, Tensor) else wd != 0
