"""The exact integer arithmetic of zoo/ops/fixed_point.py against Python's integers, eager and compiled."""

from __future__ import annotations

import random

import pytest
import torch

from zoo.ops import fixed_point
from zoo.ops.fixed_point import FixedPoint, GammaRatio, floor_divmod

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


@pytest.mark.parametrize("gamma", [0.9, 0.5, 1 / 3])
def test_compiled_step_and_unstep_rebuild_the_state_bit_for_bit(gamma):
    """The compiled step kernel, run for a full buffer word and more on a state of many elements, is the eager
    kernel's integers, and the compiled unstep walks it back to the start exactly."""
    fp, ratio = FixedPoint(32), GammaRatio(gamma)
    gen = torch.Generator().manual_seed(0)
    shape = (4, 8, 16, 16)
    x0 = torch.randn(shape, generator=gen) * 4
    c = (1 - gamma) * 0.5
    steps = ratio.steps_per_word + 3
    gs = [torch.randn(shape, generator=gen) for _ in range(steps)]

    def forward(fused: bool):
        fixed_point.set_fused(fused)
        try:
            xi, vi = fp.to_fixed(x0), torch.zeros(shape, dtype=torch.int64)
            xf = fp.to_float(xi, torch.float32)
            buffers, buffer = [], torch.zeros(shape, dtype=torch.int64)
            for n in range(steps):
                if n and n % ratio.steps_per_word == 0:
                    buffers.append(buffer)
                    buffer = torch.zeros(shape, dtype=torch.int64)
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
        if n and n % ratio.steps_per_word == 0:
            buffer = buffers.pop()
        if n:
            fixed_point.momentum_kernel("refresh", scale=fp.scale)(xi, xf)
    assert fixed_point.fused_enabled()  # the unsteps ran compiled
    assert torch.equal(xi, fp.to_fixed(x0))
    assert torch.equal(vi, torch.zeros(shape, dtype=torch.int64))
    assert torch.equal(buffer, torch.zeros(shape, dtype=torch.int64))
