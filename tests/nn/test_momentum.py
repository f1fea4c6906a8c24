"""Momentum ResNets (docs/mathematics.md, section 4): the rule (M1), the exact fixed-point inverse (M2) of
memory="reversible", the information buffer of ``zoo.ops.fixed_point``, and the 1-D x -> -x^3 experiment.

Every reference here is computed independently of the engine: hand-written loops of (M1), Python
integers for the buffer arithmetic, autograd through memory="full" for the gradients.
"""

from __future__ import annotations

import copy
import math
import random
import warnings

import pytest
import torch
import torch.nn as nn

import zoo
from zoo.errors import ZooError
from zoo.models.resnet import BasicBlock
from zoo.nn import ResidualStack
from zoo.ops.fixed_point import FixedPoint, GammaRatio

INT64_MAX = 2**63 - 1


# ------------------------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only cost synchronisation (100x on a loaded 2-core machine)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


class MLP(nn.Module):
    """f(x) = W2 tanh(W1 x + b1) + b2, deterministic."""

    def __init__(self, dim: int = 4, hidden: int = 8, gain: float = 1.0, seed: int = 0, dtype=torch.float32):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(hidden, dim, generator=g, dtype=dtype) * gain / dim**0.5)
        self.b1 = nn.Parameter(torch.randn(hidden, generator=g, dtype=dtype) * 0.1)
        self.w2 = nn.Parameter(torch.randn(dim, hidden, generator=g, dtype=dtype) * gain / hidden**0.5)
        self.b2 = nn.Parameter(torch.randn(dim, generator=g, dtype=dtype) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2


def mlp_blocks(n: int, dim: int = 4, hidden: int = 8, seed: int = 0, **kw) -> list[nn.Module]:
    return [MLP(dim, hidden, seed=seed * 1000 + k, **kw) for k in range(n)]


def momentum_pair(blocks, **kwargs) -> tuple[ResidualStack, ResidualStack]:
    """The same blocks (shared modules) under memory='full' and memory='reversible'."""
    full = ResidualStack(blocks, rule="momentum", memory="full", **kwargs)
    rev = ResidualStack(blocks, rule="momentum", memory="reversible", **kwargs)
    return full, rev


def weight_for(out: torch.Tensor) -> torch.Tensor:
    """A fixed, non-uniform cotangent, so that every output entry matters."""
    return torch.linspace(-1, 1, out.numel(), dtype=torch.float32).reshape(out.shape).to(out.dtype)


def run(module: nn.Module, x: torch.Tensor, *args, **kwargs):
    """(output, dL/dx, {name: dL/dp}) for L = <weight_for(out), out>; params without grad are absent."""
    x = x.detach().clone().requires_grad_(True)
    module.zero_grad(set_to_none=True)
    out = module(x, *args, **kwargs)
    (out.float() * weight_for(out).float()).sum().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


def assert_grads_close(a, b, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    out_a, gx_a, gp_a = a
    out_b, gx_b, gp_b = b
    torch.testing.assert_close(out_a, out_b, rtol=rtol, atol=atol)
    torch.testing.assert_close(gx_a, gx_b, rtol=rtol, atol=atol)
    assert sorted(gp_a) == sorted(gp_b)
    assert gp_a, "no parameter received a gradient"
    for name in gp_a:
        torch.testing.assert_close(gp_a[name], gp_b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


def to_fixed_ref(t: torch.Tensor, frac_bits: int = 32) -> torch.Tensor:
    """round(t 2^F) computed in float64 (exact for float32 inputs of moderate size)."""
    return torch.round(t.double() * 2.0**frac_bits).to(torch.int64)


def to_float_ref(t: torch.Tensor, frac_bits: int = 32) -> torch.Tensor:
    """int -> float64 (exact below 2^53) -> float32: the single rounding of int64 -> float32."""
    return (t.double() / 2.0**frac_bits).float()


# ------------------------------------------------------------------------------------------- (M1)


@pytest.mark.parametrize("gamma", [0.5, 0.9])
@pytest.mark.parametrize("scale", [1.0, "depth", 0.3])
def test_full_memory_matches_hand_written_momentum_loop(gamma, scale):
    blocks = mlp_blocks(6)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(1))
    stack = ResidualStack(blocks, rule="momentum", gamma=gamma, scale=scale, memory="full")
    h = 1 / 6 if scale == "depth" else scale
    with torch.no_grad():
        xn, v = x, torch.zeros_like(x)
        for f in blocks:
            v = gamma * v + ((1 - gamma) * h) * f(xn)
            xn = xn + v
        torch.testing.assert_close(stack(x), xn, rtol=1e-6, atol=1e-6)
        # the rule really is second order: dropping the velocity term changes the result
        euler = ResidualStack(blocks, rule="euler", scale=(1 - gamma) * h)
        assert not torch.allclose(stack(x), euler(x), atol=1e-3)


def test_full_memory_initial_velocity_f_and_module_match_definition():
    blocks = mlp_blocks(4)
    g = nn.Linear(4, 4)
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(2))
    for init, v0_fn in (("f", blocks[0]), (g, g)):
        stack = ResidualStack(blocks, rule="momentum", gamma=0.8, memory="full", init_velocity=init)
        with torch.no_grad():
            xn, v = x, v0_fn(x)
            for f in blocks:
                v = 0.8 * v + (1 - 0.8) * f(xn)
                xn = xn + v
            torch.testing.assert_close(stack(x), xn, rtol=1e-6, atol=1e-6)


def test_gamma_zero_is_the_plain_resnet():
    blocks = mlp_blocks(7)
    x = torch.randn(3, 4)
    mom = ResidualStack(blocks, rule="momentum", gamma=0.0, memory="full")
    plain = ResidualStack(blocks, rule="euler", scale=1.0)
    with torch.no_grad():
        expected = x
        for f in blocks:
            expected = expected + f(expected)
        torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)
        torch.testing.assert_close(mom(x), expected, rtol=1e-6, atol=1e-6)
    assert_grads_close(run(mom, x), run(plain, x), rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------------------------------- exactness


def _worst_case_bounds(n: int, d: int, steps: int) -> list[int]:
    """Python-int worst case of the buffer: every multiply adds the largest remainder (c mod d = d - 1)."""
    bounds, i = [0], 0
    for _ in range(steps):
        i = (i * d + d - 1) // n
        bounds.append(i)
    return bounds


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
@pytest.mark.parametrize("init", ["zero", "f"])
def test_reversible_rebuilds_x0_v0_bit_for_bit_through_1000_layers(gamma, init):
    depth = 1000
    block = MLP(4, 8, seed=3)  # tied: one module, 1000 steps
    stack = ResidualStack([block] * depth, rule="momentum", gamma=gamma, memory="reversible", init_velocity=init)
    stack.record_rebuild = True
    x = torch.randn(2, 4, generator=torch.Generator().manual_seed(4)).requires_grad_(True)
    out = stack(x)
    # the buffer word capacity: 1000 layers at gamma = 0.5 (63 multiplies an int64 word) cross many words
    s = stack.ratio.steps_per_word
    n_words = out.grad_fn.n_words
    plan = stack.ratio.word_plan(depth)
    assert n_words == len(plan) - 1 and sum(count for count, _ in plan) == depth
    words_bytes = sum(torch.empty((), dtype=dtype).element_size() for _, dtype in plan)
    assert words_bytes <= 8 * (-(-depth // s))  # never more than int64 words would take
    if gamma == 0.5:
        assert s == 63 and n_words == 15
        words = out.grad_fn.state[3:]  # x, v, the last buffer word, then the full words
        assert len(words) == 15 and all(bool((w != 0).any()) for w in words)  # they hold information
    out.sum().backward()
    assert torch.isfinite(x.grad).all() and all(torch.isfinite(p.grad).all() for p in block.parameters())

    x0, v0 = stack.last_rebuild
    assert x0.dtype == torch.int64 and v0.dtype == torch.int64
    assert torch.equal(x0, stack.fixed_point.to_fixed(x.detach()))
    assert torch.equal(x0, to_fixed_ref(x.detach()))
    if init == "zero":
        assert torch.equal(v0, torch.zeros_like(x0))
    else:
        with torch.no_grad():
            expected_v0 = to_fixed_ref(block(to_float_ref(to_fixed_ref(x.detach()))))
        assert torch.equal(v0, expected_v0)
        assert bool((v0 != 0).any())


def _ratio_ref_multiply(c: int, i: int, n: int, d: int) -> tuple[int, int]:
    """docs/mathematics.md, section 4 in Python integers (floor division and floor modulus)."""
    i = i * d
    i = i + c % d
    assert i <= INT64_MAX, "reference intermediate overflowed int64"
    c = c // d
    c = c * n
    c = c + i % n
    i = i // n
    return c, i


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99, 0.75, 1 / 3, 0.999])
def test_gamma_ratio_multiply_divide_are_exact_inverses(gamma):
    ratio = GammaRatio(gamma)
    n, d = ratio.n, ratio.d
    assert n / d == pytest.approx(gamma, rel=1e-12)
    rnd = random.Random(5)
    lim = 2**61
    cs = [rnd.randrange(-lim, lim) for _ in range(200)] + [0, 1, -1, d - 1, -d, d, -(d - 1), lim - 1, -lim]
    cs += [rnd.randrange(-1000, 1000) for _ in range(50)]
    bounds = _worst_case_bounds(n, d, ratio.steps_per_word)
    near_full = bounds[ratio.steps_per_word - 1]  # one more multiply fills the word to its worst case
    i_vals = [rnd.randrange(0, near_full + 1) for _ in range(len(cs) - 20)] + [near_full] * 10 + [0] * 10
    c = torch.tensor(cs, dtype=torch.int64)
    i = torch.tensor(i_vals, dtype=torch.int64)
    c2, i2 = ratio.multiply(c, i)
    expected = [_ratio_ref_multiply(cc, ii, n, d) for cc, ii in zip(cs, i_vals)]
    assert c2.tolist() == [e[0] for e in expected]
    assert i2.tolist() == [e[1] for e in expected]
    assert bool((i2 >= 0).all())
    # c2 is c * n/d up to less than one unit of n
    assert all(abs(e[0] * d - cc * n) < n * d for e, cc in zip(expected, cs))
    c3, i3 = ratio.divide(c2, i2)
    assert torch.equal(c3, c) and torch.equal(i3, i)
    # a chain of multiplies up to the word's capacity, undone in reverse order
    cc, ii = c.clone(), torch.zeros_like(c)
    history = []
    for _ in range(ratio.steps_per_word if ratio.steps_per_word < 500 else 500):
        history.append(cc)
        cc, ii = ratio.multiply(cc, ii)
        cc = cc + 12345  # an addition between multiplies, as the engine does
    for prev in reversed(history):
        cc, ii = ratio.divide(cc - 12345, ii)
        assert torch.equal(cc, prev)
    assert bool((ii == 0).all())


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99, 0.75, 1 / 3])
def test_steps_per_word_is_the_largest_safe_count(gamma):
    ratio = GammaRatio(gamma)
    n, d, k = ratio.n, ratio.d, ratio.steps_per_word
    # worst case in Python integers: the buffer after j multiplies from 0 is at most bounds[j]
    bounds = _worst_case_bounds(n, d, k + 1)
    assert all(b * d + d - 1 <= INT64_MAX for b in bounds[:k])  # multiplies 1..k never overflow
    assert bounds[k] * d + d - 1 > INT64_MAX  # multiply k + 1 can overflow
    # ... and the bound is reached by torch's multiply (c mod d = d - 1 every time), without wrapping
    i = torch.zeros(1, dtype=torch.int64)
    for j in range(k):
        c = torch.tensor([d - 1 + d * (j % 7) - 3 * d], dtype=torch.int64)
        _, i = ratio.multiply(c, i)
    assert i.item() == bounds[k] and i.item() > 0
    # closed form for gamma = 1/2: the buffer gains exactly one bit per multiply (2^j - 1 after j)
    if (n, d) == (1, 2):
        assert k == 63 and bounds[k] == 2**63 - 1
    # real-valued recursion without the floor: b_j <= (d-1)/(d-n) ((d/n)^j - 1), so at least this many
    # multiplies are safe (the floors only buy a few more)
    k_real = 1 + math.log((INT64_MAX - (d - 1)) / d * (d - n) / (d - 1) + 1) / math.log(d / n)
    assert math.floor(k_real + 1e-9) <= k <= 1.03 * k_real


