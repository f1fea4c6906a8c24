"""The exact integer arithmetic of zoo/ops/fixed_point.py against Python's integers, eager and compiled."""

from __future__ import annotations

import random

import pytest
import torch

from zoo.ops import fixed_point
from zoo.ops.fixed_point import FixedPoint, GammaRatio, _floor_divmod_small, exact_multiply, floor_divmod

INT64_MAX = 2**63 - 1


def dividends(d: int, seed: int) -> list[int]:
    """Random int64 values over the whole range, the extremes, and the neighbours of multiples of d (where a
    float estimate of the quotient is most likely to be one off)."""
    rnd = random.Random(seed)
    values = [rnd.randrange(-(2**63), 2**63) for _ in range(3000)]
    values += [rnd.randrange(-(2**40), 2**40) for _ in range(1000)]
    values += [0, 1, -1, d - 1, d, -d, d + 1, INT64_MAX, INT64_MAX - 1, -INT64_MAX, -(2**62), 2**62, 2**53 + 1]
    for k in [rnd.randrange(-(2**62) // d, 2**62 // d) for _ in range(300)] + list(range(-20, 20)):
        values += [k * d - 1, k * d, k * d + 1]
    return [v for v in values if -INT64_MAX <= v <= INT64_MAX]


@pytest.mark.parametrize("d", [1, 2, 3, 7, 9, 10, 99, 100, 999, 1000])
def test_floor_divmod_is_pythons_floor_division_over_int64(d):
    values = dividends(d, seed=d)
    q, r = floor_divmod(torch.tensor(values, dtype=torch.int64), d)
    assert q.dtype == r.dtype == torch.int64
    assert q.tolist() == [v // d for v in values]
    assert r.tolist() == [v % d for v in values]


def test_floor_divmod_compiled_is_pythons_floor_division_too():
    """The compiled kernels run it vectorised: still Python's integers."""
    values = torch.tensor(dividends(10, seed=1), dtype=torch.int64)
    compiled = torch.compile(lambda c: floor_divmod(c, 9), fullgraph=True)
    q, r = compiled(values)
    assert q.tolist() == [v // 9 for v in values.tolist()]
    assert r.tolist() == [v % 9 for v in values.tolist()]


@pytest.mark.parametrize("d", [1, 3, 7, 9, 10, 999, 1000])
def test_floor_divmod_small_is_exact_over_its_whole_float32_range(d):
    """Every 0 <= c < 2^24 in int32 (the narrow-word path of the compiled multiply): the float32 estimate of c / d is
    one off for many c (d = 3: 1.4 million of them), the corrected pair never, against torch's integer division."""
    c = torch.arange(0, 2**24, dtype=torch.int32)
    q, r = _floor_divmod_small(c, d, torch.float32)
    assert q.dtype == r.dtype == torch.int32
    assert torch.equal(q, torch.div(c, d, rounding_mode="floor"))
    assert torch.equal(r, c - torch.div(c, d, rounding_mode="floor") * d)


@pytest.mark.parametrize("d", [3, 7, 10, 1000])
def test_floor_divmod_small_in_float64_is_pythons_floor_division(d):
    """0 <= c < 2^52 in int64 (the other narrow words): random values and the neighbours of multiples of d."""
    rnd = random.Random(d)
    values = [rnd.randrange(0, 2**52) for _ in range(5000)] + [0, 1, d - 1, d, 2**52 - 1]
    for k in [rnd.randrange(1, 2**52 // d) for _ in range(2000)] + list(range(1, 50)):
        values += [k * d - 1, k * d, k * d + 1]
    q, r = _floor_divmod_small(torch.tensor(values, dtype=torch.int64), d, torch.float64)
    assert q.tolist() == [v // d for v in values]
    assert r.tolist() == [v % d for v in values]


def python_multiply(c: int, i: int, n: int, d: int) -> tuple[int, int]:
    """The exact multiply by n/d of the module docstring in Python's integers (floor division and modulus)."""
    i = i * d + c % d
    return (c // d) * n + i % n, i // n


def python_word_capacity(n: int, d: int, top: int) -> int:
    """Multiplies from i = 0 before the worst-case buffer (c mod d = d - 1 every time) exceeds ``top``."""
    bound, steps = 0, 0
    while (bound * d + d - 1) // n <= top:
        bound = (bound * d + d - 1) // n
        steps += 1
    return steps


def word_values(ratio: GammaRatio, word: torch.dtype, seed: int) -> tuple[list[int], list[int]]:
    """(c, i) pairs for one multiply on a ``word`` buffer: c over the engine's range |c| < 2^61 and the neighbours
    of multiples of d; i up to the largest value one more multiply keeps inside the word."""
    rnd = random.Random(seed)
    top = ratio.buffer_bound(ratio.word_capacity(word) - 1)
    cs = [v for v in dividends(ratio.d, seed) if abs(v) < 2**61]
    i_vals = [rnd.randrange(0, top + 1) for _ in cs]
    i_vals[:50] = [top] * 50
    i_vals[50:100] = [0] * 50
    return cs, i_vals


@pytest.mark.parametrize("word", [torch.int8, torch.int16, torch.int32])
@pytest.mark.parametrize("gamma", [0.9, 0.5, 1 / 3, 0.99, 0.999])
def test_exact_multiply_on_a_narrow_word_is_pythons_integers(gamma, word):
    """A buffer word stored as int8/int16/int32: the multiply and the divide are Python's integers, in the eager
    path and in the traced one (the compiled kernels' arithmetic: float estimates corrected to exact), and the new
    word fits its dtype."""
    ratio = GammaRatio(gamma)
    n, d = ratio.n, ratio.d
    assert ratio.word_capacity(word) == python_word_capacity(n, d, torch.iinfo(word).max)
    cs, i_vals = word_values(ratio, word, seed=n + d)
    c, i = torch.tensor(cs, dtype=torch.int64), torch.tensor(i_vals, dtype=word)
    expected = [python_multiply(cc, ii, n, d) for cc, ii in zip(cs, i_vals)]
    assert max(e[1] for e in expected) <= torch.iinfo(word).max
    traced = torch.compile(exact_multiply, backend="eager", fullgraph=True)
    # one trace per (n, d, word) of this parametrised test: more than dynamo's default limit for one function
    with torch._dynamo.config.patch(recompile_limit=64):
        for run in (exact_multiply, traced):
            c2, i2 = run(c, i, n, d)
            assert c2.dtype == torch.int64
            assert c2.tolist() == [e[0] for e in expected]
            assert i2.tolist() == [e[1] for e in expected]
            c3, i3 = run(c2, i2.to(word), d, n)  # the divide, the buffer stored back in its word
            assert torch.equal(c3, c) and torch.equal(i3.to(word), i)


@pytest.mark.parametrize("gamma, word", [(0.9, torch.int8), (0.999, torch.int16), (0.9, torch.int32)])
def test_exact_multiply_on_a_narrow_word_compiled_by_inductor(gamma, word):
    """The generated code of each narrow-word path (int32 with float32 estimates; int64 with float64 ones):
    Python's integers too."""
    ratio = GammaRatio(gamma)
    n, d = ratio.n, ratio.d
    cs, i_vals = word_values(ratio, word, seed=7)
    c, i = torch.tensor(cs, dtype=torch.int64), torch.tensor(i_vals, dtype=word)
    c2, i2 = torch.compile(lambda c, i: exact_multiply(c, i, n, d), fullgraph=True)(c, i)
    expected = [python_multiply(cc, ii, n, d) for cc, ii in zip(cs, i_vals)]
    assert c2.tolist() == [e[0] for e in expected]
    assert i2.tolist() == [e[1] for e in expected]
    c3, i3 = torch.compile(lambda c, i: exact_multiply(c, i, d, n), fullgraph=True)(c2, i2.to(word))
    assert torch.equal(c3, c) and torch.equal(i3.to(word), i)


def brute_force_plan_bytes(ratio: GammaRatio, steps: int) -> int:
    """The fewest bytes per element of int8/int32/int64 words holding ``steps`` multiplies, by enumeration."""
    caps = {size: python_word_capacity(ratio.n, ratio.d, top) for size, top in [(1, 127), (4, 2**31 - 1)]}
    cap64 = ratio.steps_per_word
    best = None
    for w64 in range(steps // cap64 + 2):
        for w32 in range(steps // max(caps[4], 1) + 2):
            rest = max(0, steps - w64 * cap64 - w32 * caps[4])
            w8 = -(-rest // caps[1]) if caps[1] else (0 if rest == 0 else None)
            if w8 is not None:
                total = 8 * w64 + 4 * w32 + w8
                best = total if best is None else min(best, total)
    return best


@pytest.mark.parametrize("gamma", [0.9, 0.5, 1 / 3, 0.99])
def test_word_plan_holds_every_step_in_the_fewest_bytes_without_int16(gamma):
    ratio = GammaRatio(gamma)
    for steps in [1, 2, 5, 29, 30, 35, 60, 100, 187, 188, 400, 1000]:
        plan = ratio.word_plan(steps)
        assert sum(count for count, _ in plan) == steps
        assert all(dtype in (torch.int8, torch.int32, torch.int64) for _, dtype in plan)
        for count, dtype in plan:
            assert 0 < count <= python_word_capacity(ratio.n, ratio.d, torch.iinfo(dtype).max)
            if dtype == torch.int64:
                assert count <= ratio.steps_per_word
        size = sum(torch.empty((), dtype=dtype).element_size() for _, dtype in plan)
        assert size == brute_force_plan_bytes(ratio, steps)
    assert ratio.word_plan(0) == [(0, torch.int8)]
    if gamma == 0.9:  # ResNet-152's third stage rebuilds 35 steps: two int8 words, the bytes of one int16 word
        assert ratio.word_plan(35) == [(29, torch.int8), (6, torch.int8)]


def plan_starts(plan: list[tuple[int, torch.dtype]]) -> set[int]:
    """The steps that start a new buffer word (not step 0)."""
    starts, total = set(), 0
    for count, _ in plan[:-1]:
        total += count
        starts.add(total)
    return starts


@pytest.mark.parametrize("gamma, steps", [(0.9, None), (0.5, None), (1 / 3, None), (0.9, 35), (0.9, 100)])
def test_compiled_step_and_unstep_rebuild_the_state_bit_for_bit(gamma, steps):
    """The compiled step kernel, run for a full buffer word and more on a state of many elements, is the eager
    kernel's integers, and the compiled unstep walks it back to the start exactly; the buffer words as the engine
    stores them (GammaRatio.word_plan: int64, int32 and int8 words)."""
    fp, ratio = FixedPoint(32), GammaRatio(gamma)
    gen = torch.Generator().manual_seed(0)
    shape = (4, 8, 16, 16)
    x0 = torch.randn(shape, generator=gen) * 4
    c = (1 - gamma) * 0.5
    steps = ratio.steps_per_word + 3 if steps is None else steps
    plan = ratio.word_plan(steps)
    starts = plan_starts(plan)
    gs = [torch.randn(shape, generator=gen) for _ in range(steps)]

    def forward(fused: bool):
        fixed_point.set_fused(fused)
        try:
            xi, vi = fp.to_fixed(x0), torch.zeros(shape, dtype=torch.int64)
            xf = fp.to_float(xi, torch.float32)
            dtypes = iter(dtype for _, dtype in plan)
            buffers, buffer = [], torch.zeros(shape, dtype=next(dtypes))
            for n in range(steps):
                if n in starts:
                    buffers.append(buffer)
                    buffer = torch.zeros(shape, dtype=next(dtypes))
                kernel = fixed_point.momentum_kernel("step", c=c, tail="relu", n=ratio.n, d=ratio.d, scale=fp.scale)
                kernel(xi, vi, buffer, xf, gs[n])
            # a failed compilation falls back to the eager kernel (and disables fusion): then nothing compiled ran
            assert fixed_point.fused_enabled() == fused
            return xi, vi, buffer, buffers, xf
        finally:
            fixed_point.set_fused(True)

    eager, compiled = forward(False), forward(True)
    for a, b in zip(eager[:3], compiled[:3]):
        assert torch.equal(a, b)
    for a, b in zip(eager[3], compiled[3]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert torch.equal(eager[4], compiled[4])
    assert bool((compiled[2] != 0).any())  # the buffer holds information

    xi, vi, buffer, buffers, _ = compiled
    xf = fixed_point.momentum_kernel("rewind", scale=fp.scale, dtype=torch.float32)(xi, vi)  # x_{N-1} = x_N - v_N
    a, gx = torch.zeros(shape), torch.zeros(shape)
    for n in reversed(range(steps)):
        unstep = fixed_point.momentum_kernel(
            "unstep", c=c, tail="relu", n=ratio.n, d=ratio.d, scale=fp.scale, first=n == 0
        )
        unstep(xi, vi, buffer, xf, gs[n].clone(), a, gx)
        if n in starts:
            assert not bool((buffer != 0).any())  # the word is emptied exactly
            buffer = buffers.pop()
        if n:
            fixed_point.momentum_kernel("refresh", scale=fp.scale)(xi, xf)
    assert fixed_point.fused_enabled()  # the unsteps ran compiled
    assert torch.equal(xi, fp.to_fixed(x0))
    assert torch.equal(vi, torch.zeros(shape, dtype=torch.int64))
    assert torch.equal(buffer, torch.zeros_like(buffer))
