"""zoo.ops.topk against independent solutions written here: a textbook pool-adjacent-violators on one row, a brute
force over the block partitions of the isotonic problem (T2), the capped-simplex form of the mask and a minimax
form of the magnitude (both solved by bisection on a threshold), torch.topk for the hard operators."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import zoo.ops.topk as topk_module
from zoo.errors import ZooError
from zoo.ops.topk import soft_topk_magnitude, soft_topk_mask, topk_magnitude, topk_mask

P43 = 4.0 / 3.0
RELAXED = {"mask": soft_topk_mask, "magnitude": soft_topk_magnitude}


def rand(*shape, dtype=torch.float64, seed=0, scale=1.0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype) * scale


# ------------------------------------------------------------------------------------------------ references


def h_prime(g: float, s: float, w: float, lam: float, p: float, mag: bool) -> float:
    """d/dv of h_i(v) = r*(s - v) + w phi(v): r*(z) = z^2 / (2 lam) (p = 2) or z^4 / (4 lam^3) (p = 4/3)."""
    phi_prime = g if mag else 1.0
    if p == 2:
        return (g - s) / lam + w * phi_prime
    return (g - s) ** 3 / lam**3 + w * phi_prime


def block_value(block, s, w, lam, p, mag) -> float:
    """argmin_g sum_B h_i(g), by bisection on the (increasing) derivative."""
    lo, hi = -1e3, 1e3
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if sum(h_prime(mid, s[i], w[i], lam, p, mag) for i in block) > 0:
            hi = mid
        else:
            lo = mid
    return 0.5 * (lo + hi)


def sorted_problem(x: list[float], k: int, mag: bool):
    src = [abs(v) for v in x] if mag else list(x)
    order = sorted(range(len(x)), key=lambda i: -src[i])
    return order, [src[i] for i in order], [1.0 if j < k else 0.0 for j in range(len(x))]


def from_v(x, order, v, lam, p, mag) -> list[float]:
    """y* = grad R*(x - u*), u* = v un-sorted (times sign(x) for the magnitude)."""
    out = [0.0] * len(x)
    for pos, i in enumerate(order):
        z = x[i] - v[pos] * (math.copysign(1.0, x[i]) if mag else 1.0)
        out[i] = z / lam if p == 2 else z**3 / lam**3
    return out


def textbook_pav(x: list[float], k: int, lam: float, p: float, mag: bool) -> list[float]:
    """Pool adjacent violators on one row: push singletons, merge while the order v_1 >= v_2 >= .. is violated."""
    order, s, w = sorted_problem(x, k, mag)
    blocks: list[list] = []
    for i in range(len(x)):
        blocks.append([[i], block_value([i], s, w, lam, p, mag)])
        while len(blocks) > 1 and blocks[-2][1] < blocks[-1][1]:
            last = blocks.pop()
            blocks[-1][0] += last[0]
            blocks[-1][1] = block_value(blocks[-1][0], s, w, lam, p, mag)
    v = [0.0] * len(x)
    for block, val in blocks:
        for i in block:
            v[i] = val
    return from_v(x, order, v, lam, p, mag)


def brute_force_isotonic(x: list[float], k: int, lam: float, p: float, mag: bool) -> list[float]:
    """(T2) by enumeration: every split of 1..n into consecutive blocks, each at its own optimal value; keep the
    non-increasing candidates and take the one of least objective (the optimum is one of them)."""
    order, s, w = sorted_problem(x, k, mag)
    n = len(x)

    def h(v, i):
        z = s[i] - v
        phi = v * v / 2 if mag else v
        return (z * z / (2 * lam) if p == 2 else z**4 / (4 * lam**3)) + w[i] * phi

    best, best_v = math.inf, None
    for cuts in itertools.product([False, True], repeat=n - 1):
        blocks, start = [], 0
        for i, cut in enumerate(cuts, start=1):
            if cut:
                blocks.append(list(range(start, i)))
                start = i
        blocks.append(list(range(start, n)))
        vals = [block_value(b, s, w, lam, p, mag) for b in blocks]
        if any(a < b - 1e-9 for a, b in zip(vals, vals[1:])):
            continue
        v = [val for b, val in zip(blocks, vals) for _ in b]
        obj = sum(h(v[i], i) for i in range(n))
        if obj < best:
            best, best_v = obj, v
    return from_v(x, order, best_v, lam, p, mag)


def capped_simplex_mask(x: torch.Tensor, k: int, lam: float, p: float) -> torch.Tensor:
    """argmax_{0 <= y <= 1, sum y = k} <x, y> - (lam / p) ||y||_p^p of one row, from its KKT conditions:
    y_i = clip(((x_i - tau) / lam)^(1 / (p - 1)), 0, 1) with tau found by bisection so that sum y = k."""
    x = x.double()

    def y_of(tau):
        z = ((x - tau) / lam).clamp(0, 1)
        return z if p == 2 else z**3

    lo, hi = float(x.min()) - 2 * lam - 1, float(x.max()) + 1
    for _ in range(100):
        mid = 0.5 * (lo + hi)
        if float(y_of(mid).sum()) > k:
            lo = mid
        else:
            hi = mid
    return y_of(0.5 * (lo + hi))


def minimax_magnitude_p2(x: torch.Tensor, k: int, lam: float) -> torch.Tensor:
    """soft top-k in magnitude, p = 2, of one row through the saddle point of (T1): f(u) = max over the capped
    simplex of sum mu_i u_i^2 / 2, so (T1) = max_mu min_u |x - u|^2 / (2 lam) + sum mu_i u_i^2 / 2 =
    max_mu sum x_i^2 mu_i / (2 (1 + lam mu_i)); KKT: mu_i = clip((|x_i| / sqrt(2 t) - 1) / lam, 0, 1), t by
    bisection; then y* = (x - u*) / lam = x mu / (1 + lam mu)."""
    x = x.double()

    def mu_of(t):
        return ((x.abs() / math.sqrt(2 * t) - 1) / lam).clamp(0, 1)

    lo, hi = 1e-12, float(x.abs().max()) ** 2 + 1
    for _ in range(150):
        mid = math.sqrt(lo * hi)
        if float(mu_of(mid).sum()) > k:
            lo = mid
        else:
            hi = mid
    mu = mu_of(math.sqrt(lo * hi))
    return x * mu / (1 + lam * mu)


# ------------------------------------------------------------------------------------------------ hard operators


@pytest.mark.parametrize("dim", [0, 1, -1])
def test_hard_operators_match_torch_topk(dim):
    x = rand(5, 7, 6, seed=1)
    k = 3
    idx = torch.topk(x, k, dim=dim).indices
    ref = torch.zeros_like(x).scatter_(dim, idx, 1.0)
    assert torch.equal(topk_mask(x, k, dim=dim), ref)
    idx = torch.topk(x.abs(), k, dim=dim).indices
    ref = torch.zeros_like(x).scatter_(dim, idx, 1.0) * x
    assert torch.equal(topk_magnitude(x, k, dim=dim), ref)


def test_hard_per_row_k_and_gradient():
    x = rand(4, 9, seed=2, dtype=torch.float32).requires_grad_(True)
    ks = torch.tensor([1, 3, 9, 5])
    m = topk_mask(x, ks)
    for r in range(4):
        assert torch.equal(m[r], topk_mask(x[r], int(ks[r])))
    assert torch.equal(m.sum(-1), ks.float())
    topk_magnitude(x, ks).sum().backward()
    assert torch.equal(x.grad, topk_mask(x.detach().abs(), ks))


# ------------------------------------------------------------------------------------------------ exact solver


def random_rows(count: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    for trial in range(count):
        n = int(torch.randint(1, 9, (), generator=g))
        k = int(torch.randint(1, n + 1, (), generator=g))
        lam = float(torch.rand((), generator=g, dtype=torch.float64) * 3 + 0.05)
        x = torch.randn(n, generator=g, dtype=torch.float64) * 2
        if trial % 4 == 0 and n > 2:  # ties, also across the k / k+1 boundary
            x[torch.randperm(n, generator=g)[:2]] = float(x[0])
        if trial % 7 == 0 and n > 1:
            x[1] = -float(x[0])  # a tie in magnitude
        yield x, k, lam


@pytest.mark.parametrize("p", [2.0, P43])
@pytest.mark.parametrize("kind", ["mask", "magnitude"])
def test_pav_matches_textbook_pav_on_single_rows(p, kind):
    for x, k, lam in random_rows(40, seed=3):
        ref = torch.tensor(textbook_pav(x.tolist(), k, lam, p, kind == "magnitude"), dtype=torch.float64)
        got = RELAXED[kind](x, k, p=p, lam=lam)
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("p", [2.0, P43])
@pytest.mark.parametrize("kind", ["mask", "magnitude"])
def test_pav_matches_brute_force_over_block_partitions(p, kind):
    for x, k, lam in random_rows(12, seed=4):
        if x.numel() > 6:
            x = x[:6]
            k = min(k, 6)
        ref = torch.tensor(brute_force_isotonic(x.tolist(), k, lam, p, kind == "magnitude"), dtype=torch.float64)
        torch.testing.assert_close(RELAXED[kind](x, k, p=p, lam=lam), ref, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("p", [2.0, P43])
def test_mask_is_the_capped_simplex_solution(p):
    x = rand(6, 40, seed=5, scale=2.0)
    for lam in (0.05, 0.7, 5.0):
        got = soft_topk_mask(x, 9, p=p, lam=lam)
        ref = torch.stack([capped_simplex_mask(row, 9, lam, p) for row in x])
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_magnitude_p2_is_the_minimax_solution():
    x = rand(5, 30, seed=6, scale=2.0)
    for lam in (0.01, 0.5, 4.0):
        got = soft_topk_magnitude(x, 7, lam=lam)
        ref = torch.stack([minimax_magnitude_p2(row, 7, lam) for row in x])
        torch.testing.assert_close(got, ref, atol=1e-9, rtol=0)


def test_float32_numpy_sort_path_matches_the_torch_sort_path(monkeypatch):
    x = rand(70, 300, seed=7, dtype=torch.float32)  # several CPU chunks
    kt = torch.randint(1, 301, (70,), generator=torch.Generator().manual_seed(0))
    outs = []
    for fast in (True, False):
        monkeypatch.setattr(topk_module, "_numpy_path", lambda v, fast=fast: fast and v.dtype == torch.float32)
        outs.append(
            [
                f(x, k, p=p, lam=0.3, solver=solver)
                for f in RELAXED.values()
                for k in (30, kt)
                for p, solver in ((2.0, "pav"), (P43, "pav"), (2.0, "dykstra"))
            ]
        )
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-5)
    ref = RELAXED["mask"](x.double(), 30, lam=0.3)
    torch.testing.assert_close(outs[0][0].double(), ref, atol=2e-6, rtol=0)


# ------------------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("p,solver", [(2.0, "pav"), (P43, "pav"), (2.0, "dykstra")])
def test_mask_sums_to_k_and_lies_in_0_1(p, solver):
    x = rand(8, 50, seed=8)
    ks = torch.randint(1, 51, (8,), generator=torch.Generator().manual_seed(1))
    for k in (1, 13, 50, ks):
        y = soft_topk_mask(x, k, p=p, lam=0.5, solver=solver, dykstra_iters=10)
        expected = ks.double() if isinstance(k, torch.Tensor) else torch.full((8,), float(k), dtype=torch.float64)
        torch.testing.assert_close(y.sum(-1), expected, atol=1e-9, rtol=0)
        if solver == "pav":
            assert (y >= 0).all() and (y <= 1).all()


@pytest.mark.parametrize("p", [2.0, P43])
def test_small_lam_gives_the_hard_operator_exactly(p):
    x = rand(6, 20, seed=9)
    k = 5
    s = x.sort(-1, descending=True).values
    gap = float((s[:, k - 1] - s[:, k]).min())
    assert torch.equal(soft_topk_mask(x, k, p=p, lam=0.9 * gap), topk_mask(x, k))
    a = x.abs().sort(-1, descending=True).values
    gap = float((a[:, k - 1] - a[:, k]).min() / a[:, k - 1].max())
    y = soft_topk_magnitude(x, k, p=p, lam=0.5 * gap)
    assert torch.equal(y != 0, topk_mask(x.abs(), k).bool())  # exact zeros outside the top k
    if p == 2.0:
        torch.testing.assert_close(y, topk_magnitude(x, k) / (1 + 0.5 * gap), atol=0, rtol=1e-12)


@pytest.mark.parametrize("p", [2.0, P43])
def test_lam_to_zero_recovers_the_hard_operator(p):
    x = rand(4, 30, seed=10)
    errs = [float((soft_topk_mask(x, 8, p=p, lam=lam) - topk_mask(x, 8)).abs().max()) for lam in (1.0, 0.1, 1e-3)]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-12
    errs = [
        float((soft_topk_magnitude(x, 8, p=p, lam=lam) - topk_magnitude(x, 8)).abs().max()) for lam in (1.0, 0.1, 1e-3)
    ]
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2


def test_exact_zeros_outside_the_band():
    x = rand(5, 64, seed=11)
    lam = 0.4
    y = soft_topk_mask(x, 10, lam=lam)
    # p = 2: y = clip((x - gamma) / lam, 0, 1): exactly 0 below gamma, exactly 1 above gamma + lam
    assert ((y == 0) | (y == 1)).sum() > 0.8 * y.numel()
    inside = (y > 0) & (y < 1)
    assert inside.sum(-1).max() < 20
    mag = soft_topk_magnitude(x, 10, lam=0.1)
    assert ((mag != 0).sum(-1) >= 10).all() and ((mag == 0).sum(-1) >= 40).all()


@pytest.mark.parametrize("lam", [0.01, 0.05, 0.3, 2.0])
def test_magnitude_p2_bound(lam):
    """||relaxed - hard||_inf <= lam ||x||_inf (docs/mathematics.md, section 6) holds where PAV pools no block, i.e.
    where |x|_[k] >= (1 + lam) |x|_[k+1]; near a tie at the k-th entry the hard operator jumps and the bound fails."""
    x = rand(256, 33, seed=12, scale=3.0)
    # half of the rows: a top 6 apart from the rest by a random margin (separated or not)
    rest = x[:128, 6:].abs().amax(-1, keepdim=True)
    x[:128, :6] = x[:128, :6].sign() * rest * (1 + lam * (0.8 + rand(128, 6, seed=22).abs()))
    diff = (soft_topk_magnitude(x, 6, lam=lam) - topk_magnitude(x, 6)).abs().amax(-1)
    bound = lam * x.abs().amax(-1)
    a = x.abs().sort(-1, descending=True).values
    separated = a[:, 5] >= (1 + lam) * a[:, 6]
    assert separated.sum() >= 20
    assert (diff[separated] <= bound[separated] + 1e-12).all()
    if lam <= 0.05:
        assert (diff[~separated] > bound[~separated]).any()  # the counterexamples are real


def test_dykstra_matches_pav_after_enough_iterations():
    x = rand(20, 10, seed=13)
    ks = torch.randint(1, 11, (20,), generator=torch.Generator().manual_seed(2))
    for f in RELAXED.values():
        ref = f(x, ks, lam=0.8)
        assert (f(x, ks, lam=0.8, solver="dykstra", dykstra_iters=10) - ref).abs().max() > 1e-5  # not converged yet
        torch.testing.assert_close(f(x, ks, lam=0.8, solver="dykstra", dykstra_iters=1000), ref, atol=1e-5, rtol=0)
    x = rand(3, 7, seed=14, dtype=torch.float32)
    torch.testing.assert_close(
        soft_topk_mask(x, 3, solver="dykstra", dykstra_iters=200), soft_topk_mask(x, 3), atol=1e-5, rtol=0
    )


def test_dykstra_leaves_far_entries_exact():
    x = torch.cat([torch.linspace(10, 9, 5), torch.linspace(0.3, -0.3, 6), torch.linspace(-9, -10, 5)])
    y = soft_topk_mask(x.double(), 8, lam=0.5, solver="dykstra", dykstra_iters=10)
    assert torch.equal(y[:5], torch.ones(5, dtype=torch.float64))
    assert torch.equal(y[11:], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
@pytest.mark.parametrize("p", [2.0, P43])
def test_batched_and_per_row_k_equal_row_by_row(kind, p):
    f = RELAXED[kind]
    x = rand(3, 4, 11, seed=15)
    ks = torch.randint(1, 12, (3, 4), generator=torch.Generator().manual_seed(3))
    out = f(x, ks, p=p, lam=0.6)
    out_int = f(x, 5, p=p, lam=0.6)
    for i in range(3):
        for j in range(4):
            torch.testing.assert_close(out[i, j], f(x[i, j], int(ks[i, j]), p=p, lam=0.6), atol=1e-12, rtol=0)
            torch.testing.assert_close(out_int[i, j], f(x[i, j], 5, p=p, lam=0.6), atol=1e-12, rtol=0)
    # k broadcasting over a batch dim, and the operator along another dim
    kb = torch.tensor([2, 7, 4, 9])
    torch.testing.assert_close(f(x, kb, p=p, lam=0.6), f(x, kb.expand(3, 4), p=p, lam=0.6))
    along1 = f(x, 2, dim=1, p=p, lam=0.6)
    torch.testing.assert_close(along1, f(x.transpose(1, 2), 2, p=p, lam=0.6).transpose(1, 2))


# ------------------------------------------------------------------------------------------------ worked example


def test_worked_example_of_math_md_section_6():
    """k = 2, x(s) = (3, 1, -1 + s, s): topkmask_2 + topkmask_3 against s (indices 1 and 2 here)."""
    lam = 1.0
    grid = torch.linspace(-1.0, 6.0, 281, dtype=torch.float64)
    h = float(grid[1] - grid[0])
    s = grid.clone().requires_grad_(True)
    x = torch.stack([torch.full_like(s, 3.0), torch.ones_like(s), s - 1, s], -1)
    hard = topk_mask(x.detach(), 2)[:, 1:3].sum(-1)
    expected_hard = ((grid < 1) | (grid > 4)).double()
    off_ties = (grid - 1).abs().gt(1e-9) & (grid - 4).abs().gt(1e-9)
    assert torch.equal(hard[off_ties], expected_hard[off_ties])  # a step

    curves, slopes = {}, {}
    for p in (2.0, P43):
        y = soft_topk_mask(x, 2, p=p, lam=lam)[:, 1:3].sum(-1)
        (slope,) = torch.autograd.grad(y.sum(), s)
        ref = torch.stack([capped_simplex_mask(row, 2, lam, p)[1:3].sum() for row in x.detach()])
        torch.testing.assert_close(y.detach(), ref, atol=1e-9, rtol=0)  # an independent solution
        curves[p], slopes[p] = y.detach(), slope
        # both relaxed curves are exactly 0 on an interval (here [2, 3]) and positive just outside it
        zero = (grid >= 2) & (grid <= 3)
        assert torch.equal(y.detach()[zero], torch.zeros(int(zero.sum()), dtype=torch.float64))
        assert (y.detach()[(grid > 1.5) & (grid < 1.9)] > 0).all()
        assert (y.detach()[(grid > 3.1) & (grid < 3.5)] > 0).all()
        assert (y.detach() - hard).abs().max() < 1.0  # continuous, close to the step
        jumps = (y.detach()[1:] - y.detach()[:-1]).abs()
        assert jumps.max() < 2.0 * h * float(slope.abs().max()) + 1e-12  # continuous
    # p = 2: piecewise linear (second differences vanish except at a few kinks), slope jumps at the kinks
    second = (curves[2.0][2:] - 2 * curves[2.0][1:-1] + curves[2.0][:-2]).abs()
    assert (second > 1e-9).sum() <= 12
    assert (slopes[2.0][1:] - slopes[2.0][:-1]).abs().max() > 0.4
    # p = 4/3: smooth, its slope changes by O(h) between grid points
    assert (slopes[P43][1:] - slopes[P43][:-1]).abs().max() < 0.1
    assert (second > 1e-9).sum() < ((curves[P43][2:] - 2 * curves[P43][1:-1] + curves[P43][:-2]).abs() > 1e-9).sum()


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
@pytest.mark.parametrize("p", [2.0, P43])
def test_gradcheck_pav(kind, p):
    f = RELAXED[kind]
    x = rand(3, 7, seed=16, scale=1.5).requires_grad_(True)
    ks = torch.tensor([1, 3, 6])
    for lam in (0.3, 2.0):
        assert torch.autograd.gradcheck(lambda t, lam=lam: f(t, 3, p=p, lam=lam), (x,))
        assert torch.autograd.gradcheck(lambda t, lam=lam: f(t, ks, p=p, lam=lam), (x,))
    assert torch.autograd.gradcheck(lambda t: f(t, 2, dim=0, p=p, lam=0.5), (x,))


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
def test_gradcheck_dykstra(kind):
    f = RELAXED[kind]
    x = rand(2, 6, seed=17).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: f(t, 2, lam=0.7, solver="dykstra", dykstra_iters=300), (x,))


def test_gradient_of_the_mask_is_the_block_average():
    """p = 2: dy/dx = (I - 11^T / |B|) / lam on the block B = {0 < y < 1}, 0 elsewhere (sparsemax-like)."""
    x = rand(1, 12, seed=18)
    lam = 0.7
    y = soft_topk_mask(x, 4, lam=lam)
    B = ((y > 0) & (y < 1))[0]
    assert 2 <= int(B.sum()) < 12
    J = torch.autograd.functional.jacobian(lambda t: soft_topk_mask(t, 4, lam=lam), x)[0, :, 0, :]
    ref = torch.zeros(12, 12, dtype=torch.float64)
    idx = B.nonzero()[:, 0]
    ref[idx[:, None], idx[None, :]] = (torch.eye(len(idx), dtype=torch.float64) - 1.0 / len(idx)) / lam
    torch.testing.assert_close(J, ref)


# ------------------------------------------------------------------------------------------------ non-finite entries

INF = math.inf
SOLVES = [(2.0, "pav"), (P43, "pav"), (2.0, "dykstra")]


def nonfinite_rows(seed: int, count: int = 40, n: int = 7):
    """Rows of n entries, each finite, +inf or -inf at random (every mix, all-infinite rows included), with the
    same rows where the infinities are +-M."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(count, n, generator=g, dtype=torch.float64)
    kind = torch.randint(0, 3, (count, n), generator=g)
    kind[0], kind[1] = 2, 1  # all -inf, all +inf
    with_inf = torch.where(kind == 1, INF, torch.where(kind == 2, -INF, x))
    return with_inf, kind


