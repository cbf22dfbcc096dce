"""Preconditioned CG (Algorithm 2) as a pure function of tensors."""
import math

import pytest
import torch

from torch_hf.cg import backtracking_schedule, cg


def spd(n, low=1.0, high=10.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.logspace(math.log10(low), math.log10(high), n, dtype=torch.float64)) @ q.T


def rhs(n, seed=1):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("preconditioned", [False, True])
def test_cg_solves_spd_system_in_at_most_n_iterations(preconditioned):
    n = 40
    a, b = spd(n), rhs(n)
    if preconditioned:  # badly scaled rows/columns that a Jacobi preconditioner undoes
        s = torch.logspace(-1, 1, n, dtype=torch.float64)
        a = s[:, None] * a * s[None, :]
    d = torch.diag(a)
    res = cg(lambda v: a @ v, b, precondition=(lambda r: r / d) if preconditioned else None, max_iters=n, tol=0.0)
    expected = torch.linalg.solve(a, b)
    assert res.iterations <= n
    assert float((res.x - expected).norm() / expected.norm()) <= 1e-10


def test_preconditioning_reduces_iterations_on_badly_scaled_system():
    n = 60
    s = torch.logspace(-2, 2, n, dtype=torch.float64)
    a = s[:, None] * spd(n) * s[None, :]
    b = rhs(n)
    d = torch.diag(a)
    plain = cg(lambda v: a @ v, b, max_iters=500, tol=1e-10)
    pre = cg(lambda v: a @ v, b, precondition=lambda r: r / d, max_iters=500, tol=1e-10)
    assert pre.iterations < plain.iterations


def test_quadratic_value_is_tracked_exactly():
    n = 20
    a, b = spd(n), rhs(n)
    x0 = rhs(n, seed=5)
    res = cg(lambda v: a @ v, b, x0=x0, max_iters=15, tol=0.0)
    for _, x, q in res.saved:
        assert q == pytest.approx(float(0.5 * x @ a @ x - b @ x), rel=1e-12, abs=1e-12)
    assert res.q_history[0] == pytest.approx(float(0.5 * x0 @ a @ x0 - b @ x0), rel=1e-12)


def test_iterates_are_saved_on_the_geometric_schedule():
    n = 80
    a, b = spd(n, high=1000.0), rhs(n)
    res = cg(lambda v: a @ v, b, max_iters=50, tol=0.0)
    schedule = [i for i in backtracking_schedule(50, 1.3) if i <= res.iterations]
    assert [i for i, _, _ in res.saved][: len(schedule)] == schedule
    assert res.saved[-1][0] == res.iterations
    assert backtracking_schedule(20, 1.3) == [1, 2, 3, 4, 5, 7, 9, 11, 14, 18]


def test_quadratic_decreases_monotonically_from_zero_start():
    a, b = spd(50, high=100.0), rhs(50)
    res = cg(lambda v: a @ v, b, max_iters=40, tol=0.0)
    assert all(later <= earlier + 1e-12 for earlier, later in zip(res.q_history, res.q_history[1:]))


def test_relative_progress_termination():
    a, b = spd(200, high=1e4), rhs(200)
    res = cg(lambda v: a @ v, b, max_iters=200, tol=5e-2)
    assert res.stop_reason == "progress"
    i, q = res.iterations, res.q_history
    k = max(10, math.ceil(0.1 * i))
    assert (q[i] - q[i - k]) / q[i] < 5e-2
    assert res.iterations < 200


def test_min_iters_is_respected():
    a, b = spd(200, high=1e4), rhs(200)
    res = cg(lambda v: a @ v, b, max_iters=200, min_iters=60, tol=5e-2)
    assert res.iterations >= 60


def test_negative_curvature_stops_with_last_good_iterate():
    n = 10
    a = torch.diag(torch.tensor([1.0, 2.0, 3.0, -1.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0], dtype=torch.float64))
    b = torch.ones(n, dtype=torch.float64)
    res = cg(lambda v: a @ v, b, max_iters=n, tol=0.0)
    assert res.stop_reason == "negative_curvature"
    assert torch.isfinite(res.x).all()
    assert res.q == pytest.approx(float(0.5 * res.x @ a @ res.x - b @ res.x), rel=1e-12)


def test_non_finite_product_keeps_best_finite_iterate():
    a, b = spd(30), rhs(30)
    calls = {"n": 0}

    def mv(v):
        calls["n"] += 1
        out = a @ v
        return out * float("nan") if calls["n"] > 5 else out

    res = cg(mv, b, max_iters=30, tol=0.0)
    assert res.stop_reason == "non_finite"
    assert res.iterations == 5
    assert torch.isfinite(res.x).all() and math.isfinite(res.q)
    assert res.q == pytest.approx(float(0.5 * res.x @ a @ res.x - b @ res.x), rel=1e-12)


@pytest.mark.parametrize("check_every", [3, 7])
def test_checking_termination_less_often_gives_the_same_answer(check_every):
    a, b = spd(60, high=100.0), rhs(60)
    ref = cg(lambda v: a @ v, b, max_iters=60, tol=1e-3)
    lazy = cg(lambda v: a @ v, b, max_iters=60, tol=1e-3, check_every=check_every)
    assert lazy.iterations >= ref.iterations and lazy.iterations < ref.iterations + check_every
    assert lazy.q <= ref.q + 1e-12


def test_lazy_checks_still_stop_at_negative_curvature():
    d = torch.tensor([1.0, 2.0, 3.0, -1.0, 4.0, 5.0], dtype=torch.float64)
    b = torch.ones(6, dtype=torch.float64)
    ref = cg(lambda v: d * v, b, max_iters=6, tol=0.0)
    lazy = cg(lambda v: d * v, b, max_iters=6, tol=0.0, check_every=5)
    assert lazy.stop_reason == ref.stop_reason == "negative_curvature"
    assert lazy.iterations == ref.iterations and torch.equal(lazy.x, ref.x)