def test_fixed_point_conversions_and_range():
    fp = FixedPoint(32)
    x = torch.tensor([0.0, 1.5, -2.25, 2.0**-33, 3 * 2.0**-34, -(2.0**-33), 1e-3])
    assert fp.to_fixed(x).tolist() == [0, 3 * 2**31, -9 * 2**30, 0, 1, 0, round(x[6].item() * 2**32)]  # half to even
    torch.testing.assert_close(
        fp.to_float(fp.to_fixed(x), torch.float32), to_float_ref(to_fixed_ref(x)), rtol=0, atol=0
    )
    assert fp.limit == 2.0**29
    assert not fp.out_of_range(torch.tensor([2.0**29 - 1, -(2.0**29 - 1)], dtype=torch.float64)).item()
    for bad in (2.0**29, -(2.0**29), float("inf"), float("-inf"), float("nan")):
        assert fp.out_of_range(torch.tensor([0.0, bad])).item(), bad
    # the state bound |x_n| <= |x_0| + n max(|v_0|, G / (1 - gamma)), tested against half the range 2^28
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    g = (1 - 0.9) * 2.0**27 / 10  # V = 2^27 / 10
    assert not fp.momentum_state_out_of_range(t(2.0**27), t(0.0), t(g), 0.9, 9).item()
    assert fp.momentum_state_out_of_range(t(2.0**27), t(0.0), t(g), 0.9, 10).item()
    assert fp.momentum_state_out_of_range(t(1.0), t(2.0**25), t(0.0), 0.9, 8).item()  # |v_0| = V
    for bad in (float("nan"), float("inf")):
        assert fp.momentum_state_out_of_range(t(1.0), t(0.0), t(bad), 0.9, 3).item()
    # float64 keeps its precision: 48 fractional bits round-trip a float64 value to 2^-49
    fp48 = FixedPoint(48)
    y = torch.tensor([math.pi, -math.e], dtype=torch.float64)
    assert (fp48.to_float(fp48.to_fixed(y), torch.float64) - y).abs().max() <= 2.0**-49