def with_big(x: torch.Tensor, M: float) -> torch.Tensor:
    return torch.where(torch.isinf(x), torch.copysign(torch.full_like(x, M), x), x)


@pytest.mark.parametrize("p,solver", SOLVES)
def test_mask_with_infinite_entries_is_the_limit_of_large_finite_ones(p, solver):
    """soft_topk_mask at +-inf equals the operator at +-M for large M (the limit; exact shares for the tied
    infinite entries): -inf entries are 0 while finite ones remain, and share k - n_finite - n_+inf equally when
    k exceeds those; +inf entries are 1, or share k when there are more of them than k. Returned NaN before."""
    x, kind = nonfinite_rows(30)
    n = x.shape[-1]
    for k in range(1, n + 1):
        for lam in (0.05, 0.7):
            y = soft_topk_mask(x, k, p=p, lam=lam, solver=solver, dykstra_iters=300)
            assert torch.isfinite(y).all()
            ref = soft_topk_mask(with_big(x, 1e4), k, p=p, lam=lam, solver=solver, dykstra_iters=300)
            torch.testing.assert_close(y, ref, atol=1e-7, rtol=0)
            torch.testing.assert_close(y.sum(-1), torch.full((x.shape[0],), float(k), dtype=x.dtype))
            n_pos, n_neg, n_fin = ((kind == c).sum(-1, keepdim=True).double() for c in (1, 2, 0))
            neg_share = ((k - n_pos - n_fin).clamp(min=0) / n_neg.clamp(min=1)).expand_as(y)
            pos_share = (k / n_pos.clamp(min=1)).clamp(max=1).expand_as(y)
            torch.testing.assert_close(y[kind == 2], neg_share[kind == 2], atol=1e-15, rtol=0)
            torch.testing.assert_close(y[kind == 1], pos_share[kind == 1], atol=1e-15, rtol=0)


