"""Exact fixed-point arithmetic for reversible momentum steps (MATH.md section 4).

Division by gamma loses bits in floating point, so the reversible momentum engine holds x and v as
integers x_int = round(x * 2^F) (``F = frac_bits``) and multiplies by gamma = n/d exactly, keeping
the remainder bits in an integer *information buffer* i (Maclaurin, Duvenaud and Adams, 2015):

    multiply:  i = i*d + (c mod d);  c = (c div d)*n + (i mod n);  i = i div n
    divide:    i = i*n + (c mod n);  c = (c div n)*d + (i mod d);  i = i div d      (the exact reverse)

with floor division and floor modulus (also for negative c). The buffer grows by log2(d/n) bits per
multiply; :attr:`GammaRatio.steps_per_word` is how many multiplies a 64-bit word takes from zero
without overflow, after which the caller starts a new word (the bound is exact, so no host sync is
needed to detect a full buffer).
"""

from __future__ import annotations

import math
from fractions import Fraction

import torch

from zoo.errors import ZooError
from zoo.ops.compiled import CompiledKernels

_INT64_MAX = 2**63 - 1


def exact_multiply(c: torch.Tensor, i: torch.Tensor, n: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(c, i) -> (c n/d rounded down, the buffer with the lost bits): the multiply of the module docstring.

    With n and d swapped it is the exact divide. Two integer divisions: each remainder is taken as
    a - q b from its quotient, the scaled adds use ``alpha`` (one pass each); floor division of the
    signed c is the costly pass on CPUs, and the buffer i is never negative, so it truncates.
    """
    q = torch.div(c, d, rounding_mode="floor")
    i = torch.add(torch.sub(c, q, alpha=d), i, alpha=d)  # i d + (c mod d)
    j = torch.div(i, n, rounding_mode="trunc")  # i >= 0: truncation is floor
    return torch.add(torch.sub(i, j, alpha=n), q, alpha=n), j  # (c div d) n + (i mod n), i div n


class GammaRatio:
    """gamma = n/d as an exact ratio, with the buffer-word capacity of its exact multiply.

    Args:
        gamma: the momentum term, 0 < gamma < 1.
        max_denominator: gamma is rounded to the closest n/d with d <= this (0.9 -> 9/10).
    """

    def __init__(self, gamma: float, max_denominator: int = 1000):
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

    def buffer_dtype(self, steps: int) -> torch.dtype:
        """The narrowest integer dtype that holds a buffer word after ``steps`` multiplies (for storage)."""
        bound = self.buffer_bound(min(steps, self.steps_per_word))
        for dtype in (torch.int8, torch.int16, torch.int32):
            if bound <= torch.iinfo(dtype).max:
                return dtype
        return torch.int64


class FixedPoint:
    """Conversions between floating tensors and int64 fixed point with ``frac_bits`` fractional bits.

    Representable values satisfy |x| < 2^(61 - frac_bits) (two bits of headroom, so that the sum
    x + v of two representable values cannot wrap); :meth:`out_of_range` flags the others, and
    :meth:`momentum_state_out_of_range` bounds every state of a momentum stack.
    """

    def __init__(self, frac_bits: int = 32):
        if not isinstance(frac_bits, int) or not 8 <= frac_bits <= 52:
            raise ZooError(f"the fixed-point fractional bits (fixed_point_bits) must be an integer in [8, 52], "
                           f"got {frac_bits!r}")
        self.frac_bits = frac_bits
        self.scale = float(2**frac_bits)
        self.limit = float(2 ** (61 - frac_bits))

    @staticmethod
    def work_dtype(t: torch.Tensor) -> torch.dtype:
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
        """
        v_bound = torch.maximum(v0_max, g_max / (1.0 - gamma))
        bound = x0_max + steps * v_bound
        return ~(bound < self.limit / 2)

    def out_of_range(self, t: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: some value is non-finite or too large to represent (no host sync)."""
        lo, hi = torch.aminmax(t)  # one pass; NaN propagates into both
        return (hi >= self.limit) | (lo <= -self.limit) | torch.isnan(hi)


# --------------------------------------------------------------------------------------------------
# Fused momentum steps. Each is a handful of integer passes over the state; on a CPU every pass is
# memory-bound (and integer division is slow), so by default they run as one compiled kernel each
# (torch.compile), which computes the same integers bit for bit (the operations are exact integer
# operations and IEEE roundings, identical in any order). ``set_fused(False)`` or the environment
# variable ZOO_FUSED_FIXED_POINT=0 keeps them eager; a failed compilation falls back to eager once,
# with a warning.


def _momentum_step(xi, vi, buffer, g, n: int, d: int, scale: float, out_dtype: torch.dtype):
    """(M1) in fixed point: v <- gamma v + round(2^F g) (buffer keeps the lost bits), x <- x + v.

    Returns (x, v, buffer, x / 2^F in ``out_dtype``), the last being the next residual function's input.
    """
    vi, buffer = exact_multiply(vi, buffer, n, d)
    vi = vi + torch.round(g * scale).to(torch.int64)
    xi = xi + vi
    return xi, vi, buffer, _to_float(xi, scale, out_dtype)


def _momentum_unstep(xi, vi, buffer, g, n: int, d: int, scale: float, out_dtype: torch.dtype):
    """The inverse (M2) of step k, given x_k = ``xi``, v_{k+1} = ``vi`` and g = the step's residual at x_k.

    Returns (x_{k-1} = x_k - v_k, v_k, buffer, x_{k-1} / 2^F): the state and input of step k - 1.
    """
    vi, buffer = exact_multiply(vi - torch.round(g * scale).to(torch.int64), buffer, d, n)
    xi = xi - vi
    return xi, vi, buffer, _to_float(xi, scale, out_dtype)


def _rewind(xi, vi, scale: float, out_dtype: torch.dtype):
    """x_k = x_{k+1} - v_{k+1} and its float value."""
    xi = xi - vi
    return xi, _to_float(xi, scale, out_dtype)


def _to_float(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    work = torch.float64 if dtype == torch.float64 else torch.float32
    return (t.to(work) * (1.0 / scale)).to(dtype)  # 1/2^F is exact: the same as dividing


_KERNELS = CompiledKernels({"step": _momentum_step, "unstep": _momentum_unstep, "rewind": _rewind},
                           env="ZOO_FUSED_FIXED_POINT", what="the fused fixed-point kernels", fullgraph=True)


def set_fused(enabled: bool) -> None:
    """Run the fixed-point momentum steps as compiled kernels (default) or as eager PyTorch ops."""
    _KERNELS.set_enabled(enabled)


def fused_enabled() -> bool:
    return _KERNELS.enabled


def momentum_kernel(name: str):
    """The step, unstep or rewind function: compiled when fusion is on (eager under a caller's
    torch.compile, which traces it itself), else eager."""
    return _KERNELS[name]