# ------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("scale", [1.0, "depth"])
def test_reversible_gradients_match_full_on_a_50_layer_mlp_stack(scale):
    blocks = mlp_blocks(50, dim=6, hidden=12, seed=7)
    full, rev = momentum_pair(blocks, gamma=0.9, scale=scale)
    x = torch.randn(5, 6, generator=torch.Generator().manual_seed(8))
    a, b = run(full, x), run(rev, x)
    assert len(a[2]) == 4 * 50
    assert_grads_close(a, b)


def test_reversible_gradients_match_full_float64_tightly():
    blocks = mlp_blocks(20, dim=3, hidden=5, seed=9, dtype=torch.float64)
    full, rev = momentum_pair(blocks, gamma=0.75, scale=1.0, fixed_point_bits=48)  # resolution 2^-48
    x = torch.randn(4, 3, dtype=torch.float64)
    assert_grads_close(run(full, x), run(rev, x), rtol=1e-11, atol=1e-12)


def _resnet_pair():
    torch.manual_seed(10)
    full = zoo.momentum_cifar_resnet(layers=(1, 4, 1), widths=(8, 8, 8), memory="full")
    rev = zoo.momentum_cifar_resnet(layers=(1, 4, 1), widths=(8, 8, 8), memory="reversible")
    rev.load_state_dict(full.state_dict())
    return full.train(), rev.train()