@pytest.mark.parametrize("p,solver", SOLVES)
def test_magnitude_with_infinite_entries_is_the_limit_of_large_finite_ones(p, solver):
    """soft_topk_magnitude: an infinite entry has the largest magnitude and its output tends to +-inf with M
    (also when more than k tie at infinity: each takes ~ M k / (m + k lam)); the finite entries get the operator
    on the row at +-M, i.e. the finite row with k less the infinite entries (0 when they are k or more)."""
    x, kind = nonfinite_rows(31)
    n = x.shape[-1]
    for k in range(1, n + 1):
        for lam in (0.05, 0.7):
            y = soft_topk_magnitude(x, k, p=p, lam=lam, solver=solver, dykstra_iters=300)
            fin = kind == 0
            assert torch.equal(y[~fin], x[~fin])  # +-inf, sign kept
            for M in (1e4, 1e6):
                ref = soft_topk_magnitude(with_big(x, M), k, p=p, lam=lam, solver=solver, dykstra_iters=300)
                torch.testing.assert_close(y[fin], ref[fin], atol=1e-7, rtol=0)
                assert (ref[~fin].sign() == x[~fin].sign()).all() and (ref[~fin].abs() > M / 20).all()


@pytest.mark.parametrize("p", [2.0, P43])
def test_infinite_entries_small_lam_gives_the_hard_selection(p):
    """lam -> 0: the hard mask where it is unique (k <= n_finite + n_+inf, distinct finite values); beyond, the
    finite and +inf entries are 1 as in topk_mask and the -inf entries share what is left (topk_mask picks some
    of them: a tie)."""
    x, kind = nonfinite_rows(32)
    n = x.shape[-1]
    for k in range(1, n + 1):
        y = soft_topk_mask(x, k, p=p, lam=1e-7)
        hard = topk_mask(x, k)
        n_pos, n_fin = (kind == 1).sum(-1), (kind == 0).sum(-1)
        unique = (k <= n_pos + n_fin) & ((k >= n_pos) | (n_pos == 0)) & ((k < n_pos) | (k - n_pos <= n_fin))
        unique &= ~((kind == 1).any(-1) & (k < n_pos))
        assert torch.equal(y[unique], hard[unique])
        beyond = k > n_pos + n_fin
        assert torch.equal(y[beyond][kind[beyond] != 2], hard[beyond][kind[beyond] != 2])
        torch.testing.assert_close(y[beyond].sum(-1), hard[beyond].sum(-1))


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
@pytest.mark.parametrize("p,solver", SOLVES)
def test_infinite_entries_leave_other_rows_and_k_le_finite_unchanged(kind, p, solver):
    """Rows without infinities are computed as before (bitwise: the same solver on the same values); a row whose
    infinities are never selected (-inf entries, k <= n_finite) equals the row without them."""
    f = RELAXED[kind]
    x = rand(4, 9, seed=33)
    x_inf = x.clone()
    x_inf[1, [2, 5]] = -INF
    for work in (torch.float64, torch.float32):  # float32 on the CPU: the numpy sort path
        a, b = x.to(work), x_inf.to(work)
        for k in (1, 4, 7):
            ya = f(a, k, p=p, lam=0.4, solver=solver, dykstra_iters=300)
            yb = f(b, k, p=p, lam=0.4, solver=solver, dykstra_iters=300)
            assert torch.equal(ya[[0, 2, 3]], yb[[0, 2, 3]])
            if kind == "mask":
                alone = f(b[1, torch.isfinite(b[1])], k, p=p, lam=0.4, solver=solver, dykstra_iters=300)
                torch.testing.assert_close(yb[1, torch.isfinite(b[1])], alone)
                assert torch.equal(yb[1, [2, 5]], torch.zeros(2, dtype=work))


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
@pytest.mark.parametrize("p", [2.0, P43])
def test_gradcheck_finite_entries_beside_infinite_ones(kind, p):
    """Finite, zero gradient at the infinite entries; gradcheck on the finite entries."""
    f = RELAXED[kind]
    fin = rand(3, 6, seed=34, scale=1.5)
    slots = torch.tensor([[1, 4], [0, 7], [3, 5]])

    def build(t: torch.Tensor) -> torch.Tensor:
        full = torch.empty(3, 8, dtype=t.dtype)
        keep = torch.ones(3, 8, dtype=torch.bool).scatter_(1, slots, False)
        full[keep] = t.reshape(-1)
        full[~keep] = torch.tensor([-INF, -INF, INF, -INF, INF, INF], dtype=t.dtype)
        return full

    finite_out = torch.ones(3, 8, dtype=torch.bool).scatter_(1, slots, False)  # the magnitude: +-inf elsewhere
    for k in (2, 5, 7):
        for lam in (0.3, 2.0):
            leaf = fin.clone().requires_grad_(True)
            assert torch.autograd.gradcheck(lambda t, k=k, lam=lam: f(build(t), k, p=p, lam=lam)[finite_out], (leaf,))
            full = build(fin).requires_grad_(True)
            (f(full, k, p=p, lam=lam) * rand(3, 8, seed=35)).nan_to_num(posinf=0.0, neginf=0.0).sum().backward()
            assert torch.isfinite(full.grad).all() and (full.grad[torch.isinf(full)] == 0).all()


