"""Exact fixed-point arithmetic for reversible momentum steps (docs/mathematics.md, section 4).

Division by gamma loses bits in floating point, so the reversible momentum engine holds x and v as
integers x_int = round(x * 2^F) (``F = frac_bits``) and multiplies by gamma = n/d exactly, keeping
the remainder bits in an integer *information buffer* i (Maclaurin, Duvenaud and Adams, 2015):

    multiply:  i = i*d + (c mod d);  c = (c div d)*n + (i mod n);  i = i div n
    divide:    i = i*n + (c mod n);  c = (c div n)*d + (i mod d);  i = i div d      (the exact reverse)

with floor division and floor modulus (also for negative c). The buffer grows by log2(d/n) bits per
multiply; :attr:`GammaRatio.steps_per_word` is how many multiplies a 64-bit word takes from zero
without overflow, after which the caller starts a new word (the bound is exact, so no host sync is
needed to detect a full buffer); :meth:`GammaRatio.word_plan` stores the words in int8, int32 or int64,
whichever takes the fewest bytes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import torch
from torch.fx.experimental.symbolic_shapes import statically_known_true

from zoo.errors import ZooError
from zoo.ops.compiled import CompiledKernels, from_memory_order, in_memory_order, memory_order

_INT64_MAX = 2**63 - 1


def floor_divmod(c: torch.Tensor, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c div d, c mod d) of an int64 tensor by a positive int, floor division and floor modulus, exact over
    int64 (|c| <= 2^63 - 1; d = 1 returns c as it is), with no integer division.

    Integer division does not vectorise (x86 has no 64-bit vector division, and a constant divisor's
    multiply-high has no 64-bit vector form either), so the quotient is estimated in float64 and corrected in int64:
    q0 = floor(float(c) / d) is within a few hundred of c div d (float(c) rounds to 53 bits), so r0 = c - q0 d is
    small and exact in float64, q1 = floor(r0 / d) is within one of r0 div d, and one last correction of
    r = c - (q0 + q1) d into [0, d) makes the pair exact. Every step vectorises (int64 <-> float64 conversions,
    64-bit multiplies).
    ``c``: the int64 dividend; ``d``: the divisor, a Python int >= 1."""
    if d == 1:
        return c, torch.zeros_like(c)
    inv = 1.0 / d
    q = torch.floor(c.to(torch.float64) * inv).to(torch.int64)
    r = c - q * d
    q1 = torch.floor(r.to(torch.float64) * inv).to(torch.int64)
    q = q + q1
    r = r - q1 * d
    low, high = r < 0, r >= d
    q = torch.where(low, q - 1, torch.where(high, q + 1, q))
    r = torch.where(low, r + d, torch.where(high, r - d, r))
    return q, r