def test_reversible_gradients_match_full_on_momentum_cifar_resnet_and_batchnorm_updates_once():
    full, rev = _resnet_pair()
    assert rev.layer2.memory == "reversible" and rev.layer2.depth == 3 and rev.layer2.has_transition
    bn_before = {k: v.clone() for k, v in full.state_dict().items() if "running" in k or "num_batches" in k}
    x = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(11))
    a, b = run(full, x), run(rev, x)
    assert_grads_close(a, b, rtol=1e-3, atol=1e-5)
    sa, sb = full.state_dict(), rev.state_dict()
    for k in bn_before:
        if "num_batches" in k:
            assert sa[k].item() == sb[k].item() == 1, k  # one training step: one update
        else:
            torch.testing.assert_close(sb[k], sa[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
            assert not torch.equal(sb[k], bn_before[k]), k


def test_channels_last_resnets_give_the_contiguous_gradients(monkeypatch):
    """float64, model and input channels-last: memory="full" (its compiled step, forced for this size, on the
    state's memory order) and memory="reversible" (its fixed-point kernels on 1-D views in memory order) give the
    output and gradients of the contiguous memory="full" run."""
    from zoo.ops import fixed_point

    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    full, rev = (m.double() for m in _resnet_pair())
    full_cl, rev_cl = (copy.deepcopy(m).to(memory_format=torch.channels_last) for m in (full, rev))
    x = torch.randn(4, 3, 12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
    want = run(full, x)
    x_cl = x.to(memory_format=torch.channels_last)
    assert_grads_close(run(full_cl, x_cl), want, rtol=1e-10, atol=1e-12)
    assert_grads_close(run(rev_cl, x_cl), want, rtol=1e-6, atol=1e-9)  # the fixed-point state: 2^-32 resolution


def test_reversible_gradients_match_full_on_a_basic_block_stage():
    torch.manual_seed(12)
    blocks = [BasicBlock(8, 8) for _ in range(5)]
    twins = copy.deepcopy(blocks)  # the same weights, separate BatchNorm statistics
    full = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="full", transition=None).train()
    rev = ResidualStack(twins, rule="momentum", gamma=0.9, memory="reversible", transition=None).train()
    x = torch.randn(3, 8, 6, 6)
    a, b = run(full, x), run(rev, x)
    for blk_f, blk_r in zip(full.blocks, rev.blocks):
        torch.testing.assert_close(blk_r.bn1.running_mean, blk_f.bn1.running_mean, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(blk_r.bn2.running_var, blk_f.bn2.running_var, rtol=1e-5, atol=1e-6)
        assert blk_r.bn1.num_batches_tracked.item() == blk_f.bn1.num_batches_tracked.item() == 1
    assert_grads_close(a, b, rtol=1e-3, atol=1e-5)


# ------------------------------------------------------------------------------------------- parameters


def test_frozen_parameters_get_no_grad_and_the_rest_are_right():
    blocks = mlp_blocks(6, seed=13)
    for p in blocks[2].parameters():
        p.requires_grad_(False)
    blocks[4].w1.requires_grad_(False)
    full, rev = momentum_pair(blocks, gamma=0.9)
    x = torch.randn(3, 4)
    a, b = run(full, x), run(rev, x)
    frozen = {f"{i}.{n}" for i, blk in enumerate(blocks) for n, p in blk.named_parameters() if not p.requires_grad}
    assert len(frozen) == 5
    assert not frozen & set(b[2]) and not frozen & set(a[2])
    assert all(p.grad is None for blk in blocks for p in blk.parameters() if not p.requires_grad)
    assert_grads_close(a, b)


def test_frozen_stack_with_input_grad_only():
    blocks = mlp_blocks(5, seed=14)
    for blk in blocks:
        blk.requires_grad_(False)
    full, rev = momentum_pair(blocks, gamma=0.9)
    x = torch.randn(3, 4)
    a, b = run(full, x), run(rev, x)
    assert not b[2]
    torch.testing.assert_close(b[1], a[1], rtol=1e-4, atol=1e-5)


def test_tied_blocks_accumulate_gradients():
    block = MLP(4, 8, seed=15)
    full, rev = momentum_pair([block] * 8, gamma=0.9)
    x = torch.randn(3, 4)
    a, b = run(full, x), run(rev, x)
    assert sorted(a[2]) == ["0.b1", "0.b2", "0.w1", "0.w2"]  # one set of weights
    assert_grads_close(a, b)
    # tying = the sum of the gradients of 8 untied copies holding the same weights
    copies = [copy.deepcopy(block) for _ in range(8)]
    untied = ResidualStack(copies, rule="momentum", gamma=0.9, memory="full")
    c = run(untied, x)
    for name in ("w1", "b1", "w2", "b2"):
        summed = sum(c[2][f"{k}.{name}"] for k in range(8))
        torch.testing.assert_close(b[2][f"0.{name}"], summed, rtol=1e-4, atol=1e-5)


def test_partially_tied_blocks():
    a_blk, b_blk = MLP(4, 8, seed=16), MLP(4, 8, seed=17)
    full, rev = momentum_pair([a_blk, b_blk, a_blk, a_blk, b_blk], gamma=0.5)
    x = torch.randn(2, 4)
    assert_grads_close(run(full, x), run(rev, x))


@pytest.mark.parametrize("init", ["f", "module"])
def test_initial_velocity_gradients_match_full(init):
    blocks = mlp_blocks(10, seed=18)
    velocity = MLP(4, 6, seed=19) if init == "module" else "f"
    full, rev = momentum_pair(blocks, gamma=0.9, init_velocity=velocity)
    x = torch.randn(3, 4)
    a, b = run(full, x), run(rev, x)
    if init == "module":
        assert {"velocity.w1", "velocity.b1", "velocity.w2", "velocity.b2"} <= set(b[2])
        assert all(b[2][k].abs().sum() > 0 for k in b[2] if k.startswith("velocity"))
    assert_grads_close(a, b)
    # the initial velocity matters (its gradient path is exercised)
    zero = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="full")
    assert not torch.allclose(run(zero, x)[1], a[1], atol=1e-4)


class ArgBlock(nn.Module):
    """f(x, t, *, scale, shift=0.0) = scale * tanh(W x + t) + shift."""

    def __init__(self, dim: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(dim, dim, generator=g) / dim**0.5)

    def forward(self, x, t, *, scale, shift=0.0):
        return scale * torch.tanh(x @ self.w.T + t) + shift


@pytest.mark.parametrize("t_grad", [True, False])
@pytest.mark.parametrize("scale_grad", [True, False])
def test_extra_positional_and_keyword_tensor_arguments(t_grad, scale_grad):
    blocks = [ArgBlock(4, 20 + k) for k in range(6)]
    full, rev = momentum_pair(blocks, gamma=0.9, init_velocity="f")
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(21))
    t0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(22))
    s0 = torch.rand(1, 4, generator=torch.Generator().manual_seed(23)) + 0.5

    def grads_of(stack):
        t = t0.clone().requires_grad_(t_grad)
        s = s0.clone().requires_grad_(scale_grad)
        res = run(stack, x, t, scale=s, shift=0.1)
        return res, t.grad, s.grad

    (a, ta, sa), (b, tb, sb) = grads_of(full), grads_of(rev)
    assert_grads_close(a, b)
    for ga, gb, wanted in ((ta, tb, t_grad), (sa, sb, scale_grad)):
        if wanted:
            assert gb is not None and gb.abs().sum() > 0
            torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-5)
        else:
            assert ga is None and gb is None


# ------------------------------------------------------------------------------------------- replay


class DropBlock(nn.Module):
    def __init__(self, dim: int, seed: int):
        super().__init__()
        self.f = MLP(dim, 16, seed=seed)
        self.drop = nn.Dropout(0.3)

    def forward(self, x):
        return self.drop(self.f(x))


def assert_random_state_replayed(blocks: list[nn.Module], seed: int, **stack_kwargs) -> None:
    """Reversible gradients equal full backprop's under the same seed, the generator ends where full's does, and
    another seed gives other gradients (so the comparison is not vacuous)."""
    full, rev = momentum_pair(blocks, gamma=0.9, init_velocity="f", **stack_kwargs)
    x = torch.randn(5, 4)
    torch.manual_seed(seed)
    a = run(full, x)
    after_full = torch.rand(3)
    torch.manual_seed(seed)
    b = run(rev, x)
    after_rev = torch.rand(3)
    assert_grads_close(a, b)
    torch.testing.assert_close(after_rev, after_full, rtol=0, atol=0)
    torch.manual_seed(seed + 1)
    assert not torch.allclose(run(full, x)[1], a[1], atol=1e-4)