def test_nan_entry_makes_its_row_nan():
    """A NaN has no place in the order: the relaxed output of every entry depends on the whole row, so a row
    holding a NaN gives NaN (values and gradient), for every solver; other rows are untouched. (The hard
    operators follow torch.topk, which ranks NaN above everything.) Returned partly-NaN rows before."""
    x = rand(3, 6, seed=36)
    x_nan = x.clone()
    x_nan[1, 2] = math.nan
    for f in RELAXED.values():
        for p, solver in SOLVES:
            for work in (torch.float64, torch.float32):
                leaf = x_nan.to(work).clone().requires_grad_(True)
                y = f(leaf, 2, p=p, lam=0.5, solver=solver)
                assert torch.isnan(y[1]).all()
                assert torch.equal(y[[0, 2]], f(x.to(work), 2, p=p, lam=0.5, solver=solver)[[0, 2]])
                y.nansum().backward()
                assert torch.isnan(leaf.grad[1]).all() and torch.isfinite(leaf.grad[[0, 2]]).all()


def test_hard_magnitude_of_infinite_entries_left_out_is_zero():
    """topk_magnitude keeps x where selected and 0 elsewhere: an infinite entry left out was inf * 0 = NaN."""
    x = torch.tensor([[0.3, -INF, 0.1, -INF], [INF, 2.0, INF, INF]])
    y = topk_magnitude(x, 1)
    assert not torch.isnan(y).any()
    assert (y[0] == -INF).sum() == 1 and (y[0] == 0).sum() == 3 and (y[1] == INF).sum() == 1