def test_steihaug_toint_truncates_at_the_trust_region_boundary():
    a, b = spd(30), rhs(30) * 10
    full = torch.linalg.solve(a, b)
    radius = 0.3 * float(full.norm())
    res = cg(lambda v: a @ v, b, max_iters=30, tol=0.0, trust_radius=radius)
    assert res.stop_reason == "trust_region"
    assert float(res.x.norm()) == pytest.approx(radius, rel=1e-10)
    assert res.q < 0


def test_steihaug_toint_uses_the_preconditioner_norm():
    a, b = spd(30), rhs(30) * 10
    w = torch.linspace(1, 5, 30, dtype=torch.float64)
    res = cg(lambda v: a @ v, b, precondition=lambda r: r / w, max_iters=30, tol=0.0, trust_radius=1.0, trust_metric=w)
    assert float((res.x * w * res.x).sum().sqrt()) == pytest.approx(1.0, rel=1e-10)


def test_invalid_arguments_raise():
    a, b = spd(4), rhs(4)
    with pytest.raises(ValueError, match="max_iters"):
        cg(lambda v: a @ v, b, max_iters=0)
    with pytest.raises(ValueError, match="min_iters"):
        cg(lambda v: a @ v, b, max_iters=3, min_iters=5)
    with pytest.raises(ValueError, match="check_every"):
        cg(lambda v: a @ v, b, check_every=0)
    with pytest.raises(ValueError, match="trust_radius"):
        cg(lambda v: a @ v, b, trust_radius=-1.0)
    with pytest.raises(ValueError, match="factor"):
        backtracking_schedule(10, 1.0)


def test_rate_termination_weighs_progress_against_the_steps_other_costs():
    n = 200
    a, b = spd(n, low=1e-4, high=1.0), rhs(n)
    # No other cost: CG stops once its recent rate of decrease falls below its average.
    cheap = cg(lambda v: a @ v, b, max_iters=n, tol=0.0, overhead_iters=0.0)
    assert cheap.stop_reason == "rate" and cheap.iterations < n
    # An outer step that costs far more than CG: every iteration is worth it.
    costly = cg(lambda v: a @ v, b, max_iters=n, tol=0.0, overhead_iters=1e9)
    assert costly.stop_reason != "rate" and costly.iterations > cheap.iterations
    assert cg(lambda v: a @ v, b, max_iters=n, min_iters=20, tol=0.0, overhead_iters=0.0).iterations >= 20
    with pytest.raises(ValueError, match="overhead_iters"):
        cg(lambda v: a @ v, b, overhead_iters=-1.0)


def _indefinite(n, seed=2):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.linspace(-1.0, 10.0, n, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("case", ["spd", "preconditioned_warm_start", "indefinite", "non_finite", "rate"])
@pytest.mark.parametrize("check_every", [2, 5])
def test_the_in_place_update_for_cuda_graphs_takes_the_loops_iterates(case, check_every):
    """_cg_graphed runs the work after each product as one in-place function (captured on
    CUDA, run as is here): iterate for iterate, the same arithmetic as cg's loop."""
    from torch_hf.cg import _cg_graphed

    n = 30
    a, b, x0, solve, overhead = spd(n, 1e-3, 1e3), rhs(n), None, (lambda r: r), None
    calls = [0]
    if case == "preconditioned_warm_start":
        d = torch.diag(a)
        solve, x0 = (lambda r: r / d), 0.1 * rhs(n, seed=5)
    elif case == "indefinite":
        a = _indefinite(n)
    elif case == "rate":  # stops by the rate rule at iteration 20
        a, overhead = spd(n, 1.0, 1e4), 3.0

    def mv(v):
        calls[0] += 1
        out = a @ v
        return out * float("nan") if case == "non_finite" and calls[0] == 9 else out

    kwargs = dict(max_iters=40, min_iters=1, tol=0.0 if case == "rate" else 1e-6, backtracking_factor=1.3,
                  check_every=check_every,
                  overhead_iters=overhead)
    loop = cg(mv, b, x0, solve, **kwargs)
    calls[0] = 0
    graphed = _cg_graphed(mv, b, x0, solve, kwargs["max_iters"], kwargs["min_iters"], kwargs["tol"], 1.3,
                          check_every, overhead, None)
    expected = {"spd": "max_iters", "preconditioned_warm_start": None, "indefinite": "negative_curvature",
                "non_finite": "non_finite", "rate": "rate"}[case]
    assert expected is None or loop.stop_reason == expected
    assert (graphed.iterations, graphed.stop_reason) == (loop.iterations, loop.stop_reason)
    assert torch.equal(graphed.x, loop.x) and graphed.q_history == loop.q_history
    assert [(i, q) for i, _, q in graphed.saved] == [(i, q) for i, _, q in loop.saved]
    assert all(torch.equal(u, v) for (_, u, _), (_, v, _) in zip(graphed.saved, loop.saved))
    if x0 is not None:
        assert torch.equal(x0, 0.1 * rhs(n, seed=5))  # the caller's start is not written to


def test_capture_stream_is_ignored_where_the_loop_reads_every_iteration():
    n = 20
    a, b = spd(n), rhs(n)
    plain = cg(lambda v: a @ v, b, max_iters=30, check_every=1)
    asked = cg(lambda v: a @ v, b, max_iters=30, check_every=1, capture_stream=object())  # never touched
    assert torch.equal(plain.x, asked.x)