def test_dropout_is_replayed_in_backward():
    assert_random_state_replayed([DropBlock(4, 30 + k) for k in range(6)], seed=31)


def test_dropout_in_some_blocks_of_a_deep_stack_is_replayed():
    """Deterministic blocks share one stored random state, blocks that draw store their own (60 blocks, 40 of
    them with dropout: the stored states span two slabs of the log): gradients are full backprop's."""
    blocks = [DropBlock(4, 40 + k) if k % 3 else MLP(4, 16, seed=40 + k) for k in range(60)]
    assert_random_state_replayed(blocks, seed=41, scale=0.1)


def test_rng_log_stores_a_state_only_when_it_changed_and_restores_each_record():
    from zoo.nn.residual_stack import _RNGLog

    log = _RNGLog(torch.device("cpu"))
    torch.manual_seed(5)
    expected = []
    for k in range(200):
        log.record()
        expected.append(torch.rand(2) if k % 4 == 0 else None)  # every 4th record is followed by a draw
    assert len(log) == 200
    assert log._stored == 51  # the first state and one per draw: the records between two draws share one
    assert sum(s.shape[0] for s in log._slabs) == 16 + 32 + 64  # slabs double
    for k in reversed(range(200)):
        log.restore(k)
        if expected[k] is not None:
            assert torch.equal(torch.rand(2), expected[k])
    plain = _RNGLog(torch.device("cpu"))
    for _ in range(500):
        plain.record()
    assert plain._stored == 1 and len(plain._slabs) == 1  # nothing per step without random draws


def test_bf16_autocast_on_cpu_matches_full():
    blocks = [nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 8)) for _ in range(6)]
    torch.manual_seed(33)
    for blk in blocks:
        blk.apply(lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None)
    full, rev = momentum_pair(blocks, gamma=0.9)
    rev.record_rebuild = True
    x = torch.randn(4, 8)

    def run_autocast(stack):  # forward under autocast, backward outside it (as recommended)
        xg = x.clone().requires_grad_(True)
        stack.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stack(xg)
        (out.float() * weight_for(out).float()).sum().backward()
        return out.detach(), xg.grad, {n: p.grad.clone() for n, p in stack.named_parameters()}

    a, b = run_autocast(full), run_autocast(rev)
    assert torch.isfinite(b[0]).all() and torch.isfinite(b[1]).all()
    # backward replays the forward's autocast: the bf16 residuals are rebuilt bit for bit
    assert torch.equal(rev.last_rebuild[0], to_fixed_ref(x))
    assert torch.equal(rev.last_rebuild[1], torch.zeros_like(rev.last_rebuild[1]))
    assert_grads_close(a, b, rtol=5e-2, atol=5e-2)
    # and bf16 is a real approximation of the float32 result, not something else
    c = run(full, x)
    torch.testing.assert_close(b[0], c[0], rtol=5e-2, atol=5e-2)


def test_fused_relu_tail_with_stochastic_depth_and_autocast_matches_full():
    """ResNet blocks hand the engine g(x) and the tail relu(x + g) - x (split_residual), and backward writes g's
    cotangent over g: with stochastic depth (replayed) and under bf16 autocast, gradients equal full backprop's
    and the rebuilt x_0 is bit for bit the input."""
    torch.manual_seed(34)
    blocks = [BasicBlock(8, 8, drop_path=0.4) for _ in range(5)]
    twins = copy.deepcopy(blocks)
    full = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="full").train()
    rev = ResidualStack(twins, rule="momentum", gamma=0.9, memory="reversible").train()
    rev.record_rebuild = True
    assert rev.blocks[0].split_residual(torch.randn(2, 8, 4, 4))[1] == "relu"
    x = torch.randn(3, 8, 6, 6)
    torch.manual_seed(35)
    a = run(full, x)
    torch.manual_seed(35)
    b = run(rev, x)
    assert_grads_close(a, b, rtol=1e-3, atol=1e-5)
    assert torch.equal(rev.last_rebuild[0], to_fixed_ref(x))
    torch.manual_seed(36)  # other stochastic-depth draws give other gradients: the comparison is not vacuous
    assert not torch.allclose(run(full, x)[1], a[1], atol=1e-4)

    def run_autocast(stack, seed):
        xg = x.clone().requires_grad_(True)
        stack.zero_grad(set_to_none=True)
        torch.manual_seed(seed)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = stack(xg)
        (out.float() * weight_for(out).float()).sum().backward()
        return out.detach().float(), xg.grad, {n: p.grad.clone() for n, p in stack.named_parameters()}

    a, b = run_autocast(full, 37), run_autocast(rev, 37)
    assert torch.equal(rev.last_rebuild[0], to_fixed_ref(x))
    assert_grads_close(a, b, rtol=5e-2, atol=5e-2)


# ------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize("gamma", [-0.1, 1.0, 1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("memory", ["full", "reversible"])
def test_gamma_outside_unit_interval_is_an_error(gamma, memory):
    with pytest.raises(ZooError, match=r"gamma"):
        ResidualStack(mlp_blocks(2), rule="momentum", gamma=gamma, memory=memory)


def test_gamma_zero_with_reversible_memory_is_an_error():
    with pytest.raises(ZooError, match=r"0 < gamma < 1.*divides by gamma"):
        ResidualStack(mlp_blocks(2), rule="momentum", gamma=0.0, memory="reversible")
    with pytest.raises(ZooError, match="gamma"):
        GammaRatio(0.0)
    ResidualStack(mlp_blocks(2), rule="momentum", gamma=0.0, memory="full")  # the plain ResNet is fine