def test_infinite_entries_on_the_device_path_without_host_sync(monkeypatch):
    """The accelerator path (no numpy, no host sync) handles the non-finite entries the same way."""
    x, _ = nonfinite_rows(37, count=6)
    x = x.float()
    refs = {
        (name, p, solver): f(x, 3, p=p, lam=0.5, solver=solver) for name, f in RELAXED.items() for p, solver in SOLVES
    }
    monkeypatch.setattr(topk_module, "host_read_is_free", lambda v: False)
    leaf = x.clone().requires_grad_(True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    outs = {}
    for name, f in RELAXED.items():
        for p, solver in SOLVES:
            out = f(leaf, 3, p=p, lam=0.5, solver=solver)
            out.nan_to_num(posinf=0.0, neginf=0.0).sum().backward()
            outs[(name, p, solver)] = out.detach()
    monkeypatch.undo()
    for key, out in outs.items():
        torch.testing.assert_close(out, refs[key], atol=2e-6, rtol=0)
    assert torch.isfinite(leaf.grad).all()


# ------------------------------------------------------------------------------------------------ dtypes, syncs


def test_half_precision_and_autocast():
    x = rand(4, 32, seed=19, dtype=torch.float32)
    ref = soft_topk_mask(x, 5, lam=0.3)
    xb = x.to(torch.bfloat16).requires_grad_(True)
    y = soft_topk_mask(xb, 5, lam=0.3)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), soft_topk_mask(xb.detach().float(), 5, lam=0.3).to(torch.bfloat16).float())
    y.float().pow(2).sum().backward()
    assert xb.grad.dtype == torch.bfloat16 and torch.isfinite(xb.grad.float()).all()
    lin = torch.nn.Linear(32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = lin(x)
        assert scores.dtype == torch.bfloat16
        out = soft_topk_magnitude(scores, 5, lam=0.3)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    assert (ref.sum(-1) - 5).abs().max() < 1e-5


def test_no_host_sync_on_the_device_path(monkeypatch):
    """With an int k the forward and backward never read tensor values on the host (the accelerator path:
    torch.sort instead of numpy)."""
    monkeypatch.setattr(topk_module, "host_read_is_free", lambda v: False)
    x = rand(3, 20, seed=20, dtype=torch.float32).requires_grad_(True)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for f in RELAXED.values():
        for p, solver in ((2.0, "pav"), (P43, "pav"), (2.0, "dykstra")):
            f(x, 4, p=p, lam=0.5, solver=solver, dykstra_iters=5).sum().backward()
    topk_mask(x, 4)
    monkeypatch.undo()
    assert torch.isfinite(x.grad).all()


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"k": 9}, r"k must be in \[1, n\] with n = 8"),
        ({"k": 0}, r"k must be in \[1, n\]"),
        ({"k": 2.5}, "k must be an int or an integer tensor"),
        ({"k": torch.tensor([1, 2, 9])}, r"every k must be in \[1, n\]"),
        ({"k": torch.tensor([1, 0, 2])}, r"every k must be in \[1, n\]"),
        ({"k": torch.tensor([1.0, 2.0, 3.0])}, "integer dtype"),
        ({"k": torch.tensor([1, 2])}, "does not broadcast"),
        ({"p": 1.5}, "supported values are p = 2 and p = 4/3"),
        ({"p": 3.0}, "supported values are p = 2 and p = 4/3"),
        ({"lam": 0.0}, "lam must be a finite float > 0"),
        ({"lam": -1.0}, "lam must be a finite float > 0"),
        ({"solver": "sort"}, "unknown solver 'sort'"),
        ({"solver": "dykstra", "p": P43}, "supports p = 2 only"),
        ({"dykstra_iters": 0}, "dykstra_iters must be an int >= 1"),
        ({"dim": 2}, r"dim must be an int in \[-2, 1\]"),
        ({"dim": 1.0}, "dim must be an int"),
    ],
)
def test_bad_arguments(kwargs, match):
    x = rand(3, 8, seed=21)
    args = {"k": 2, **kwargs}
    k = args.pop("k")
    for f in RELAXED.values():
        with pytest.raises(ZooError, match=match):
            f(x, k, **args)


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
def test_n_iter_is_the_deprecated_name_of_dykstra_iters(kind):
    """n_iter= (the old name) still sets the Dykstra iterations, with a FutureWarning naming dykstra_iters;
    giving both names (by keyword or the new one positionally, even at its default value) is one ZooError."""
    f = RELAXED[kind]
    x = rand(4, 9, seed=31)
    new = f(x, 3, lam=0.8, solver="dykstra", dykstra_iters=3)
    assert (new - f(x, 3, lam=0.8, solver="dykstra")).abs().max() > 1e-6  # 3 iterations are not the default 100
    with pytest.warns(FutureWarning, match="n_iter= is deprecated.*use dykstra_iters="):
        old = f(x, 3, lam=0.8, solver="dykstra", n_iter=3)
    assert torch.equal(old, new)
    assert torch.equal(f(x, 3, -1, 2.0, 0.8, "dykstra", 3), new)  # the new name keeps the old position
    for given in ({"dykstra_iters": 3}, {"dykstra_iters": 100}):
        with pytest.raises(ZooError, match="n_iter= is the deprecated name of dykstra_iters=; give dykstra_iters"):
            f(x, 3, lam=0.8, solver="dykstra", n_iter=3, **given)
    with pytest.raises(ZooError, match="not both"):
        f(x, 3, -1, 2.0, 0.8, "dykstra", 3, n_iter=3)
    with pytest.warns(FutureWarning), pytest.raises(ZooError, match="dykstra_iters must be an int >= 1"):
        topk_module.check_relaxed("check", 2.0, 1.0, "dykstra", n_iter=0)


