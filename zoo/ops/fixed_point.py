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

_INT64_MAX = 2**63 - 1


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
        n, d = self.n, self.d
        i = i * d + torch.remainder(c, d)
        c = torch.div(c, d, rounding_mode="floor") * n + torch.remainder(i, n)
        return c, torch.div(i, n, rounding_mode="floor")

    def divide(self, c: torch.Tensor, i: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The exact inverse of :meth:`multiply`."""
        n, d = self.n, self.d
        i = i * n + torch.remainder(c, n)
        c = torch.div(c, n, rounding_mode="floor") * d + torch.remainder(i, d)
        return c, torch.div(i, d, rounding_mode="floor")


class FixedPoint:
    """Conversions between floating tensors and int64 fixed point with ``frac_bits`` fractional bits.

    Representable values satisfy |x| < 2^(61 - frac_bits) (two bits of headroom, so that the sum
    x + v of two representable values cannot wrap); :meth:`out_of_range` flags the others.
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
        work = torch.float64 if dtype == torch.float64 else torch.float32
        return (t.to(work) / self.scale).to(dtype)

    def fixed_out_of_range(self, t: torch.Tensor) -> torch.Tensor:
        """:meth:`out_of_range` for the int64 fixed-point values themselves (|t| >= 2^61)."""
        lo, hi = torch.aminmax(t)  # one pass over the tensor
        return (hi >= 2**61) | (lo <= -(2**61))

    def out_of_range(self, t: torch.Tensor) -> torch.Tensor:
        """A 0-dim bool tensor: some value is non-finite or too large to represent (no host sync)."""
        lo, hi = torch.aminmax(t)  # one pass; NaN propagates into both
        return (hi >= self.limit) | (lo <= -self.limit) | torch.isnan(hi)