def test_gamma_without_an_exact_small_ratio_is_an_error_for_reversible():
    """The reversible engine multiplies by n/d exactly; a gamma that is no such ratio would make the
    reversible stack compute another network than memory='full' (and its gradients disagree)."""
    with pytest.raises(ZooError, match=r"ratio n/d"):
        ResidualStack(mlp_blocks(2), rule="momentum", gamma=0.12345, memory="reversible")
    ResidualStack(mlp_blocks(2), rule="momentum", gamma=0.12345, memory="full")
    for gamma in (0.9, 0.99, 0.95, 0.999, 1 / 3, 1 - 0.1):
        assert GammaRatio(gamma).value == pytest.approx(gamma, rel=1e-12)


@pytest.mark.parametrize("memory", ["full", "reversible"])
def test_block_changing_the_shape_is_an_error(memory):
    blocks = [MLP(4, 8), nn.Linear(4, 3)]
    stack = ResidualStack(blocks, rule="momentum", gamma=0.9, memory=memory)
    with pytest.raises(ZooError, match=r"block 1 .*maps shape \(2, 4\) to \(2, 3\).*keep the shape"):
        stack(torch.randn(2, 4, requires_grad=True))
    bad_velocity = ResidualStack(
        mlp_blocks(2), rule="momentum", gamma=0.9, memory=memory, init_velocity=nn.Linear(4, 2)
    )
    with pytest.raises(ZooError, match="initial velocity has shape"):
        bad_velocity(torch.randn(2, 4, requires_grad=True))


@pytest.mark.parametrize("memory", ["full", "reversible"])
@pytest.mark.parametrize("x", [torch.arange(8).reshape(2, 4), torch.ones(2, 4, dtype=torch.bool), [1.0, 2.0]])
def test_non_floating_input_is_an_error(memory, x):
    stack = ResidualStack(mlp_blocks(2), rule="momentum", gamma=0.9, memory=memory)
    with pytest.raises(ZooError, match="floating-point tensor"):
        stack(x)


class Const(nn.Module):
    """f(x) = a + w tanh(1e-9 x)."""

    def __init__(self, a: float):
        super().__init__()
        self.a = a
        self.w = nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, x):
        return self.a + self.w * torch.tanh(1e-9 * x)


class Fill(nn.Module):
    def __init__(self, value: float):
        super().__init__()
        self.value = value

    def forward(self, x):
        return torch.full_like(x, self.value)


RANGE_ERROR = (
    r"fixed-point range \|x\| < 2\^29.*Normalise the input, lower fixed_point_bits \(now 32\), "
    r"or use memory='full'"
)


def _range_error(stack: ResidualStack, x: torch.Tensor) -> None:
    """On CPU the forward itself raises (reading the range flag costs no device sync there)."""
    with pytest.raises(ZooError, match=RANGE_ERROR):
        stack(x.requires_grad_(True))
    assert x.grad is None


def _out_of_range_case(case: str) -> tuple[ResidualStack, torch.Tensor]:
    x = torch.randn(2, 4)
    blocks = mlp_blocks(3)
    if case == "big_input":
        x = x * 1e12
    elif case in ("inf", "nan"):
        blocks[1] = Fill(float(case))
    elif case == "big_velocity":  # every residual step in range, the velocity it accumulates is not
        blocks = [Const(4e9) for _ in range(30)]
        x = x.double()
    elif case == "big_intermediate":  # x_n leaves the range (and would wrap int64), then comes back
        blocks = [Const(4e8) for _ in range(20)] + [Const(-4e8) for _ in range(20)]
        x = torch.zeros(2, 1, dtype=torch.float64)
    stack = ResidualStack(
        blocks,
        rule="momentum",
        gamma=0.5 if case == "big_intermediate" else 0.9,
        memory="reversible",
        fixed_point_bits=32,
    )
    return stack, x


OUT_OF_RANGE_CASES = ["big_input", "inf", "nan", "big_velocity", "big_intermediate"]


@pytest.mark.parametrize("case", OUT_OF_RANGE_CASES)
def test_values_out_of_fixed_point_range_raise_in_forward(case):
    _range_error(*_out_of_range_case(case))


@pytest.mark.parametrize("case", OUT_OF_RANGE_CASES)
def test_on_an_accelerator_out_of_range_poisons_the_output_and_backward_raises(case, monkeypatch):
    """Where reading the range flag would synchronise the device, forward fills its output with NaN on the device
    (no wrong finite value reaches code that skips backward) and backward raises the range error; the CPU run
    here takes that branch when the host read is declared costly."""
    import zoo.nn.residual_stack as engine

    stack, x = _out_of_range_case(case)
    monkeypatch.setattr(engine, "host_read_is_free", lambda t: False)
    out = stack(x.requires_grad_(True))
    assert torch.isnan(out).all()
    with pytest.raises(ZooError, match=RANGE_ERROR):
        out.sum().backward()
    assert x.grad is None
    # the same branch leaves an in-range forward untouched: memory='full''s value, no NaN
    blocks = mlp_blocks(3)
    full, rev = momentum_pair(blocks, gamma=0.9)
    x = torch.randn(2, 4)
    torch.testing.assert_close(rev(x.requires_grad_(True)), full(x), rtol=1e-6, atol=1e-6)


def test_refuse_out_of_range_raises_or_poisons_by_the_flag():
    from zoo.nn.residual_stack import _refuse_out_of_range

    fp = FixedPoint(32)
    out = torch.randn(3, 2)
    same = out.clone()
    assert torch.equal(_refuse_out_of_range(out, torch.tensor(False), fp, raise_now=False), same)
    assert torch.equal(_refuse_out_of_range(out, torch.tensor(False), fp, raise_now=True), same)
    with pytest.raises(ZooError, match=RANGE_ERROR):
        _refuse_out_of_range(out, torch.tensor(True), fp, raise_now=True)
    assert torch.isnan(_refuse_out_of_range(out, torch.tensor(True), fp, raise_now=False)).all()


