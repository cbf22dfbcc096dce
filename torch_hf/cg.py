"""Preconditioned conjugate gradient for HF (Algorithm 2, §4, §8.6, §8.7, §10).

Minimises the quadratic ``q(x) = ½ xᵀ A x − bᵀ x`` (in HF: A = B + λD, b = −∇f, so
q is the damped model M̂(δ) − f) given only products ``mv(v) = A v``:

* any starting point ``x0`` (HF starts from ζ·δ₍k−1₎, §10);
* q is tracked for free as ``q(x_i) = ½ (r_i − b)ᵀ x_i`` with ``r_i = A x_i − b``;
* relative-progress termination (§4): stop at iteration j when
  ``s_j = (q(x_j) − q(x_{j−k})) / q(x_j) < tol`` with window ``k = max(10, ⌈0.1 j⌉)``
  and ``q(x_j) < 0``, plus ``max_iters`` / ``min_iters``;
* optional rate termination, §4's "more economical trade-off between relative progress
  and computation" made explicit: given what the rest of the HF step costs in units of
  CG iterations (``overhead_iters``), stop when the recent decrease of q per iteration,
  ``(q(x_{j−k}) − q(x_j)) / k``, falls below the step's average decrease per unit of cost,
  ``−q(x_j) / (overhead_iters + j)``, with ``k = max(2, ⌈0.1 j⌉)``. This is the stopping
  rule that maximises the model decrease per unit of time over a sequence of steps when
  each further CG iteration buys less than the one before (the marginal value theorem).
  It depends only on q and the given cost, so every process of a data-parallel group
  makes the same decision;
* negative or zero curvature ``pᵀAp ≤ 0`` (or a non-finite product) stops CG with the
  last good iterate;
* iterates are kept on a geometric schedule (iterations ⌈γ^m⌉, γ = 1.3 by default)
  for CG-backtracking (§8.7), always including the last one;
* optional Steihaug-Toint truncation at the trust-region boundary ``‖x‖_P = radius``
  (§8.6; P is the preconditioner, or the identity).

Host synchronisation: α, β and q stay on the device; the loop reads them back only
every ``check_every`` iterations to decide termination (``check_every=1`` on CPU costs
nothing). When curvature turns non-positive between checks, α is zeroed on the device
so the iterate stops moving until the next check ends the run. The trust-region test
needs a norm on the host each iteration.

On a GPU the vector work of an iteration (two dozen small kernels after the product) is
launch-bound: with ``capture_stream`` it is recorded once into a CUDA graph, in place on
fixed buffers, and replayed each iteration (:func:`_cg_graphed`; the product itself is
captured by :mod:`torch_hf.curvature.capture`). The iterates are those of the loop below.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import Tensor

__all__ = ["CGResult", "cg", "backtracking_schedule"]


@dataclass
class CGResult:
    """Outcome of :func:`cg`.

    Attributes:
        x: the final iterate.
        q: q(x) of the final iterate (float).
        iterations: number of CG iterations (products with A after the initial residual).
        stop_reason: ``"progress"``, ``"rate"``, ``"max_iters"``, ``"converged"``,
            ``"negative_curvature"``, ``"non_finite"`` or ``"trust_region"``.
        saved: ``[(iteration, x_i, q(x_i))]`` on the geometric schedule, ascending,
            last entry the final iterate.
        q_history: q(x_i) for i = 0..iterations.
        capture_failure: with ``capture_stream``, why the vector work could not be
            captured (it then ran uncaptured), else ``None``.
    """

    x: Tensor
    q: float
    iterations: int
    stop_reason: str
    saved: list[tuple[int, Tensor, float]] = field(default_factory=list)
    q_history: list[float] = field(default_factory=list)
    capture_failure: str | None = None  # why CG's vector work could not be captured (capture_stream)


def backtracking_schedule(max_iters: int, factor: float = 1.3) -> list[int]:
    """Iterations ⌈factor^m⌉ (m = 0, 1, ...) up to ``max_iters``: where CG keeps iterates."""
    if factor <= 1.0:
        raise ValueError(f"backtracking factor must be > 1, got {factor}")
    out, m = [], 0
    while True:
        i = math.ceil(factor**m)
        if i > max_iters:
            return out
        if not out or i != out[-1]:
            out.append(i)
        m += 1


def _boundary_step(x: Tensor, p: Tensor, radius: float, metric: Tensor | None) -> float:
    """τ ≥ 0 with ‖x + τ p‖_P = radius."""
    w = metric if metric is not None else 1.0
    a = float((p * w * p).sum())
    b = 2.0 * float((x * w * p).sum())
    c = float((x * w * x).sum()) - radius**2
    disc = max(b * b - 4 * a * c, 0.0)
    return (-b + math.sqrt(disc)) / (2 * a) if a > 0 else 0.0


def cg(
    mv: Callable[[Tensor], Tensor],
    b: Tensor,
    x0: Tensor | None = None,
    precondition: Callable[[Tensor], Tensor] | None = None,
    *,
    max_iters: int = 250,
    min_iters: int = 1,
    tol: float = 5e-4,
    backtracking_factor: float = 1.3,
    trust_radius: float | None = None,
    trust_metric: Tensor | None = None,
    check_every: int = 1,
    overhead_iters: float | None = None,
    capture_stream=None,
) -> CGResult:
    """Run preconditioned CG (Algorithm 2) on ``A x = b``.

    Args:
        mv: ``v -> A v`` for a symmetric A (positive definite along the Krylov space).
        b: right-hand side (flat vector).
        x0: starting point; zeros when ``None``.
        precondition: ``r -> P⁻¹ r`` (Algorithm 2's "solution of P y = r").
        max_iters: most iterations (paper: 250).
        min_iters: fewest iterations before progress termination may stop CG.
        tol: relative-progress threshold on s_j (§4).
        backtracking_factor: γ of the iterate-saving schedule ⌈γ^m⌉ (§8.7).
        trust_radius: when set, Steihaug-Toint truncation at ``‖x‖_P = trust_radius``.
        trust_metric: diagonal of P for the trust-region norm (identity when ``None``).
        check_every: read termination quantities on the host every this many iterations.
        overhead_iters: what one outer step costs outside CG, in CG iterations; enables
            rate termination (see the module docstring). ``None``: progress criterion only.
        capture_stream: a CUDA stream (the current one) to capture the iteration's vector
            work on, replayed as one CUDA graph per iteration; used with ``check_every > 1``
            and no trust region, ignored otherwise. A capture that fails runs uncaptured.

    Returns:
        :class:`CGResult`.
    """
    _check_arguments(max_iters, min_iters, tol, check_every, trust_radius, overhead_iters)
    solve = precondition if precondition is not None else (lambda r: r)
    if capture_stream is not None and check_every > 1 and trust_radius is None:
        return _cg_graphed(mv, b, x0, solve, max_iters, min_iters, tol, backtracking_factor, check_every,
                           overhead_iters, capture_stream)
    x, r, y, p, q_dev, ok_dev = _start(mv, b, x0, solve, max_iters)
    ry = torch.dot(r, y)
    save_at = set(backtracking_schedule(max_iters, backtracking_factor))
    good = torch.ones((), dtype=torch.bool, device=b.device)  # no bad curvature seen so far
    finite = torch.ones((), dtype=torch.bool, device=b.device)  # no non-finite product seen
    q_host: list[float] = []
    saved: list[tuple[int, Tensor]] = []
    stop_reason = "max_iters"
    i = 0
    eager = check_every == 1  # checking every iteration anyway: stop on bad curvature at once
    while i < max_iters:
        ap = mv(p)
        pap = torch.dot(p, ap)
        ok = torch.isfinite(pap) & (pap > 0)
        finite = finite & torch.isfinite(pap)
        good = good & ok
        ok_dev[i + 1] = good
        if eager and not bool(good):
            i += 1
            stop_reason = "bad"
            break
        alpha, ap = _step_length(ry, pap, ap, ok, good, eager)
        if trust_radius is not None:
            x_next = torch.addcmul(x, alpha, p)
            if not bool(good) or _outside(x_next, trust_radius, trust_metric):
                x = x + _boundary_step(x, p, trust_radius, trust_metric) * p
                r = mv(x) - b
                i += 1
                q_dev[i] = 0.5 * torch.dot(r - b, x)
                ok_dev[i] = True
                stop_reason = "trust_region"
                saved.append((i, x))
                break
            x = x_next
        else:
            x = torch.addcmul(x, alpha, p)  # out of place: saved iterates must not change
        r.addcmul_(alpha, ap)
        i += 1
        q_dev[i] = 0.5 * (torch.dot(r, x) - torch.dot(b, x))
        if i in save_at:
            saved.append((i, x))
        if i % check_every == 0 or i == max_iters:
            reason = _host_check(good, q_dev, q_host, i, min_iters, tol, overhead_iters)
            if reason is not None:
                stop_reason = reason
                break
        if i == max_iters:
            break
        y = solve(r)
        ry_next = torch.dot(r, y)
        beta = ry_next / torch.where(ry != 0, ry, torch.ones_like(ry))
        p.mul_(beta).sub_(y)
        ry = ry_next
    return _result(x, i, stop_reason, bool(finite), q_dev, ok_dev, q_host, saved)


def _cg_graphed(mv: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None, solve: Callable[[Tensor], Tensor],
                max_iters: int, min_iters: int, tol: float, backtracking_factor: float, check_every: int,
                overhead_iters: float | None, stream) -> CGResult:
    """:func:`cg`'s loop (``check_every > 1``, no trust region) with the work after each
    product done in place on fixed buffers by one function, ``update``: run as is for the
    first iteration, captured into a CUDA graph on ``stream`` at the second and replayed
    from then on; ``stream=None`` runs it as is throughout (the same arithmetic as the
    loop of :func:`cg`, iterate for iterate, which tests check on CPU). The iteration
    count and the saved iterates are kept on the host as there; the updates of p that
    the loop skips after its last iteration are done here and not used."""
    from .curvature.capture import CapturedUpdate

    x, r, y, p, q_dev, ok_dev = _start(mv, b, x0, solve, max_iters)  # fresh tensors, updated in place
    ry = torch.dot(r, y)
    good = torch.ones((), dtype=torch.bool, device=b.device)
    finite = torch.ones((), dtype=torch.bool, device=b.device)
    count = torch.zeros(1, dtype=torch.long, device=b.device)  # the iteration, as an index into q_dev / ok_dev
    ap_in = torch.empty_like(b)

    def update() -> None:
        pap = torch.dot(p, ap_in)
        ok = torch.isfinite(pap) & (pap > 0)
        finite.logical_and_(torch.isfinite(pap))
        good.logical_and_(ok)
        count.add_(1)
        ok_dev.index_copy_(0, count, good.reshape(1))
        alpha, ap = _step_length(ry, pap, ap_in, ok, good, False)
        x.addcmul_(alpha, p)
        r.addcmul_(alpha, ap)
        q_dev.index_copy_(0, count, (0.5 * (torch.dot(r, x) - torch.dot(b, x))).reshape(1))
        y.copy_(solve(r))
        ry_next = torch.dot(r, y)
        beta = ry_next / torch.where(ry != 0, ry, torch.ones_like(ry))
        p.mul_(beta).sub_(y)
        ry.copy_(ry_next)

    step = CapturedUpdate(update, stream, b.device)
    save_at = set(backtracking_schedule(max_iters, backtracking_factor))
    q_host: list[float] = []
    saved: list[tuple[int, Tensor]] = []
    stop_reason = "max_iters"
    i = 0
    while i < max_iters:
        ap_in.copy_(mv(p))
        step()
        i += 1
        if i in save_at:
            saved.append((i, x.clone()))
        if i % check_every == 0 or i == max_iters:
            reason = _host_check(good, q_dev, q_host, i, min_iters, tol, overhead_iters)
            if reason is not None:
                stop_reason = reason
                break
    result = _result(x, i, stop_reason, bool(finite), q_dev, ok_dev, q_host, saved)
    result.capture_failure = step.failure
    return result


def _start(mv: Callable[[Tensor], Tensor], b: Tensor, x0: Tensor | None, solve: Callable[[Tensor], Tensor],
           max_iters: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """x₀, r₀ = A x₀ − b, y₀ = P⁻¹ r₀, p₀ = −y₀, and the device buffers of q and of the
    curvature checks (read back every ``check_every`` iterations), q(x₀) filled in."""
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = (mv(x) - b) if x0 is not None else -b  # fresh tensors: r is updated in place
    y = solve(r)
    p = -y  # a fresh tensor: updated in place
    q_dev = torch.empty(max_iters + 1, dtype=b.dtype, device=b.device)
    ok_dev = torch.ones(max_iters + 1, dtype=torch.bool, device=b.device)
    q_dev[0] = 0.5 * torch.dot(r - b, x)
    if not bool(torch.isfinite(q_dev[0])):
        raise FloatingPointError("CG: the initial residual is not finite (non-finite product or b)")
    return x, r, y, p, q_dev, ok_dev


def _step_length(ry: Tensor, pap: Tensor, ap: Tensor, ok: Tensor, good: Tensor, eager: bool) -> tuple[Tensor, Tensor]:
    """α = rᵀy / pᵀAp. Between host checks a bad product freezes x and r (α = 0, A p masked)
    until the next check stops CG."""
    if eager:
        return ry / pap, ap
    alpha = torch.where(good, ry / torch.where(ok, pap, torch.ones_like(pap)), torch.zeros_like(pap))
    return alpha, ap.masked_fill(~good, 0.0)


def _outside(x: Tensor, radius: float, metric: Tensor | None) -> bool:
    """‖x‖_P > radius (P the trust region's metric, the identity when ``None``)."""
    w = metric if metric is not None else 1.0
    return float((x * w * x).sum()) > radius**2


def _check_arguments(max_iters: int, min_iters: int, tol: float, check_every: int, trust_radius: float | None,
                     overhead_iters: float | None) -> None:
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if min_iters < 0 or min_iters > max_iters:
        raise ValueError(f"min_iters must be in [0, max_iters], got {min_iters}")
    if not tol >= 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    if check_every < 1:
        raise ValueError(f"check_every must be >= 1, got {check_every}")
    if trust_radius is not None and not trust_radius > 0:
        raise ValueError(f"trust_radius must be > 0, got {trust_radius}")
    if overhead_iters is not None and not overhead_iters >= 0:
        raise ValueError(f"overhead_iters must be >= 0, got {overhead_iters}")


def _host_check(good: Tensor, q_dev: Tensor, q_host: list[float], i: int, min_iters: int, tol: float,
                overhead_iters: float | None) -> str | None:
    """The check every ``check_every`` iterations (a host synchronisation): ``"bad"`` after
    non-positive or non-finite curvature, else q(x_0..x_i) read into ``q_host`` and the
    termination tests' verdict."""
    if not bool(good):
        return "bad"
    q_host.extend(q_dev[len(q_host) : i + 1].tolist())
    return _stop_test(q_host, i, min_iters, tol, overhead_iters)


def _stop_test(q: list[float], i: int, min_iters: int, tol: float, overhead_iters: float | None) -> str | None:
    """The termination tests at iteration ``i`` from q(x_0..x_i) on the host: relative
    progress (§4) and, with ``overhead_iters``, the rate rule (the module docstring)."""
    q_i = q[i]
    k = max(10, math.ceil(0.1 * i))
    if i >= max(min_iters, k + 1) and q_i < 0 and (q_i - q[i - k]) / q_i < tol:
        return "progress"
    w = max(2, math.ceil(0.1 * i))  # the rate test's own, shorter window
    if overhead_iters is not None and i >= max(min_iters, w) and q_i < 0 \
            and (q[i - w] - q_i) * (overhead_iters + i) < -q_i * w:
        return "rate"
    return None


def _result(x: Tensor, i: int, stop_reason: str, finite: bool, q_dev: Tensor, ok_dev: Tensor, q_host: list[float],
            saved: list[tuple[int, Tensor]]) -> CGResult:
    """The :class:`CGResult` of a run that ended at iteration ``i``: after bad curvature,
    the last good iterate (x is frozen since the first bad step, so x equals it)."""
    last = i
    if stop_reason == "bad":
        # Iteration j is bad when ok_dev[j] is false: x_j = x_{j-1}; keep up to the last good one.
        flags = ok_dev[: i + 1].tolist()
        last = flags.index(False) - 1
        stop_reason = "negative_curvature" if finite else "non_finite"
    q_host = (q_host + q_dev[len(q_host) : last + 1].tolist())[: last + 1]
    saved = [(it, xi) for it, xi in saved if it <= last]
    if not saved or saved[-1][0] != last:
        saved.append((last, x))
    saved_out = [(it, xi, q_host[it]) for it, xi in saved]
    return CGResult(x=saved_out[-1][1], q=saved_out[-1][2], iterations=last, stop_reason=stop_reason,
                    saved=saved_out, q_history=q_host)