def test_bad_inputs():
    for f in (*RELAXED.values(), topk_mask, topk_magnitude):
        with pytest.raises(ZooError, match="x must be a floating-point tensor"):
            f(torch.arange(6), 2)
        with pytest.raises(ZooError, match=r"k must be in \[1, n\]"):
            f(rand(2, 3), 4)
        with pytest.raises(ZooError, match="dim must be"):
            f(rand(2, 3), 2, dim=-3)
        with pytest.raises(ZooError, match="at least one dimension"):
            f(torch.tensor(1.0), 1)


@pytest.mark.parametrize("kind", ["mask", "magnitude"])
@pytest.mark.parametrize("p", [2.0, P43])
def test_float32_accuracy_is_the_input_rounding(kind, p):
    """float32 against float64: errors of order eps * |x| / lam (the operator's own sensitivity), also for a
    small lam where the power sums of the p = 4/3 solver lose their digits (the Newton step restores them)."""
    f = RELAXED[kind]
    for rows, n, seed in ((64, 64, 20), (64, 64, 23), (32, 600, 29), (32, 600, 37)):
        x = rand(rows, n, seed=seed, scale=3.0)
        for lam in (1e-3, 1e-2, 1.0):
            err = (f(x.float(), n // 10, p=p, lam=lam).double() - f(x, n // 10, p=p, lam=lam)).abs().max()
            assert err < 10 * torch.finfo(torch.float32).eps * float(x.abs().max()) / lam