def test_without_gradients_a_reversible_stack_returns_the_float_rule_of_full_memory():
    """Under no_grad (or when nothing needs a gradient) nothing is rebuilt, so the reversible stack runs (M1) in
    floating point, as memory='full' does: an input outside the fixed-point range gives full's value, not an
    error and not a fixed-point result."""
    blocks = mlp_blocks(3)
    full, rev = momentum_pair(blocks, gamma=0.9)
    x = torch.randn(2, 4) * 1e12
    with torch.no_grad():
        expected = full(x)
        got = rev(x)
    assert torch.isfinite(got).all() and got.abs().max() > 1e11
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize("gamma", [0.5, 0.9, 0.99])
def test_the_state_bound_holds_on_integer_trajectories(gamma):
    """The bound of momentum_state_out_of_range is never below the true max |x_n|, |v_n| (no false pass)."""
    fp, ratio = FixedPoint(32), GammaRatio(gamma)
    gen = torch.Generator().manual_seed(3)
    x0, v0 = torch.randn(64, generator=gen) * 3, torch.randn(64, generator=gen)
    xi, vi, buf = fp.to_fixed(x0), fp.to_fixed(v0), torch.zeros(64, dtype=torch.int64)
    steps, g_max, true_max = 60, 0.0, 0.0
    for n in range(steps):
        g = (1 - gamma) * torch.randn(64, generator=gen) * (1 + n % 7)  # same sign runs push the state far
        g = g.abs() if n < 40 else g
        g_max = max(g_max, g.abs().max().item())
        vi, buf = ratio.multiply(vi, buf)
        vi = vi + fp.to_fixed(g)
        xi = xi + vi
        true_max = max(true_max, xi.abs().max().item() / fp.scale, vi.abs().max().item() / fp.scale)
    v_bound = max(v0.abs().max().item(), g_max / (1 - gamma))
    bound = x0.abs().max().item() + steps * v_bound
    assert true_max <= bound
    assert true_max > 0.1 * bound  # the bound is not vacuous on a drifting trajectory
    small = FixedPoint(61 - math.ceil(math.log2(2 * bound)) - 1)  # a range just above twice the bound
    t = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    assert not small.momentum_state_out_of_range(
        t(x0.abs().max().item()), t(v0.abs().max().item()), t(g_max), gamma, steps
    ).item()