def _floor_divmod_small(c: torch.Tensor, d: int, work: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(c div d, c mod d) of a non-negative integer tensor small enough that one estimate of the quotient in the
    floating ``work`` dtype is within one: 0 <= c < 2^24 for float32 (c an int32 tensor), 0 <= c < 2^52 for
    float64 (int64). |c/d - c * fl(1/d)| < 1 there, so one correction makes the pair exact; half the work of
    :func:`floor_divmod`, and float32 conversions of int32 run natively vectorised (those of int64 do not)."""
    if d == 1:
        return c, torch.zeros_like(c)
    q = torch.floor(c.to(work) * (1.0 / d)).to(c.dtype)
    r = c - q * d
    low, high = r < 0, r >= d
    q = torch.where(low, q - 1, torch.where(high, q + 1, q))
    r = torch.where(low, r + d, torch.where(high, r - d, r))
    return q, r


def exact_multiply(c: torch.Tensor, i: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, i) -> (c n/d rounded down, the buffer with the lost bits): the multiply of the module docstring.

    ``c``: int64; ``i``: the buffer word, in any integer dtype, 0 <= i <= that dtype's largest value (a narrow
    word's values fit it before and after the step: :meth:`GammaRatio.word_plan`). With n and d swapped it is
    the exact divide. Returns the new c (int64) and the new buffer (int64, or int32 where computed so).

    Compiled, both divisions are vectorised estimates corrected to be exact (fused into one pass): c's by
    :func:`floor_divmod` (c spans int64); the buffer's, i d + (c mod d) < (max i + 1) max(n, d), by
    :func:`_floor_divmod_small`: in int32 and float32 when that is below 2^24 (int8 words; int16 words for
    n, d <= 511), in float64 for the other narrow words, by :func:`floor_divmod` for int64 words only. Eager,
    ``torch.div`` (fewer full-size temporaries, so a lower peak), each remainder taken as a - q b from its quotient,
    the buffer i never negative, so truncation is floor on it.
    """
    if not torch.compiler.is_compiling():
        q = torch.div(c, d, rounding_mode="floor")
        i = torch.add(torch.sub(c, q, alpha=d), i.to(torch.int64), alpha=d)  # i d + (c mod d)
        j = torch.div(i, n, rounding_mode="trunc")
        return torch.add(torch.sub(i, j, alpha=n), q, alpha=n), j  # (c div d) n + (i mod n), i div n
    q, r = floor_divmod(c, d)
    if i.dtype == torch.int64:
        j, s = floor_divmod(i * d + r, n)  # i d + (c mod d), then its quotient and remainder by n
        return q * n + s, j
    top = (torch.iinfo(i.dtype).max + 1) * max(n, d)  # i d + (c mod d) < top
    if top <= 2**24:
        j, s = _floor_divmod_small(i.to(torch.int32) * d + r.to(torch.int32), n, torch.float32)
        return q * n + s.to(torch.int64), j
    j, s = _floor_divmod_small(i.to(torch.int64) * d + r, n, torch.float64)
    return q * n + s, j


class GammaRatio:
    """gamma = n/d as an exact ratio, with the buffer-word capacity of its exact multiply.

    Args:
        gamma: the momentum term, 0 < gamma < 1.
        max_denominator: gamma is rounded to the closest n/d with d <= this (0.9 -> 9/10).
    """

    def __init__(self, gamma: float, max_denominator: int = 1000) -> None:
        if not 0.0 < gamma < 1.0:
            raise ZooError(f"exact reversible momentum needs 0 < gamma < 1 (the inverse divides by gamma), got {gamma}")
        ratio = Fraction(gamma).limit_denominator(max_denominator)
        if not 0 < ratio.numerator < ratio.denominator:
            raise ZooError(f"gamma {gamma} is too close to 0 or 1 for a ratio n/d with d <= {max_denominator}")
        if not math.isclose(ratio.numerator / ratio.denominator, gamma, rel_tol=1e-12):
            # the forward would multiply by another gamma than the one of memory='full' and of the gradients
            raise ZooError(
                f"exact reversible momentum multiplies by gamma as a ratio n/d with d <= {max_denominator}; "
                f"gamma={gamma} is not one (nearest {ratio.numerator}/{ratio.denominator}): use such a ratio "
                f"(e.g. 0.9 = 9/10, 0.99 = 99/100) or memory='full'"
            )
        self.n, self.d = ratio.numerator, ratio.denominator
        self.steps_per_word = self._capacity()
        self._plans: dict[int, list[tuple[int, torch.dtype]]] = {}

    @property
    def value(self) -> float:
        """The gamma actually used, n/d."""
        return self.n / self.d

    def _capacity(self) -> int:
        """Largest k such that k multiplies from i = 0 never overflow int64 (bound i <- (i d + d - 1) div n)."""
        bound, steps = 0, 0
        while bound * self.d + self.d - 1 <= _INT64_MAX:
            bound = (bound * self.d + self.d - 1) // self.n
            steps += 1
            if steps >= 1 << 20:  # gamma extremely close to 1: the buffer hardly grows
                break
        return steps

    def multiply(self, c: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(c, i) -> (c * n/d rounded, buffer holding the lost bits); exactly undone by :meth:`divide`."""
        return exact_multiply(c, i, self.n, self.d)

    def divide(self, c: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact inverse of :meth:`multiply`."""
        return exact_multiply(c, i, self.d, self.n)

    def buffer_bound(self, steps: int) -> int:
        """Largest buffer value after ``steps`` multiplies from i = 0 (0 <= i <= bound)."""
        bound = 0
        for _ in range(steps):
            bound = (bound * self.d + self.d - 1) // self.n
        return bound

    def word_capacity(self, dtype: torch.dtype) -> int:
        """How many multiplies from i = 0 a buffer word stored in the integer ``dtype`` takes without overflow (its
        worst-case bound at most the dtype's largest value), never more than :attr:`steps_per_word`, the int64
        word's count (the kernels' int64 intermediate i d + d - 1 must not overflow either)."""
        if dtype == torch.int64:
            return self.steps_per_word
        top, bound, steps = torch.iinfo(dtype).max, 0, 0
        while steps < self.steps_per_word:
            bound = (bound * self.d + self.d - 1) // self.n
            if bound > top:
                break
            steps += 1
        return steps

    def word_plan(self, steps: int) -> list[tuple[int, torch.dtype]]:
        """How ``steps`` multiplies split into buffer words: (multiplies, storage dtype) per word, in order.

        The fewest bytes per element, then the fewest words, among words stored as int8, int32 or int64, each
        filled to at most its :meth:`word_capacity`. Not int16: the compiled kernels' conversions between int16
        and the int32/int64 arithmetic do not vectorise (a step on an int16 word took 3-6x the time of one on an
        int8 or int32 word), and two int8 words cost the bytes of one int16 word. ``steps`` = 0 gives one empty
        int8 word (the kernels always take one).
        """
        if steps in self._plans:
            return self._plans[steps]
        kinds = [(torch.int8, 1), (torch.int32, 4), (torch.int64, 8)]
        kinds = [(dtype, size, self.word_capacity(dtype)) for dtype, size in kinds]
        kinds = [k for k in kinds if k[2] > 0]
        # best[k] = (bytes, words, dtype of the first word, its multiplies) for k multiplies
        best: list[tuple[int, int, torch.dtype, int]] = [(0, 0, torch.int8, 0)]
        for k in range(1, steps + 1):
            best.append(
                min(
                    (
                        (best[k - min(k, cap)][0] + size, best[k - min(k, cap)][1] + 1, dtype, min(k, cap))
                        for dtype, size, cap in kinds
                    ),
                    key=lambda b: (b[0], b[1]),
                )
            )
        plan, k = [], steps
        while k:
            _, _, dtype, count = best[k]
            plan.append((count, dtype))
            k -= count
        self._plans[steps] = plan or [(0, torch.int8)]
        return self._plans[steps]


class FixedPoint:
    """Conversions between floating tensors and int64 fixed point with ``frac_bits`` fractional bits.

    Representable values satisfy |x| < 2^(61 - frac_bits) (two bits of headroom, so that the sum
    x + v of two representable values cannot wrap); :meth:`out_of_range` flags the others, and
    :meth:`momentum_state_out_of_range` bounds every state of a momentum stack.

    Args:
        frac_bits: F, the number of fractional bits, an int in [8, 52].
    """

    def __init__(self, frac_bits: int = 32) -> None:
        if not isinstance(frac_bits, int) or not 8 <= frac_bits <= 52:
            raise ZooError(
                f"the fixed-point fractional bits (fixed_point_bits) must be an integer in [8, 52], got {frac_bits!r}"
            )
        self.frac_bits = frac_bits
        self.scale = float(2**frac_bits)
        self.limit = float(2 ** (61 - frac_bits))

    @staticmethod
    def work_dtype(t: torch.Tensor) -> torch.dtype:
        """The floating dtype the conversions of ``t`` compute in: float64 for float64, else float32."""
        return torch.float64 if t.dtype == torch.float64 else torch.float32

    def to_fixed(self, t: torch.Tensor) -> torch.Tensor:
        """round(t * 2^F) as int64 (scaling by a power of two is exact; out-of-range values: see
        :meth:`out_of_range`)."""
        t = t.to(self.work_dtype(t))
        return torch.round(t * self.scale).to(torch.int64)

    def to_float(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """t / 2^F in ``dtype`` (a deterministic function of the integers)."""
        return _to_float(t, self.scale, dtype)

    def abs_max(self, t: torch.Tensor) -> torch.Tensor:
        """max |t| as a 0-dim float64 tensor (one pass; NaN propagates; no host sync)."""
        lo, hi = torch.aminmax(t)
        return torch.maximum(-lo, hi).to(torch.float64)

    def momentum_state_out_of_range(
        self, x0_max: torch.Tensor, v0_max: torch.Tensor, g_max: torch.Tensor, gamma: float, steps: int
    ) -> torch.Tensor:
        """Whether some state of ``steps`` momentum steps may leave the range (a 0-dim bool tensor).

        A bound from the float maxima, so no integer state needs its own pass: with |g_n| <= G,
        v_{n+1} = gamma v_n + g_n gives |v_n| <= V = max(|v_0|, G / (1 - gamma)), and x_n = x_0 + sum v
        gives |x_n| <= |x_0| + n V. Rounding adds a few units of 2^-F per step, covered by testing
        against half the range. NaN or inf anywhere makes the bound non-finite and is flagged.

        Args:
            x0_max, v0_max: max |x_0| and max |v_0|, 0-dim tensors (see :meth:`abs_max`).
            g_max: G, a bound on max |g_n| over the steps (0-dim tensor).
            gamma: the momentum term.
            steps: the number of steps n.
        """
        v_bound = torch.maximum(v0_max, g_max / (1.0 - gamma))
        bound = x0_max + steps * v_bound
        return ~(bound < self.limit / 2)

    def out_of_range(self, t: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: some value is non-finite or too large to represent (no host sync)."""
        lo, hi = torch.aminmax(t)  # one pass; NaN propagates into both
        return (hi >= self.limit) | (lo <= -self.limit) | torch.isnan(hi)


# --------------------------------------------------------------------------------------------------
# Fused momentum steps. A step is a handful of integer passes over the state plus the element-wise tail of
# the residual function; on a CPU every pass is memory-bound (and integer division is slow), so by default
# each runs as one compiled kernel (torch.compile) which computes the same integers bit for bit (exact
# integer operations and IEEE roundings, no reassociation or contraction). The kernels update the state in
# place: a fresh int64 output of a stage-sized tensor costs as much again in page faults on a CPU.
# ``set_fused(False)`` or the environment variable ZOO_FUSED_FIXED_POINT=0 keeps them eager; a failed
# compilation falls back to eager once, with a warning.

RESIDUAL_TAILS = ("identity", "relu")


def post_activation_residual(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """f(x) = relu(x + g) - x: the residual function of a post-activation block x -> relu(x + g(x))
    (torchvision's BasicBlock and Bottleneck inside a stage), so that x + f(x) is the block's output."""
    return torch.relu(x + g) - x


def residual_tail(x: torch.Tensor, g: torch.Tensor, tail: str) -> torch.Tensor:
    """The residual function f from its input x and its last computed tensor g: ``"identity"`` f = g;
    ``"relu"`` f = :func:`post_activation_residual` (x, g).
    ``tail``: the tail's name (``"relu"`` or ``"identity"``)."""
    return post_activation_residual(x, g) if tail == "relu" else g


def _momentum_step_(
    xi: torch.Tensor,
    vi: torch.Tensor,
    buffer: torch.Tensor,
    xf: torch.Tensor,
    g: torch.Tensor,
    *,
    c: float,
    tail: str,
    n: int,
    d: int,
    scale: float,
) -> torch.Tensor:
    """(M1) in fixed point, in place: v <- gamma v + round(2^F c f) (the buffer keeps the lost bits), x <- x + v,
    and ``xf`` <- x / 2^F, the next residual function's input; f = residual_tail(xf, g, tail).

    Returns max |c f| (0-dim; infinite when g holds a NaN) for the range check, without a host sync.
    """
    work = torch.float64 if xf.dtype == torch.float64 else torch.float32
    gc = c * residual_tail(xf.to(work), g.to(work), tail)
    v, b = exact_multiply(vi, buffer, n, d)  # the buffer word may be stored narrower
    v = v + torch.round(gc * scale).to(torch.int64)
    x = xi + v
    bound = torch.where(torch.isnan(g).any(), math.inf, gc.abs().amax())
    xi.copy_(x)
    vi.copy_(v)
    buffer.copy_(b)
    xf.copy_(_to_float(x, scale, xf.dtype))
    return bound


def _momentum_unstep_(
    xi: torch.Tensor,
    vi: torch.Tensor,
    buffer: torch.Tensor,
    xf: torch.Tensor,
    g: torch.Tensor,
    a: torch.Tensor,
    gx: torch.Tensor,
    *,
    c: float,
    tail: str,
    n: int,
    d: int,
    scale: float,
    first: bool,
) -> torch.Tensor:
    """The inverse (M2) of step k and the element-wise part of its gradient, in place.

    Given x_k = ``xi`` (and its float ``xf``), v_{k+1} = ``vi``, g = the residual function's last tensor at x_k
    (f = residual_tail(xf, g, tail)) and a = dL/dx_{k+1} + dL/dv_{k+1}: ``xi``, ``vi`` <- x_{k-1} = x_k - v_k,
    v_k; ``gx`` += the direct part of c (df/dx)^T a (the tail's, -c a where x + g <= 0 for ``"relu"``). Returns
    c (df/dg)^T a, the cotangent of g, in g's dtype: for ``"relu"`` written into g itself (g's values are dead
    after this kernel, and a ResNet block's g, its last BatchNorm's output, is saved by no autograd node), else a
    new tensor. ``xf`` is left alone (f_k's graph still holds it; the caller
    refreshes it with :func:`_refresh_float_` afterwards). For the ``first`` step (k = 0) only v_0 is rebuilt:
    ``xi`` keeps x_0.
    """
    work = torch.float64 if xf.dtype == torch.float64 else torch.float32
    xw, gw = xf.to(work), g.to(work)
    gc = c * residual_tail(xw, gw, tail)
    v, b = exact_multiply(vi - torch.round(gc * scale).to(torch.int64), buffer, d, n)
    ca = c * a.to(work)
    if tail == "relu":
        positive = (xw + gw) > 0  # relu's derivative, 0 at 0 as autograd's
        grad_g = torch.where(positive, ca, 0.0)
        gx.copy_(gx + torch.where(positive, 0.0, -ca).to(gx.dtype))
    else:
        grad_g = ca
    if not first:
        xi.copy_(xi - v)
    vi.copy_(v)
    buffer.copy_(b)
    if tail == "relu":
        g.copy_(grad_g)  # one stage-sized buffer less at the backward's peak
        return g
    return grad_g.to(g.dtype)


def _accumulate_(gx: torch.Tensor, a: torch.Tensor, grad_branch: torch.Tensor, *, gamma: float, last: bool) -> None:
    """In place: gx += grad_branch (the rest of c J_f^T a), and unless ``last`` a <- gx + gamma a, the next
    step's a = dL/dx_k + dL/dv_k (dL/dv_k = gamma a)."""
    gx.copy_(gx + grad_branch.to(gx.dtype))
    if not last:
        a.copy_(gx + gamma * a)


def _refresh_float_(xi: torch.Tensor, xf: torch.Tensor, *, scale: float) -> None:
    """In place xf <- xi / 2^F (a separate pass so that backward needs one float state buffer, not two)."""
    xf.copy_(_to_float(xi, scale, xf.dtype))


def _rewind_(xi: torch.Tensor, vi: torch.Tensor, *, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """In place x <- x - v (x_{N-1} = x_N - v_N); returns its float value."""
    xi.copy_(xi - vi)
    return _to_float(xi, scale, dtype)


def _to_float(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (t.to(work) * (1.0 / scale)).to(dtype)  # 1/2^F is exact: the same as dividing


# --------------------------------------------------------------------------------------------------
# The float momentum step of memory="full". Autograd through (M1) written as tensor ops keeps, per step, the
# output of the tail's ReLU (a stage-sized float tensor, which a plain ResNet shares with the next block's input)
# and runs seven element-wise passes forward; a plain post-activation block runs two (its sum and ReLU, in place).
# Instead: one compiled kernel forward that also packs the ReLU's sign mask eight elements to a byte, and one
# compiled kernel backward that unpacks it, so that the step holds what the plain block holds plus v and one bit per
# element. (A bool mask costs a byte per element, 8% more than a plain bottleneck stage holds, and inductor's CPU code
# reading a bool tensor measured 8x slower than reading the packed bytes; eager ops backward, five passes, measured
# 9x slower than the compiled kernel.) Small, bf16/half or odd-sized states, and double backward, keep the eager
# path with a bool mask.


def _velocity_next(v: torch.Tensor | None, cf: torch.Tensor, gamma: float) -> torch.Tensor:
    """v' = gamma v + c f from ``cf`` = c f; v None stands for v = 0 (then v' = c f: the same value, the sum with
    gamma 0 = +0 changing at most a zero's sign), so a first step from rest neither fills nor reads a zero v."""
    return cf if v is None else gamma * v + cf


def _momentum_float_step(
    x: torch.Tensor, v: torch.Tensor | None, g: torch.Tensor, *, c: float, gamma: float, tail: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(M1) in floating point: f = residual_tail(x, g, tail), v' = gamma v + c f, x' = x + v' -- the same operations
    in the same order as the rule written with tensor ops (so the same values, bit for bit, in float32/float64);
    v None: v = 0."""
    f = torch.relu(x + g) - x if tail == "relu" else g
    v_next = _velocity_next(v, c * f, gamma)
    return x + v_next, v_next


def _momentum_float_step_into_(x: torch.Tensor, v: torch.Tensor, g: torch.Tensor, *, c: float, gamma: float) -> None:
    """:func:`_momentum_float_step` for the ``"relu"`` tail, in place: x' into g, v' into v (without autograd)."""
    x_next, v_next = _momentum_float_step(x, v, g, c=c, gamma=gamma, tail="relu")
    g.copy_(x_next)
    v.copy_(v_next)


def _momentum_float_step_backward(
    gx_next: torch.Tensor,
    gv_next: torch.Tensor | None,
    mask: torch.Tensor | None,
    *,
    c: float,
    gamma: float,
    tail: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The vector-Jacobian product of :func:`_momentum_float_step`: with a = dL/dx' + dL/dv' (``gv_next`` None: 0),
    dL/dv = gamma a, dL/dg = c a on the mask x + g > 0 (everywhere for ``"identity"``), dL/dx = dL/dx' - c a off the
    mask (f = relu(x + g) - x; for ``"identity"`` dL/dx'). Differentiable in the cotangents (double backward; the mask
    is a constant, as the ReLU's second derivative is 0)."""
    a = gx_next if gv_next is None else gx_next + gv_next
    ca = c * a
    if tail == "relu":
        grad_g = torch.where(mask, ca, 0.0)
        grad_x = gx_next - (ca - grad_g)
    else:
        grad_g, grad_x = ca, gx_next
    return grad_x, gamma * a, grad_g


# below this many elements the float step runs eagerly (a compiled call costs more than it saves, and a compilation
# per new set of constants would dominate small runs); both paths give the same values in float32 and float64
FLOAT_STEP_COMPILE_MIN_NUMEL = 1 << 16

_MASK_BITS = 8  # mask elements per packed byte


def _bit_rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` as (8, numel / 8) in logical order, the packing's layout, through a 1-D view: reshaped directly, an N-d
    shape with a symbolic dim (a dynamic batch under torch.export) would be guarded against 8."""
    return t.reshape(-1).reshape(_MASK_BITS, -1)


def _from_bit_rows(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The inverse of :func:`_bit_rows`: ``t`` (8, numel / 8) in ``shape``, through a 1-D view."""
    return t.reshape(-1).reshape(shape)


def _pack_positive(s: torch.Tensor) -> torch.Tensor:
    """The mask s > 0 packed eight elements to a byte, in segments: with M = numel / 8 and s flattened in logical
    order, bit k of byte j is element k M + j (numel / 8 uint8). The caller guarantees numel % 8 == 0.

    Segments, not eight neighbours per byte: byte j then reads element j of eight contiguous slices, so packing and
    unpacking are element-wise loops that vectorise (eight neighbours per byte compiled to a scalar loop, which made
    the packing step twice as slow as the step without it)."""
    s = _bit_rows(s)
    packed = (s[0] > 0).to(torch.int32)
    for k in range(1, _MASK_BITS):
        packed = packed | ((s[k] > 0).to(torch.int32) << k)
    return packed.to(torch.uint8)


def _unpack_mask(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool mask of :func:`_pack_positive`, in ``shape``."""
    bits = torch.arange(_MASK_BITS, dtype=torch.int32, device=packed.device).reshape(-1, 1)
    return _from_bit_rows(((packed.reshape(1, -1).to(torch.int32) >> bits) & 1).ne(0), shape)


def _momentum_float_step_packed(
    x: torch.Tensor, v: torch.Tensor | None, g: torch.Tensor, *, c: float, gamma: float, overwrite: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_momentum_float_step` for the ``"relu"`` tail, plus relu's derivative mask x + g > 0 (0 at 0 as
    autograd's; x + g is the step's own sum, bit for bit) packed by :func:`_pack_positive`. With ``overwrite``,
    x' is written into g and v' into v (returned as such; v None: v = 0, v' a new tensor)."""
    s = x + g
    v_next = _velocity_next(v, c * (torch.relu(s) - x), gamma)
    x_next = x + v_next
    packed = _pack_positive(s)
    if overwrite:
        g.copy_(x_next)
        if v is None:
            return g, v_next, packed
        v.copy_(v_next)
        return g, v, packed
    return x_next, v_next, packed


def _momentum_float_step_backward_packed(
    gx_next: torch.Tensor, gv_next: torch.Tensor, packed: torch.Tensor, *, c: float, gamma: float, with_gv: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_momentum_float_step_backward` (``"relu"`` tail) from the packed mask, in one pass; without ``with_gv``
    (only x' was used, a stack's last step) ``gv_next`` is not read and a = dL/dx'."""
    shape = gx_next.shape
    # in the (8, numel / 8) layout of the packing: byte j's bit k is row k, column j (a loop that vectorises)
    gx_next, gv_next = _bit_rows(gx_next), _bit_rows(gv_next)
    mask = _unpack_mask(packed, gx_next.shape)
    a = gx_next + gv_next if with_gv else gx_next
    ca = c * a
    grad_g = torch.where(mask, ca, 0.0)
    grad_x, grad_v = gx_next - (ca - grad_g), gamma * a
    return _from_bit_rows(grad_x, shape), _from_bit_rows(grad_v, shape), _from_bit_rows(grad_g, shape)


def _momentum_float_step_backward_packed_into_(
    gx_next: torch.Tensor, gv_next: torch.Tensor, packed: torch.Tensor, *, c: float, gamma: float, grad_v: bool
) -> torch.Tensor:
    """:func:`_momentum_float_step_backward_packed` (``with_gv``) writing dL/dx into ``gx_next`` and, with
    ``grad_v``, dL/dv into ``gv_next``; returns dL/dg. The cotangents come as (8, numel / 8) views, the packing's
    layout, so that the writes run in the arithmetic's own loop (written through 1-D views they took a second loop
    and a temporary). For cotangents no one else holds: two fresh stage-sized gradients fewer per step (a CPU pays
    for each fresh one again in page faults)."""
    mask = _unpack_mask(packed, gx_next.shape)
    a = gx_next + gv_next
    ca = c * a
    grad_g = torch.where(mask, ca, 0.0)
    gx_next.copy_(gx_next - (ca - grad_g))
    if grad_v:
        gv_next.copy_(gamma * a)
    return grad_g


def _compiles(x: torch.Tensor) -> bool:
    """Whether the float step of state ``x`` runs as a compiled kernel: large float32/float64 states (bf16/half
    would round differently compiled: inductor keeps the intermediates in float32). Under a caller's tracing
    (torch.compile, torch.export) every float32/float64 state: the kernel is traced into the caller's graph whatever
    its size, and a branch on the size would specialise that graph to the example's shape (a dynamic batch dim)."""
    if x.dtype not in (torch.float32, torch.float64):
        return False
    return torch.compiler.is_compiling() or x.numel() >= FLOAT_STEP_COMPILE_MIN_NUMEL


def _packs(x: torch.Tensor) -> bool:
    """Whether the mask of state ``x`` packs into whole bytes (numel a multiple of 8); under tracing only where the
    shape proves it (a channel count of 8k does, whatever the batch), so no guard on a symbolic size is added."""
    return bool(statically_known_true(x.numel() % _MASK_BITS == 0))


def _float_step(
    x: torch.Tensor, v: torch.Tensor | None, g: torch.Tensor, **static: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_momentum_float_step`, compiled where :func:`_compiles`, else eager."""
    if _compiles(x):
        return _KERNELS.get("float_step", **static)(x, v, g)
    return _momentum_float_step(x, v, g, **static)


class _MomentumFloatStep(torch.autograd.Function):
    """(x, v, g) -> (x', v') of :func:`momentum_float_step` with autograd; saves only the ReLU's sign mask (packed
    to a bit per element where the step is compiled, else a bool tensor)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        v: torch.Tensor | None,
        g: torch.Tensor,
        c: float,
        gamma: float,
        tail: str,
        overwrite: bool,
        reuse_cotangents: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.set_materialize_grads(False)
        ctx.c, ctx.gamma, ctx.tail = c, gamma, tail
        ctx.dtypes = (x.dtype, x.dtype if v is None else v.dtype, g.dtype)
        ctx.shape = x.shape
        ctx.packed = tail == "relu" and _compiles(x) and _packs(x) and x.dtype == g.dtype
        # under a caller's torch.compile the backward is traced: no writes into its inputs there
        ctx.reuse = reuse_cotangents and not torch.compiler.is_compiling()
        if ctx.packed:
            overwrite = overwrite and (v is None or v.dtype == x.dtype) and not torch.compiler.is_compiling()
            # the kernel runs on the dims in x's memory order (contiguous views for a dense x of any memory format:
            # the element-wise kernels then run on 1-D views), and the mask is packed in that order: backward reads
            # it with the same permutation
            ctx.order = None if x.is_contiguous() else memory_order(x)  # None: already in memory order
            kernel = _KERNELS.get("float_step_packed", c=c, gamma=gamma, overwrite=overwrite)
            x_next, v_next, packed = kernel(*(None if t is None else in_memory_order(t, ctx.order) for t in (x, v, g)))
            ctx.save_for_backward(packed)
            if overwrite:  # x' (and v') are in g's (and v's) storage: return those tensors themselves, marked dirty
                if v is None:
                    ctx.mark_dirty(g)
                    return g, _own(from_memory_order(v_next, ctx.order))
                ctx.mark_dirty(v, g)
                return g, v
            return _own(from_memory_order(x_next, ctx.order)), _own(from_memory_order(v_next, ctx.order))
        # relu's derivative, 0 at 0 as autograd's (x + g is the kernel's sum, bit for bit)
        ctx.save_for_backward(torch.gt(x + g, 0) if tail == "relu" else None)
        return tuple(_own(t) for t in _float_step(x, v, g, c=c, gamma=gamma, tail=tail))

    @staticmethod
    def backward(ctx: Any, gx_next: torch.Tensor | None, gv_next: torch.Tensor | None) -> tuple[Any, ...]:
        (mask,) = ctx.saved_tensors
        none = (None,) * 5  # c, gamma, tail, overwrite, reuse_cotangents
        if gx_next is None and gv_next is None:
            return (None, None, None, *none)
        if gx_next is None:  # only v' was used: a = dL/dv'
            gx_next = torch.zeros_like(gv_next)
        with_gv = gv_next is not None
        grad_v = ctx.needs_input_grad[1]
        if ctx.packed and not torch.is_grad_enabled() and gx_next.dtype == ctx.dtypes[0]:
            # contiguous in the forward's memory order, the order the mask is packed in (the kernel's 1-D views
            # would otherwise follow the cotangents' own layout and pair them with the wrong bits)
            gx_in = in_memory_order(gx_next, ctx.order).contiguous()
            gv_in = in_memory_order(gv_next.to(gx_next.dtype), ctx.order).contiguous() if with_gv else gx_in
            if ctx.reuse and with_gv and _writable_pair(gx_in, gv_in, gx_next, gv_next):
                # no one else holds the cotangents of a step inside a stack (the engine summed x's into a tensor of
                # its own): dL/dx and dL/dv are written into them
                kernel = _KERNELS.get("float_step_backward_packed_into", c=ctx.c, gamma=ctx.gamma, grad_v=grad_v)
                grad_g = kernel(gx_in.view(_MASK_BITS, -1), gv_in.view(_MASK_BITS, -1), mask)
                grad_g = from_memory_order(grad_g.view(gx_in.shape), ctx.order)
                grads = [gx_next, gv_next if grad_v else None, grad_g]
            else:
                kernel = _KERNELS.get("float_step_backward_packed", c=ctx.c, gamma=ctx.gamma, with_gv=with_gv)
                grads = [from_memory_order(gr, ctx.order) for gr in kernel(gx_in, gv_in, mask)]
        else:  # double backward (create_graph: differentiable eager ops) or the eager path
            if ctx.packed:  # packed in the order of the forward's dims
                shape = ctx.shape if ctx.order is None else torch.Size(ctx.shape[d] for d in ctx.order)
                mask = from_memory_order(_unpack_mask(mask, shape), ctx.order)
            grads = _momentum_float_step_backward(gx_next, gv_next, mask, c=ctx.c, gamma=ctx.gamma, tail=ctx.tail)
        grads = [gr.to(dt) if ctx.needs_input_grad[i] else None for i, (gr, dt) in enumerate(zip(grads, ctx.dtypes))]
        return (*grads, *none)


def _own(t: torch.Tensor) -> torch.Tensor:
    """A kernel's output as a tensor of its own, not a view of the compiled kernel's 1-D result: the next step may
    then write into it (autograd does not let a Function with two outputs modify a view in place)."""
    if torch.compiler.is_compiling():  # traced: no in-place writes follow (and _is_view is not traceable)
        return t
    return t.detach() if t._is_view() else t


def _writable_pair(gx: torch.Tensor, gv: torch.Tensor, gx_given: torch.Tensor, gv_given: torch.Tensor) -> bool:
    """Whether the backward kernel's inputs ``gx`` and ``gv`` (contiguous, in the forward's memory order) are the
    given cotangents themselves, not layout or dtype copies, and distinct: writing into them then writes into the
    given tensors."""
    return (
        gx.data_ptr() == gx_given.data_ptr() and gv.data_ptr() == gv_given.data_ptr() and gx.data_ptr() != gv.data_ptr()
    )


def momentum_float_step(
    x: torch.Tensor,
    v: torch.Tensor | None,
    g: torch.Tensor,
    tail: str,
    *,
    c: float,
    gamma: float,
    overwrite: bool = False,
    reuse_cotangents: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One momentum step (M1) in floating point, fused: v' = gamma v + c f, x' = x + v', f = residual_tail(x, g, tail).

    The values are those of the rule written with tensor ops (bit for bit in float32 and float64); with autograd the
    step keeps no tensor but the mask x + g > 0 for the ``"relu"`` tail (one bit per element for a large float32 or
    float64 state, else one byte).

    Args:
        x, v: the state x_n, v_n; v None: v_n = 0 (a first step from rest: no zero tensor filled or read).
        g: the residual function's last tensor at x_n (f = residual_tail(x, g, tail)).
        tail: one of :data:`RESIDUAL_TAILS`.
        c: the factor of f, (1 - gamma) h.
        gamma: the momentum term.
        overwrite: the caller needs neither v nor g after the step, and no autograd node saved them (a ResNet
            block's g is its last BatchNorm's output): the step may then write x' into g and v' into v, as a plain
            block adds its shortcut into that output in place (fresh stage-sized outputs cost a CPU as much again
            in page faults). Done where the step is compiled (with autograd, marked dirty); elsewhere ignored.
        reuse_cotangents: x' and v' are used only by the caller's next step and its residual block (a step inside
            a stack, not its last), so the cotangents of x' and v' reach this step's backward held by no one else:
            the backward may then write dL/dx and dL/dv into them instead of into fresh tensors. Done where the
            step is compiled, outside double backward and a caller's torch.compile; elsewhere ignored.
    """
    if torch.is_grad_enabled() and (x.requires_grad or (v is not None and v.requires_grad) or g.requires_grad):
        return _MomentumFloatStep.apply(x, v, g, c, gamma, tail, overwrite, reuse_cotangents)
    if (
        overwrite
        and v is not None
        and tail == "relu"
        and _compiles(x)
        and x.dtype == v.dtype == g.dtype
        and not torch.compiler.is_compiling()
    ):  # evaluation: the same in-place step as with autograd, without the mask
        _KERNELS.get("float_step_into", c=c, gamma=gamma)(x, v, g)
        return g, v
    return _float_step(x, v, g, c=c, gamma=gamma, tail=tail)


_KERNELS = CompiledKernels(
    {
        "step": _momentum_step_,
        "unstep": _momentum_unstep_,
        "accumulate": _accumulate_,
        "rewind": _rewind_,
        "refresh": _refresh_float_,
        "float_step": _momentum_float_step,
        "float_step_into": _momentum_float_step_into_,
        "float_step_packed": _momentum_float_step_packed,
        "float_step_backward_packed": _momentum_float_step_backward_packed,
        "float_step_backward_packed_into": _momentum_float_step_backward_packed_into_,
    },
    env="ZOO_FUSED_FIXED_POINT",
    what="the fused fixed-point kernels",
    fullgraph=True,
    elementwise=True,
    shaped=("float_step_backward_packed_into",),
)


def set_fused(enabled: bool) -> None:
    """Run the fixed-point momentum steps as compiled kernels (``enabled`` True, the default) or as eager
    PyTorch ops (False)."""
    _KERNELS.set_enabled(enabled)


def fused_enabled() -> bool:
    """Whether the fixed-point momentum steps run as compiled kernels (see :func:`set_fused`)."""
    return _KERNELS.enabled


def momentum_kernel(name: str, **static: Any) -> Callable[..., Any]:
    """The step, unstep, accumulate, refresh or rewind function with its keyword-only constants bound (``c``, ``tail``,
    ``n``, ``d``, ``scale``, ``gamma`` ...): compiled once per set of constants when fusion is on (eager under
    a caller's torch.compile, which traces it itself), else eager.
    ``name``: the kernel's name in the kernel set."""
    return _KERNELS.get(name, **static)