def test_out_of_range_check_depends_on_fixed_point_bits():
    stack = ResidualStack(mlp_blocks(3), rule="momentum", gamma=0.9, memory="reversible", fixed_point_bits=16)
    x = (torch.randn(2, 4) * 1e12).requires_grad_(True)  # < 2^45: fine with 16 fractional bits
    stack(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    with pytest.raises(ZooError, match="fixed_point_bits"):
        ResidualStack(mlp_blocks(1), rule="momentum", memory="reversible", fixed_point_bits=64)


# ------------------------------------------------------------------------------------------- 1-D


def _fit_cube(stack: nn.Module, steps: int = 300) -> float:
    x = torch.linspace(-1, 1, 64).unsqueeze(1)
    y = -(x**3)
    opt = torch.optim.Adam(stack.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((stack(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return ((stack(x) - y) ** 2).mean().item()


def test_momentum_learns_minus_x_cubed_where_a_resnet_cannot():
    """docs/mathematics.md, section 4: x -> -x^3 on [-1, 1] with one MLP f: R -> R tied across 20 layers.

    The depth-scaled ResNet x_{n+1} = x_n + f(x_n) / 20 discretises the first-order ODE x' = f(x). Its
    flow is order-preserving (two trajectories of a 1-D autonomous ODE never cross; for the discrete map,
    x + f(x)/20 is increasing whenever |f'| < 20), so the learned map is non-decreasing. The best
    non-decreasing fit of the decreasing target -x^3 is a constant (0), with mean squared error
    mean(x^6) ~ 1/7. The momentum rule is second order (eps x'' + x' = f(x)): the state (x, v) lives in
    2-D phase space, where trajectories may overtake one another, so the map x_0 -> x_N can reverse the
    order and fit -x^3 far better.
    """
    hidden = 16
    torch.manual_seed(40)
    f_res = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
    f_mom = copy.deepcopy(f_res)  # the same initial weights
    resnet = ResidualStack([f_res] * 20, rule="euler", scale="depth")
    momentum = ResidualStack([f_mom] * 20, rule="momentum", gamma=0.9, memory="full")
    assert resnet.is_tied() and momentum.is_tied()
    mse_res, mse_mom = _fit_cube(resnet), _fit_cube(momentum)
    x = torch.linspace(-1, 1, 64)
    monotone_bound = (x**6).mean().item()  # the MSE of the best non-decreasing fit
    with torch.no_grad():
        learned = resnet(x.unsqueeze(1)).squeeze(1)
    assert bool((learned[1:] >= learned[:-1] - 1e-6).all())  # the ResNet map is order-preserving
    assert mse_res >= 0.95 * monotone_bound
    assert mse_mom < 0.5 * mse_res, (mse_mom, mse_res)


# ------------------------------------------------------------------------------------------- compile


def test_torch_compile_of_a_reversible_stack_gives_the_eager_result():
    blocks = mlp_blocks(3, seed=50)
    rev = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="reversible", init_velocity="f")
    x = torch.randn(3, 4)
    eager = run(rev, x)
    compiled = torch.compile(rev, backend="aot_eager")
    got = run(compiled, x)
    torch.testing.assert_close(got[0], eager[0], rtol=0, atol=0)
    torch.testing.assert_close(got[1], eager[1], rtol=0, atol=0)
    assert sorted(k.removeprefix("_orig_mod.") for k in got[2]) == sorted(eager[2])
    for k, g in got[2].items():
        torch.testing.assert_close(g, eager[2][k.removeprefix("_orig_mod.")], rtol=0, atol=0)


# ------------------------------------------------------------------------------- transition and fusion


class _Transition(nn.Module):
    """A shape-changing first block (4 -> 6 features) with a wide hidden layer and dropout."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 6))

    def forward(self, x):
        return self.inner(x)


def test_transition_is_recomputed_in_backward_not_stored():
    torch.manual_seed(41)
    transition, blocks = _Transition(), mlp_blocks(5, dim=6, hidden=12, seed=42)
    full = ResidualStack(blocks, rule="momentum", memory="full", transition=transition)
    rev = ResidualStack(blocks, rule="momentum", memory="reversible", transition=transition)
    x = torch.randn(3, 4)
    torch.manual_seed(43)
    a = run(full, x)
    torch.manual_seed(43)
    b = run(rev, x)
    assert "0.inner.0.weight" in b[2]  # the transition's parameters get their gradients
    assert_grads_close(a, b)  # the same dropout mask in the transition's recomputation
    torch.manual_seed(44)
    assert not torch.allclose(run(full, x)[2]["0.inner.0.weight"], a[2]["0.inner.0.weight"], atol=1e-4)

    saved: list[torch.Size] = []

    def pack(t):
        saved.append(t.shape)
        return t

    for stack, stores_hidden in ((full, True), (rev, False)):
        saved.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            stack(x.clone().requires_grad_(True))
        assert any(s[-1:] == (32,) for s in saved) is stores_hidden, saved


@pytest.mark.parametrize("blocks", ["mlp", "basic"])
def test_fused_kernels_compute_the_eager_integers(blocks):
    """The compiled kernels (the default outside this suite) give the eager results bit for bit: generic residual
    functions (tail "identity", 30 MLP blocks) and ResNet blocks whose relu(x + g) - x tail the kernels fuse."""
    from zoo.ops import fixed_point

    if blocks == "mlp":
        stack = ResidualStack(
            mlp_blocks(30, dim=6, hidden=12, seed=45),
            rule="momentum",
            memory="reversible",
            gamma=0.9,
            init_velocity="f",
            transition=nn.Linear(5, 6),
        )
        x = torch.randn(7, 5, generator=torch.Generator().manual_seed(46))
    else:
        torch.manual_seed(47)
        stack = ResidualStack(
            [BasicBlock(6, 6) for _ in range(4)],
            rule="momentum",
            memory="reversible",
            gamma=0.9,
            init_velocity="f",
            transition=nn.Conv2d(3, 6, 3, padding=1),
        ).train()
        assert stack.blocks[0].split_residual(torch.randn(2, 6, 5, 5))[1] == "relu"
        x = torch.randn(3, 3, 5, 5, generator=torch.Generator().manual_seed(48))
    stack.record_rebuild = True
    results = []
    for fused in (False, True):
        fixed_point.set_fused(fused)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a compile failure falls back with a warning: fail instead
                results.append((*run(stack, x), stack.last_rebuild))
            assert fixed_point.fused_enabled() is fused
        finally:
            fixed_point.set_fused(False)
    (out_e, gx_e, gp_e, rb_e), (out_f, gx_f, gp_f, rb_f) = results
    assert torch.equal(out_e, out_f) and torch.equal(gx_e, gx_f)
    assert gp_e.keys() == gp_f.keys() and all(torch.equal(gp_e[k], gp_f[k]) for k in gp_e)
    assert torch.equal(rb_e[0], rb_f[0]) and torch.equal(rb_e[1], rb_f[1])
    fp = stack.fixed_point
    assert torch.equal(rb_f[0], fp.to_fixed(stack.transition(x)))  # the rebuild is x_0 itself


def test_a_second_backward_through_the_same_forward_is_one_clear_error():
    stack = ResidualStack(mlp_blocks(3), rule="momentum", memory="reversible")
    out = stack(torch.randn(2, 4, requires_grad=True)).sum()
    out.backward(retain_graph=True)
    with pytest.raises(ZooError, match="retain_graph"):
        out.backward()


@pytest.mark.parametrize("init", ["zero", "f"])
def test_double_backward_is_one_clear_error_naming_create_graph(init):
    """create_graph=True (Hessian-vector products, gradient penalties) is refused with its real cause, not blamed on
    retain_graph; first-order gradients of the same stack keep working afterwards."""
    stack = ResidualStack(mlp_blocks(3), rule="momentum", memory="reversible", init_velocity=init)
    x = torch.randn(2, 4, requires_grad=True)
    with pytest.raises(ZooError, match=r"double backward.*create_graph=True.*memory='reversible'.*memory='full'"):
        torch.autograd.grad(stack(x).pow(2).sum(), x, create_graph=True)
    (gx,) = torch.autograd.grad(stack(x).pow(2).sum(), x)
    full = ResidualStack(stack.blocks, rule="momentum", memory="full", init_velocity=init)
    torch.testing.assert_close(gx, torch.autograd.grad(full(x).pow(2).sum(), x)[0], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------- dynamic shapes


@pytest.mark.parametrize("memory", ["reversible", "full"])
def test_momentum_resnet_exports_with_a_dynamic_batch(memory):
    """torch.export with a dynamic batch dim: under tracing the fused float step takes one path whatever the state's
    size (no branch on numel, no reshape guarded against the batch), so the exported program gives the eager logits
    at other batch sizes (with and without gradients in eager: the plain forward, and the reversible Function)."""
    torch.manual_seed(0)
    model = zoo.momentum_cifar_resnet(layers=(2, 2, 2), widths=(8, 8, 16), memory=memory).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, (torch.randn(2, 3, 16, 16),), dynamic_shapes=({0: batch},))
    for b in (3, 8):
        x = torch.randn(b, 3, 16, 16)
        got = exported.module()(x)
        with torch.no_grad():
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("memory", ["reversible", "full"])
def test_torch_compile_of_a_deep_momentum_resnet_stays_below_the_recompile_limit(caplog, memory):
    """A caller's torch.compile of a momentum ResNet in eval with more than 8 blocks per stage: the reversible
    Function runs untraced (one graph break per stage) and memory="full"'s fused step is traced, instead of Dynamo
    compiling each block's call as a frame of its own, specialised on the block index, which hit the recompile limit
    (8) and fell back to eager with a warning."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = zoo.momentum_cifar_resnet(layers=(10, 10, 10), widths=(4, 8, 8), memory=memory).eval()
    assert model.layer1.memory == memory and model.layer1.depth > 8
    x = torch.randn(2, 3, 16, 16)
    eager = model(x)
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        got = torch.compile(model, backend="eager")(x)
    assert "recompile_limit" not in caplog.text
    assert not any("recompile limit" in str(key).lower() for key in counters["unimplemented"])
    assert counters["frames"]["total"] < 10, dict(counters["frames"])  # a few per stage, none per block (30)
    torch.testing.assert_close(got, eager, rtol=0, atol=0)
    torch._dynamo.reset()
