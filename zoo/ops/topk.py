"""Hard and relaxed (sparse, differentiable) top-k operators.

Hard operators along one dimension of x (n entries): ``topk_mask(x)_i = 1`` if x_i is among the k largest, else 0;
``topk_magnitude(x) = x * topk_mask(|x|)``.

Relaxed operators (w = (1, .., 1, 0, .., 0) with k ones, R(y) = (lam / p) ||y||_p^p, phi(u) = u for the mask and
phi(u) = u^2 / 2 for the magnitude, f_phi(u, w) = sum_i w_i phi(u)_[i] sorted descending):

    u* = argmin_u R*(x - u) + f_phi(u, w),      y* = grad R*(x - u*)                                   (T1)

``soft_topk_mask`` is y* for phi(u) = u: the maximiser of <x, y> - R(y) over the capped simplex
{0 <= y <= 1, sum y = k}, so it sums to k, lies in [0, 1] and is exactly 0 / 1 away from the k-th / (k+1)-th
entries. ``soft_topk_magnitude`` is y* for phi(u) = u^2 / 2: it carries sign(x) and is exactly 0 outside a set
of about k entries. p = 2 gives a continuous, piecewise linear operator; p = 4/3 a continuously differentiable one
(R*(z) = sum z^4 / (4 lam^3)); both are sparse, and lam -> 0 gives back the hard operator.

Both reduce to an isotonic problem in sorted space (s = x, or |x|, sorted descending):

    v* = argmin_{v_1 >= .. >= v_n} sum_i h_i(v_i),   h_i(v) = r*(s_i - v) + w_i phi(v)                  (T2)

then u* = v* un-sorted (times sign(x) for the magnitude) and y* = grad R*(x - u*).

Exact solver ``"pav"`` (pool adjacent violators, fully vectorised, no loop over rows or blocks). Let y_i be the
minimiser of h_i alone (mask p=2: s_i - lam w_i; magnitude p=2: s_i / (1 + lam w_i); mask p=4/3:
s_i - lam w_i^(1/3); magnitude p=4/3: the root of (g - s_i)^3 / lam^3 + g w_i = 0). s is sorted and w is one
step, so y is non-increasing on L = {1..k} and on R = {k+1..n}: the only adjacent violation PAV can ever meet
is between k and k+1. Pooling it gives a block whose value lies between y_k and y_{k+1}; every further merge
takes in the next entry of L on the left (whose y is then below the block value) or of R on the right (above
it), and never creates a violation elsewhere, so PAV ends with ONE pooled block around the boundary (or none)
and singletons everywhere else. Its value gamma is the root of the non-decreasing function

    G(g) = sum_{i in L} max(h_i'(g), 0) + sum_{i in R} min(h_i'(g), 0),

and v*_i = max(y_i, gamma) on L, min(y_i, gamma) on R. G is piecewise polynomial (p=2: linear; p=4/3: cubic) with
breakpoints at the y_i: we sort y (two sorted runs, a cheap sort), evaluate G at every breakpoint with prefix sums
over L and suffix sums over R (the active entries only, so no cancellation), count the breakpoints with G <= 0 to
find the piece that holds the root, and solve that piece in closed form (p=2: a ratio; p=4/3: a monotone
depressed cubic t^3 + P t + Q, P >= 0, by the hyperbolic-sine formula, then one Newton step on the exact G).
O(n log n) per row on the device, no host sync. For the mask only gamma needs the sorted space:
y* = clip((x - gamma) / lam, 0, 1) for p = 2 and clip((x - gamma) / lam, 0, 1)^3 for p = 4/3, in x's own order.

On the CPU, float32 rows are sorted with numpy (its SIMD sort is 4-8x faster than ``torch.sort`` there; the
second sort, of two sorted runs, is a run-merging stable sort) and the per-row work runs on chunks of about 2^16
entries that stay in cache; on an accelerator everything is torch ops on all rows at once.

Backward (both solvers): a custom autograd function with the closed-form Jacobian (implicit function theorem),
never by unrolling the solver. With alpha_i = -d_s h_i'(v_i), beta_i = d_g h_i'(v_i)
(p=2 mask: 1/lam, 1/lam; p=2 magnitude: 1/lam, 1/lam + w_i; p=4/3: alpha_i = 3 (v_i - s_i)^2 / lam^3,
beta_i = alpha_i (+ w_i for the magnitude)), the transposed Jacobian of v(s) maps g to alpha_j g_j / beta_j on a
singleton and to alpha_j sum_B g_i / sum_B beta_i on the block B; then

    grad_x = P^T [hs - (dv/ds)^T hs],   hs = grad^2 R*(s - v) * (P grad_out)

(P the sorting permutation, with sign(x) on both sides for the magnitude).

Dykstra (``solver="dykstra"``, p = 2): (T2) is the (weighted, 1 + lam w_i for the magnitude) projection of y onto
the non-increasing cone C1 ∩ C2, C1 = {v1 >= v2, v3 >= v4, ..}, C2 = {v2 >= v3, ..}; each projection pools the
violating pairs (weighted means); ``dykstra_iters`` rounds of Dykstra's alternating projections with correction terms
(published: 100 to match PAV, 10 inside an MoE router). Vectorised over rows; the only loop is over iterations.
Its backward is the Jacobian of the exact solution at the block Dykstra found (L entries raised above y, R
entries lowered below it).

Non-finite entries. An infinite entry is the limit of a finite one: the operators at x_i = +-inf are the limits
of the operators at x_i = +-M as M -> inf (the infinite entries of a row going to infinity together, so those of
one sign tie). Mask (p = 2 and 4/3, both solvers): with n+ entries at +inf, n- at -inf and n_f finite ones, the
+inf entries get 1 each when k >= n+ (k / n+ each otherwise), the finite entries get the operator on the finite
entries alone with k - n+ (all 1 when k >= n+ + n_f, all 0 when k <= n+), and the -inf entries get 0, or share
what is left, (k - n+ - n_f) / n- each: the mask stays in the capped simplex (sums to k), and lam -> 0 gives the
hard mask up to the order among tied infinite entries, which topk_mask picks arbitrarily. Magnitude: |+-inf| is
the largest magnitude; the output there is +-inf (it grows like M, also when more than k entries are infinite),
and the finite entries get the operator on the finite entries alone with k less the infinite ones (0 when those
are k or more). The gradient at an infinite entry is 0 (it cannot move), elsewhere that of the finite problem.
They are computed by replacing the infinite entries with finite surrogates far enough out that no pooled block
mixes them with finite entries (:func:`_nonfinite_rows`), then writing the exact values at the infinite entries.
A NaN has no place in the order and every output of a row depends on the whole row: a row holding a NaN gives NaN
everywhere (value and gradient); other rows are unaffected. (The hard operators follow ``torch.topk``, which ranks
NaN above every number, and give 1 / NaN there.) On the CPU the extra work runs only when a non-finite entry is
present (one host-side check); on an accelerator it always runs (a few element-wise passes, no host sync).

``k`` is an int, or an integer tensor giving k per row (shape x.shape without ``dim``, or broadcastable to it).
An int k costs no host sync. A tensor k's values must be checked: on the CPU it is checked at once (ZooError);
on an accelerator the check is ``torch._assert_async`` (no sync: a bad k fails at the next synchronisation with a
device-side assertion). bf16 / fp16 inputs are computed in float32 and returned in their dtype (also under
autocast).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch.autograd.function import once_differentiable

from zoo._deprecation import renamed_arguments
from zoo.errors import ZooError
from zoo.validation import host_read_is_free

__all__ = ["topk_mask", "topk_magnitude", "soft_topk_mask", "soft_topk_magnitude", "SOLVERS", "check_relaxed"]

SOLVERS = ("pav", "dykstra")
_P43 = 4.0 / 3.0

# ------------------------------------------------------------------------------------------------ argument checks


def _check_dim(name: str, x: torch.Tensor, dim: int) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        what = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ZooError(f"{name}: x must be a floating-point tensor, got {what}")
    if x.dim() == 0:
        raise ZooError(f"{name}: x must have at least one dimension (the operator acts along dim), got a scalar")
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ZooError(
            f"{name}: dim must be an int in [{-x.dim()}, {x.dim() - 1}] for x of shape {tuple(x.shape)}, got {dim!r}"
        )
    return dim % x.dim()


def _check_k(name: str, k: int | torch.Tensor, n: int, batch: torch.Size, device: torch.device) -> int | torch.Tensor:
    """An int k checked against n, or a tensor k as a (rows, 1) int64 tensor on x's device (values checked)."""
    if isinstance(k, torch.Tensor):
        if k.dtype == torch.bool or k.is_floating_point() or k.is_complex():
            raise ZooError(f"{name}: a tensor k must have an integer dtype (k per row), got {k.dtype}")
        try:
            ok = torch.broadcast_shapes(k.shape, batch) == batch
        except RuntimeError:
            ok = False
        if not ok:
            raise ZooError(
                f"{name}: tensor k of shape {tuple(k.shape)} does not broadcast to x's shape without dim "
                f"{tuple(batch)} (one k per row)"
            )
        msg = f"{name}: every k must be in [1, n] with n = {n} (the size of x along dim)"
        if k.device.type == "cpu":
            if k.numel() and (bool((k < 1).any()) or bool((k > n).any())):
                raise ZooError(f"{msg}, got values in [{int(k.min())}, {int(k.max())}]")
        else:  # no host sync: fails at the next synchronisation
            torch._assert_async(((k >= 1) & (k <= n)).all(), msg)
        return k.to(device=device, dtype=torch.long).expand(batch).reshape(-1, 1)
    if isinstance(k, bool) or not isinstance(k, numbers.Integral):
        raise ZooError(f"{name}: k must be an int or an integer tensor (k per row), got {type(k).__name__}")
    if not 1 <= int(k) <= n:
        raise ZooError(f"{name}: k must be in [1, n] with n = {n} (the size of x along dim), got {int(k)}")
    return int(k)


@renamed_arguments(n_iter="dykstra_iters")
def check_relaxed(
    name: str, p: float, lam: float, solver: str, dykstra_iters: int, *, n_iter: int | None = None
) -> bool:
    """The relaxed top-k's options checked in one place (the ops, :mod:`zoo.nn.topk` and the MoE router): ``p``
    2 or 4/3, ``lam`` > 0, ``solver`` in :data:`SOLVERS` (Dykstra for p = 2 only), ``dykstra_iters`` >= 1
    (Dykstra iterations; ``n_iter`` is its deprecated name); one ZooError prefixed by ``name`` otherwise.
    Returns True for p = 4/3."""
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise ZooError(f"{name}: p must be 2 or 4/3 (the values implemented), got {p!r}")
    if p == 2:
        p43 = False
    elif abs(float(p) - _P43) < 1e-6:
        p43 = True
    else:
        raise ZooError(
            f"{name}: p = {p} is not implemented: supported values are p = 2 and p = 4/3 "
            "(1 < p <= 2 is the theory's range, only these two have solvers here)"
        )
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not (math.isfinite(lam) and lam > 0):
        raise ZooError(f"{name}: lam must be a finite float > 0 (the regularisation strength), got {lam!r}")
    if solver not in SOLVERS:
        raise ZooError(f"{name}: unknown solver {solver!r}; use one of {SOLVERS}")
    if solver == "dykstra" and p43:
        raise ZooError(f"{name}: solver='dykstra' supports p = 2 only, got p = {p}; use solver='pav' for p = 4/3")
    if isinstance(dykstra_iters, bool) or not isinstance(dykstra_iters, int) or dykstra_iters < 1:
        raise ZooError(f"{name}: dykstra_iters must be an int >= 1 (Dykstra iterations), got {dykstra_iters!r}")
    return p43


def _rows(
    name: str, x: torch.Tensor, k: int | torch.Tensor, dim: int
) -> tuple[torch.Tensor, int | torch.Tensor, torch.Size, int]:
    """x as (rows, n) with the operator along the last dim, k checked, and how to put the result back."""
    d = _check_dim(name, x, dim)
    xm = x.movedim(d, -1)
    n = xm.shape[-1]
    kk = _check_k(name, k, n, xm.shape[:-1], x.device)
    return xm.reshape(-1, n), kk, xm.shape, d


def _unrows(out: torch.Tensor, shape: torch.Size, d: int) -> torch.Tensor:
    return out.reshape(shape).movedim(-1, d)


def _left(k: int | torch.Tensor, n: int, device: torch.device) -> torch.Tensor:
    """L = {1..k} in sorted order as a bool (1 or rows, n) tensor."""
    return torch.arange(n, device=device) < k


# ------------------------------------------------------------------------------------------------ hard operators


def _hard_rows(flat: torch.Tensor, kk: int | torch.Tensor) -> torch.Tensor:
    """The 0/1 mask of the k largest entries of each row of a (rows, n) tensor."""
    if isinstance(kk, int):
        idx = flat.topk(kk, -1, sorted=False).indices
        return torch.zeros_like(flat).scatter_(-1, idx, 1.0)
    perm = flat.argsort(-1, descending=True)
    return torch.empty_like(flat).scatter_(-1, perm, _left(kk, flat.shape[-1], flat.device).to(flat.dtype))


def topk_mask(x: torch.Tensor, k: int | torch.Tensor, dim: int = -1) -> torch.Tensor:
    """topkmask(x)_i = 1 if x_i is among the k largest entries along ``dim``, else 0 (x's dtype, no gradient).

    Ties are broken arbitrarily (exactly k ones per row); NaN ranks above every number (``torch.topk``'s order).

    Args:
        x: any shape, floating point; the operator acts along ``dim``, every other dim is a batch.
        k: int in [1, n], or an integer tensor with one k per row (shape x.shape without ``dim``, or broadcastable).
        dim: the dimension the k largest entries are taken along.
    """
    flat, kk, shape, d = _rows("topk_mask", x, k, dim)
    return _unrows(_hard_rows(flat.detach(), kk), shape, d)


def topk_magnitude(x: torch.Tensor, k: int | torch.Tensor, dim: int = -1) -> torch.Tensor:
    """topkmag(x) = x * topkmask(|x|): keeps the k entries of largest magnitude (gradient: the mask).

    Written with ``torch.where``, not a product, so that an infinite entry left out is 0, not inf * 0 = NaN.

    Args:
        x: any shape, floating point; the operator acts along ``dim``, every other dim is a batch.
        k: int in [1, n], or an integer tensor with one k per row (shape x.shape without ``dim``, or broadcastable).
        dim: the dimension the k largest magnitudes are taken along.
    """
    flat, kk, shape, d = _rows("topk_magnitude", x, k, dim)
    keep = _unrows(_hard_rows(flat.detach().abs(), kk), shape, d) > 0
    return torch.where(keep, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ------------------------------------------------------------------------------------------------ sorting


def _numpy_path(v: torch.Tensor) -> bool:
    return host_read_is_free(v) and v.dtype == torch.float32 and v.numel() > 0


def _np_keys(a: np.ndarray, descending: bool = False) -> np.ndarray:
    """int64 keys that order the float32 rows of ``a`` (ties by position): ordered value bits << 32 | position."""
    b = a.view(np.int32)
    o = b ^ ((b >> 31) & 0x7FFFFFFF)  # float order as signed int order
    if descending:
        o = ~o
    return (o.astype(np.int64) << 32) | np.arange(a.shape[-1], dtype=np.int64)


# torch.sort is slow on the CPU (4-8x numpy's SIMD sort at n = 1024): float32 rows on the CPU are sorted with
# numpy (values alone, or packed (value, position) int64 keys when the permutation is needed); elsewhere torch.sort.


def _sorted_desc(v: torch.Tensor) -> torch.Tensor:
    """Each row's values sorted descending."""
    if _numpy_path(v):
        return torch.from_numpy(np.sort(-v.detach().contiguous().numpy(), axis=-1)).neg_()
    return torch.sort(v, dim=-1, descending=True).values


def _argsort_desc(v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(values, permutation) of each row sorted descending."""
    if _numpy_path(v):
        key = _np_keys(v.detach().contiguous().numpy(), descending=True)
        key.sort(axis=-1)
        idx = torch.from_numpy(key & 0xFFFFFFFF)
        return v.gather(-1, idx), idx
    return torch.sort(v, dim=-1, descending=True, stable=True)


def _breakpoint_order(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ys, order): each row of y sorted ascending, order[j] = the (sorted-space) position of breakpoint j.

    y is two non-increasing runs (L, then R): on the CPU numpy's stable (run-merging) sort does it in O(n).
    """
    if _numpy_path(y):
        n = y.shape[-1]
        key = _np_keys(y.detach().flip(-1).contiguous().numpy())  # two non-decreasing runs
        key.sort(axis=-1, kind="stable")
        order = torch.from_numpy((n - 1) - (key & 0xFFFFFFFF))
        return y.gather(-1, order), order
    return torch.sort(y, dim=-1)


# ------------------------------------------------------------------------------------------------ exact solver (PAV)


def _cubic_root(P: torch.Tensor | float, Q: torch.Tensor) -> torch.Tensor:
    """The real root of z^3 + P z + Q = 0 for P >= 0 (a strictly monotone cubic), elementwise.

    z = -2 sqrt(P/3) sinh(asinh(3 Q / (2 P) sqrt(3 / P)) / 3), or -cbrt(Q) where P is too small for that formula,
    then one Newton step.
    """
    P = torch.as_tensor(P, dtype=Q.dtype, device=Q.device)
    tiny = torch.finfo(Q.dtype).tiny
    Pc = P.clamp_min(tiny)
    r = 1.5 * Q / Pc * torch.sqrt(3.0 / Pc)
    z = -2.0 * torch.sqrt(Pc / 3.0) * torch.sinh(torch.asinh(r) / 3.0)
    z = torch.where(torch.isfinite(z) & (P > tiny), z, -Q.sign() * Q.abs().pow(1.0 / 3.0))
    d = 3.0 * z * z + P
    return z - torch.where(d > 0, (z * z * z + P * z + Q) / d.clamp_min(tiny), 0.0)


def _singletons(
    s: torch.Tensor, L: torch.Tensor, lam: float, p43: bool, mag: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """y (the minimiser of each h_i alone) and (s - y) / lam on L for the magnitude (None for the mask: 1)."""
    if not mag:
        return s - lam * L.to(s.dtype), None
    if not p43:
        return torch.where(L, s / (1.0 + lam), s), s / (1.0 + lam)
    t = _cubic_root(lam, s)  # t = (y - s) / lam solves t^3 + lam t + s = 0, i.e. (y - s)^3 / lam^3 + y = 0
    return torch.where(L, s + lam * t, s), -t


def _suffix(v: torch.Tensor) -> torch.Tensor:
    """Inclusive suffix sums along the last dim."""
    return v.flip(-1).cumsum(-1).flip(-1)


def _pav_gamma(
    s: torch.Tensor, y: torch.Tensor, kk: int | torch.Tensor, lam: float, p43: bool, mag: bool
) -> torch.Tensor:
    """gamma (rows, 1), the value of PAV's pooled block: the root of G (module docstring), in closed form.

    Breakpoints ys = y sorted ascending. At breakpoint j the active entries are the L entries among sorted[0:j]
    and the R entries among sorted[j:n] (entry j itself adds 0), so prefix sums over L and suffix sums over R
    give G at every breakpoint; they run over active entries only (no cancellation against inactive ones). The
    root lies on piece c = #{j: G(ys_j) <= 0} (between breakpoints c - 1 and c), whose active set is L among
    sorted[0:c) and R among sorted[c:n). Without violation (y_k >= y_{k+1}) G = 0 on all of [y_{k+1}, y_k]
    and gamma is its midpoint (then v = y, and the k-th / (k+1)-th outputs are exact, not rounded, 1 / 0); this is
    decided first, because there G has triple roots at the ends (p = 4/3) that rounding would shift.
    """
    n = s.shape[-1]
    tiny = torch.finfo(s.dtype).tiny
    if isinstance(kk, int):
        yk = y[:, kk - 1 : kk]
        yk1 = y[:, kk : kk + 1] if kk < n else yk - 2.0 * lam
    else:
        yk = y.gather(-1, kk - 1)
        yk1 = torch.where(kk < n, y.gather(-1, kk.clamp_max(n - 1)), yk - 2.0 * lam)
    no_violation = yk >= yk1
    gamma_nv = 0.5 * (yk + yk1)
    ys, order = _breakpoint_order(y)
    Lb = order < kk  # L = the first k positions of the sorted space
    Lf = Lb.to(s.dtype)
    cl = Lf.cumsum(-1)  # L entries among sorted[0:j + 1]
    cr = (n - kk - torch.arange(n, device=s.device, dtype=s.dtype)) + (cl - Lf)  # R entries among sorted[j:n]

    def root_piece(
        G: torch.Tensor,
    ) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    ]:
        c = (G <= 0).sum(-1, keepdim=True)
        lo, hi, has_lo, has_hi = (c - 1).clamp_min(0), c.clamp_max(n - 1), c > 0, c < n
        clc = torch.where(has_lo, cl.gather(-1, lo), 0.0)  # L entries among sorted[0:c)
        crc = (n - kk - c) + clc  # R entries among sorted[c:n)

        def piece(pre: torch.Tensor, suf: torch.Tensor) -> torch.Tensor:
            return torch.where(has_lo, pre.gather(-1, lo), 0.0) + torch.where(has_hi, suf.gather(-1, hi), 0.0)

        return c, lo, clc, crc, piece

    if not p43:  # G * lam = sum_active a_i (g - y_i), a_i = 1 (+ lam on L for the magnitude)
        aL = 1.0 + lam if mag else 1.0
        Ly = torch.where(Lb, ys, 0.0)
        SL, SR = Ly.cumsum(-1), _suffix(ys - Ly)
        G = (cl * aL + cr) * ys - (SL * aL + SR)
        _, lo, clc, crc, piece = root_piece(G)
        A, B = aL * clc + crc, piece(SL * aL, SR)
        gamma = torch.where(A > 0, B / A.clamp_min(tiny), ys.gather(-1, lo))  # else: G = 0 on the piece, v = y
        return torch.where(no_violation, gamma_nv, gamma)

    # p = 4/3, with tau = (g - m) / lam, d_i = (s_i - m) / lam (m = y_k: gamma lies between y_k and y_{k+1}):
    # G = sum_active (tau - d_i)^3 + W (1, or m + lam tau for the magnitude), W = the active L entries
    m = yk
    tau = (ys - m) / lam
    d = tau + Lf if not mag else (s.gather(-1, order) - m) / lam
    pre, suf, dp = [], [], d
    for _ in range(3):
        dL = Lf * dp
        pre.append(dL.cumsum(-1))
        suf.append(_suffix(dp - dL))
        dp = dp * d
    c0 = cl + cr
    D1, D2, D3 = (a + b for a, b in zip(pre, suf))
    G = ((c0 * tau - 3.0 * D1) * tau + 3.0 * D2) * tau - D3 + (cl * (m + lam * tau) if mag else cl)
    _, lo, Wc, crc, piece = root_piece(G)
    c0 = Wc + crc
    D1, D2, D3 = (piece(a, b) for a, b in zip(pre, suf))
    c0s = c0.clamp_min(1.0)
    mu = D1 / c0s  # tau = z + mu:  c0 z^3 + (3 E2 + lam W) z - E3 + W (1 or m + lam mu) = 0
    E2 = (D2 - c0 * mu * mu).clamp_min(0.0)
    E3 = D3 - 3.0 * mu * D2 + 2.0 * c0 * mu * mu * mu
    Pc = (3.0 * E2 + (lam * Wc if mag else 0.0)) / c0s
    Qc = ((Wc * (m + lam * mu) if mag else Wc) - E3) / c0s
    t = torch.where(c0 > 0, mu + _cubic_root(Pc, Qc), tau.gather(-1, lo))
    # one Newton step on G summed term by term, its active set read at t: removes the rounding of the power sums
    # (large when lam is small) and moves back a root that rounding put on a neighbouring piece
    act = torch.where(Lb, tau < t, tau > t)
    r = torch.where(act, t - d, 0.0)
    Wa = (act & Lb).sum(-1, keepdim=True).to(s.dtype)
    r2 = r * r
    Gv = (r2 * r).sum(-1, keepdim=True) + (Wa * (m + lam * t) if mag else Wa)
    dG = 3.0 * r2.sum(-1, keepdim=True) + (lam * Wa if mag else 0.0)
    t = t - torch.where(dG > 0, Gv / dG.clamp_min(tiny), 0.0)
    return torch.where(no_violation, gamma_nv, m + lam * t)


def _pav_sorted(
    s: torch.Tensor, L: torch.Tensor, kk: int | torch.Tensor, lam: float, p43: bool, mag: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """e = (s - v*) / lam in sorted order and the pooled block (bool): v*_i = max(y_i, gamma) on L, min on R."""
    y, e_single = _singletons(s, L, lam, p43, mag)
    gamma = _pav_gamma(s, y, kk, lam, p43, mag)
    blk = torch.where(L, y < gamma, y > gamma)
    single = torch.where(L, 1.0 if e_single is None else e_single, 0.0)  # (s - y) / lam off the block
    return torch.where(blk, (s - gamma) / lam, single), blk


# ------------------------------------------------------------------------------------------------ Dykstra


def _dykstra_sorted(
    s: torch.Tensor, L: torch.Tensor, lam: float, mag: bool, dykstra_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """e = (s - v) / lam and the block, v after ``dykstra_iters`` rounds of Dykstra's projections onto C1 and C2.

    Each projection pools the violating pairs (u, w) (u < w) of its constraint set at their weighted mean
    (weights a, b: 1, or 1 + lam w_i for the magnitude). Its Dykstra correction t - P(t) is (c, -(a/b) c) on a
    pair, so one number c per pair is kept, and a round updates v in place: with beta = b / (a + b),
    e = max(c, beta (w - u)), c <- c - e, u <- u + e, w <- w - (a/b) e (the algebra of t = v + correction,
    v <- P(t), correction <- t - P(t)). Entries that no projection ever moved keep v = y bitwise and get their
    exact singleton value (0 or 1 for the mask); the block is the L entries raised above y and the R entries
    lowered below it (relative tolerance).
    """
    y, e_single = _singletons(s, L, lam, False, mag)
    v = y.clone()
    rows, n = v.shape
    a = (1.0 + lam * L.to(s.dtype)).expand_as(s) if mag else None
    steps = []
    for off in (0, 1):  # C1: pairs (1, 2), (3, 4), ..; C2: pairs (2, 3), (4, 5), ..
        m = (n - off) // 2
        if m == 0:
            continue
        u, w = v[:, off : off + 2 * m : 2], v[:, off + 1 : off + 2 * m : 2]
        beta = rho = None
        if a is not None:
            au, aw = a[:, off : off + 2 * m : 2], a[:, off + 1 : off + 2 * m : 2]
            beta, rho = aw / (au + aw), au / aw
        steps.append((u, w, beta, rho, v.new_zeros(rows, m), v.new_empty(rows, m), v.new_empty(rows, m)))
    for _ in range(dykstra_iters):
        for u, w, beta, rho, c, hd, e in steps:
            if torch.compiler.is_compiling():
                # traced: no out= ops (an exported program keeps them, and they refuse inputs that require grad)
                hd = (w - u) * (0.5 if beta is None else beta)
                e = torch.maximum(c, hd)
            else:
                torch.sub(w, u, out=hd)
                hd.mul_(0.5 if beta is None else beta)
                torch.maximum(c, hd, out=e)
            c.sub_(e)
            u.add_(e)
            if rho is None:
                w.sub_(e)
            else:
                w.addcmul_(e, rho, value=-1.0)
    single = torch.where(L, 1.0 if e_single is None else e_single, 0.0)
    e = torch.where(v == y, single, (s - v) / lam)
    tol = 16.0 * torch.finfo(s.dtype).eps * (y.abs() + lam)
    return e, torch.where(L, v > y + tol, v < y - tol)


# ------------------------------------------------------------------------------------------------ autograd


def _vjp_sorted(
    gs: torch.Tensor, blk: torch.Tensor, L: torch.Tensor, e: torch.Tensor | None, lam: float, p43: bool, mag: bool
) -> torch.Tensor:
    """hs - (dv/ds)^T hs in sorted order, hs = grad^2 R*(s - v) * gs (the closed-form Jacobian of the solution)."""
    tiny = torch.finfo(gs.dtype).tiny
    Lf = L.to(gs.dtype)
    if not p43:
        hs = gs / lam
        alpha = 1.0 / lam
        beta = (1.0 / lam + Lf) if mag else torch.full_like(Lf, 1.0 / lam)
        ratio = (1.0 / (1.0 + lam * Lf)) if mag else 1.0
    else:
        alpha = 3.0 * e * e / lam  # = grad^2 R*(s - v) for r*(z) = z^4 / (4 lam^3)
        hs = alpha * gs
        beta = alpha + Lf if mag else alpha
        ratio = torch.where(beta > 0, alpha / beta.clamp_min(tiny), 1.0)
    bf = blk.to(gs.dtype)
    S = (bf * hs).sum(-1, keepdim=True)
    Bsum = (bf * beta).sum(-1, keepdim=True)
    pooled = alpha * S / Bsum.clamp_min(tiny)
    return hs - torch.where(blk, pooled, ratio * hs)


def _mask_vjp(g: torch.Tensor, e: torch.Tensor, blk: torch.Tensor | None, lam: float, p43: bool) -> torch.Tensor:
    """The same for the mask, in the original order (no permutation): 0 on singletons; on the block B
    (0 < e < 1 when not given) alpha_j (g_j - sum_B alpha g / sum_B alpha), alpha = 1 (p=2) or 3 e^2 (p=4/3),
    over lam."""
    B = (e > 0) & (e < 1) if blk is None else blk
    if not p43:
        gB = torch.where(B, g, 0.0)
        mean = gB.sum(-1, keepdim=True) / B.sum(-1, keepdim=True).clamp_min(1).to(g.dtype)
        return torch.where(B, (g - mean) / lam, 0.0)
    alpha = torch.where(B, 3.0 * e * e, 0.0)
    ag = alpha * g
    mean = ag.sum(-1, keepdim=True) / alpha.sum(-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    return alpha * (g - mean) / lam


# CPU: the per-row work runs on chunks of about 2^16 entries (rows x n), which stay in cache between the ~30
# elementwise passes (about 2x faster than whole (rows, n) tensors at n = 1024); other devices take all rows at once.
_CHUNK_ENTRIES = 2**16


def _row_chunks(rows: int, n: int, device: torch.device) -> list[slice]:
    if torch.compiler.is_compiling():  # traced: all rows in one piece (a loop would specialise a dynamic batch)
        return [slice(0, rows)]
    step = rows if device.type != "cpu" else max(1, _CHUNK_ENTRIES // max(n, 1))
    return [slice(i, min(i + step, rows)) for i in range(0, rows, step)] or [slice(0, 0)]


def _mask_pav_rows(x: torch.Tensor, kk: int | torch.Tensor, lam: float, p43: bool) -> torch.Tensor:
    """e = clip((x - gamma) / lam, 0, 1) in the original order (the mask is e, or e^3 for p = 4/3)."""
    n = x.shape[-1]
    s = _sorted_desc(x)
    y, _ = _singletons(s, torch.arange(n, device=x.device) < kk, lam, p43, False)
    gamma = _pav_gamma(s, y, kk, lam, p43, False)
    return ((x - gamma) / lam).clamp_(0.0, 1.0)


def _nonfinite_rows(
    x: torch.Tensor, kk: int | torch.Tensor, lam: float, p43: bool, mag: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Infinite and NaN entries (module docstring, "Non-finite entries"): (x with finite surrogates, the infinite
    entries (bool), the rows holding a NaN (rows, 1), the exact outputs at the infinite entries).

    Mask: +inf entries become max_f + D, -inf entries min_f - D (max_f / min_f: the row's finite extremes, 0 if
    none), D = 2 lam + 8 eps max(|max_f|, |min_f|) (at least two band widths and a few ulps): then the finite
    entries get exactly the solution of the row without its infinite entries, with k less the +inf entries (clip
    makes the surrogates exactly 0 or 1 there, or the finite entries exactly 0 or 1 when the surrogates share), and
    the infinite entries' exact shares replace the surrogates' rounded ones. Magnitude: infinite entries become
    +-c with c = 2 a + 2 lam (a + a^(1/3) + 1), a = max_f |x| (c / (1 + lam) > a for p = 2, y_L(c) > a for
    p = 4/3): they stay above every finite entry's singleton value, so no pooled block mixes the two.
    """
    big = torch.finfo(x.dtype).max
    finite = torch.isfinite(x)
    nan = torch.isnan(x)
    inf = ~finite & ~nan
    row_nan = nan.any(-1, keepdim=True)
    none = ~finite.any(-1, keepdim=True)
    if mag:
        a = torch.where(finite, x.abs(), 0.0).amax(-1, keepdim=True)
        c = (2.0 * a + 2.0 * lam * (a + a.pow(1.0 / 3.0) + 1.0)).clamp(max=big)
        xs = torch.where(inf, torch.copysign(c, x), torch.where(nan, 0.0, x))
        return xs, inf, row_nan, x
    hi = torch.where(none, 0.0, torch.where(finite, x, -math.inf).amax(-1, keepdim=True))
    lo = torch.where(none, 0.0, torch.where(finite, x, math.inf).amin(-1, keepdim=True))
    gap = 2.0 * lam + 8.0 * torch.finfo(x.dtype).eps * torch.maximum(hi.abs(), lo.abs())
    pos, neg = x == math.inf, x == -math.inf
    xs = torch.where(pos, (hi + gap).clamp(max=big), torch.where(neg, (lo - gap).clamp(min=-big), x))
    xs = torch.where(nan, 0.0, xs)
    n_pos = pos.sum(-1, keepdim=True).to(x.dtype)
    n_neg = neg.sum(-1, keepdim=True).to(x.dtype)
    n_fin = finite.sum(-1, keepdim=True).to(x.dtype)
    share_pos = (kk / n_pos.clamp_min(1.0)).clamp(max=1.0)  # k among the +inf entries, or each of them 1
    share_neg = ((kk - n_pos - n_fin) / n_neg.clamp_min(1.0)).clamp(0.0, 1.0)  # what the others leave
    exact = torch.where(pos, share_pos, share_neg)
    return xs, inf, row_nan, exact.pow(1.0 / 3.0) if p43 else exact


class _SoftTopKFunction(torch.autograd.Function):
    """y* of (T1) on (rows, n) x, with the closed-form backward.

    Mask with PAV: only gamma needs the sorted space; y* = clip((x - gamma) / lam, 0, 1) (p=2) or its cube
    (p=4/3) in the original order, and backward reads the block from it (0 < e < 1). Otherwise (magnitude, or
    Dykstra) the solution is computed in the sorted space and the permutation is saved.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        kk: int | torch.Tensor,
        lam: float,
        p43: bool,
        mag: bool,
        solver: str,
        dykstra_iters: int,
    ) -> torch.Tensor:
        rows, n = x.shape
        chunks = _row_chunks(rows, n, x.device)
        ctx.cfg = (kk if isinstance(kk, int) else None, lam, p43, mag, chunks)
        # non-finite entries: always handled on an accelerator (no host sync), skipped when absent on the CPU
        inf = row_nan = None
        if not (host_read_is_free(x) and bool(torch.isfinite(x).all())):
            x, inf, row_nan, exact = _nonfinite_rows(x, kk, lam, p43, mag)
        ctx.nonfinite = inf is not None

        def k_of(sl: slice) -> int | torch.Tensor:
            return kk if isinstance(kk, int) else kk[sl]

        def finish(out: torch.Tensor) -> torch.Tensor:
            return out if inf is None else torch.where(row_nan, math.nan, torch.where(inf, exact, out))

        if not mag and solver == "pav":
            e = torch.empty_like(x)
            for sl in chunks:
                e[sl] = _mask_pav_rows(x[sl], k_of(sl), lam, p43)
            blk = None
            if inf is not None:  # exact shares at the infinite entries; the block of the finite entries alone
                e = torch.where(inf, exact, e)
                blk = (e > 0) & (e < 1) & ~inf
            ctx.save_for_backward(e, blk, None, None, None, None, inf, row_nan)
            out = e * e * e if p43 else e
            return out if inf is None else torch.where(row_nan, math.nan, out)
        perm = torch.empty(x.shape, dtype=torch.long, device=x.device)
        blk = torch.empty(x.shape, dtype=torch.bool, device=x.device)
        e_s = torch.empty_like(x)
        out = torch.empty_like(x)
        for sl in chunks:
            s, p = _argsort_desc(x[sl].abs() if mag else x[sl])
            L = torch.arange(n, device=x.device) < k_of(sl)
            if solver == "pav":
                e, b = _pav_sorted(s, L, k_of(sl), lam, p43, mag)
            else:
                e, b = _dykstra_sorted(s, L, lam, mag, dykstra_iters)
            perm[sl], blk[sl], e_s[sl] = p, b, e
            out[sl] = torch.empty_like(e).scatter_(-1, p, e * e * e if p43 else e)
        if not mag:  # Dykstra mask: backward in the original order, with the block Dykstra found
            blk_o = torch.empty_like(blk).scatter_(-1, perm, blk)
            if inf is not None:
                blk_o = blk_o & ~inf
            ctx.save_for_backward(out, blk_o, None, None, None, None, inf, row_nan)
            return finish(out)
        neg = x < 0
        ctx.save_for_backward(
            None, blk, perm, e_s if p43 else None, neg, kk if isinstance(kk, torch.Tensor) else None, inf, row_nan
        )
        return finish(torch.where(neg, -out, out))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        e_o, blk, perm, e_s, neg, kt, inf, row_nan = ctx.saved_tensors
        kint, lam, p43, mag, chunks = ctx.cfg
        gx = torch.empty_like(grad)
        if not mag:
            for sl in chunks:
                gx[sl] = _mask_vjp(grad[sl], e_o[sl], None if blk is None else blk[sl], lam, p43)
        else:
            grad = torch.where(neg, -grad, grad)
            for sl in chunks:
                p = perm[sl]
                L = torch.arange(grad.shape[-1], device=grad.device) < (kint if kt is None else kt[sl])
                vjp = _vjp_sorted(grad[sl].gather(-1, p), blk[sl], L, None if e_s is None else e_s[sl], lam, p43, mag)
                gx[sl] = torch.empty_like(vjp).scatter_(-1, p, vjp)
            gx = torch.where(neg, -gx, gx)
        if ctx.nonfinite:  # an infinite entry cannot move: gradient 0; a row holding a NaN: NaN
            gx = torch.where(row_nan, math.nan, torch.where(inf, 0.0, gx))
        return gx, None, None, None, None, None, None


def _soft(
    name: str,
    x: torch.Tensor,
    k: int | torch.Tensor,
    dim: int,
    p: float,
    lam: float,
    solver: str,
    dykstra_iters: int,
    mag: bool,
) -> torch.Tensor:
    p43 = check_relaxed(name, p, lam, solver, dykstra_iters)
    flat, kk, shape, d = _rows(name, x, k, dim)
    work = torch.float64 if x.dtype == torch.float64 else torch.float32
    with torch.autocast(x.device.type, enabled=False):
        out = _SoftTopKFunction.apply(flat.to(work), kk, float(lam), p43, mag, solver, dykstra_iters)
    return _unrows(out.to(x.dtype), shape, d)


# ------------------------------------------------------------------------------------------------ public API


@renamed_arguments(n_iter="dykstra_iters")
def soft_topk_mask(
    x: torch.Tensor,
    k: int | torch.Tensor,
    dim: int = -1,
    p: float = 2.0,
    lam: float = 1.0,
    solver: str = "pav",
    dykstra_iters: int = 100,
    *,
    n_iter: int | None = None,
) -> torch.Tensor:
    """Relaxed top-k mask: y* = argmax_{0 <= y <= 1, sum y = k} <x, y> - (lam / p) ||y||_p^p along ``dim`` (T1).

    Equivalently y*_i = clip(grad r*(x_i - gamma), 0, 1) for a per-row threshold gamma: p = 2 gives
    clip((x_i - gamma) / lam, 0, 1), p = 4/3 gives clip(((x_i - gamma) / lam)^3, 0, 1). Sums to k; exactly 1 on
    the entries above the relaxed band and exactly 0 below it; lam -> 0 gives :func:`topk_mask`. Infinite entries:
    the limit of large finite ones (-inf entries get 0 while finite ones remain, then share the rest equally; see
    the module docstring); a row holding a NaN gives NaN.

    Args:
        x: any shape, floating point; the operator acts along ``dim``, every other dim is a batch.
        k: int in [1, n], or an integer tensor of k per row (x.shape without ``dim``, or broadcastable).
        dim: the dimension the operator acts along.
        p: 2 (piecewise linear) or 4/3 (continuously differentiable).
        lam: regularisation strength > 0.
        solver: ``"pav"`` (exact) or ``"dykstra"`` (p = 2 only, ``dykstra_iters`` iterations; approximate).
        dykstra_iters: Dykstra iterations (ignored by PAV).
        n_iter: deprecated name of ``dykstra_iters`` (FutureWarning; giving both is an error).
    """
    return _soft("soft_topk_mask", x, k, dim, p, lam, solver, dykstra_iters, mag=False)


@renamed_arguments(n_iter="dykstra_iters")
def soft_topk_magnitude(
    x: torch.Tensor,
    k: int | torch.Tensor,
    dim: int = -1,
    p: float = 2.0,
    lam: float = 1.0,
    solver: str = "pav",
    dykstra_iters: int = 100,
    *,
    n_iter: int | None = None,
) -> torch.Tensor:
    """Relaxed top-k in magnitude: y* of (T1) with phi(u) = u^2 / 2, s = |x| sorted, carrying sign(x).

    Exactly 0 outside about k entries (the top k, plus the R entries of the pooled block when magnitudes nearly
    tie at the k-th); for p = 2 the entries kept outside the block are x_i / (1 + lam). The bound
    ||y* - topk_magnitude(x)||_inf <= lam ||x||_inf (p = 2) holds when |x|_[k] >= (1 + lam) |x|_[k+1] (no block);
    near a tie at the k-th entry the hard operator jumps and no such bound holds. Infinite entries are the largest
    magnitudes and come out as +-inf (the limit), with zero gradient; a row holding a NaN gives NaN.

    Args:
        x: any shape, floating point; the operator acts along ``dim``, every other dim is a batch.
        k: int in [1, n], or an integer tensor of k per row (x.shape without ``dim``, or broadcastable).
        dim: the dimension the operator acts along.
        p: 2 (piecewise linear) or 4/3 (continuously differentiable).
        lam: regularisation strength > 0.
        solver: ``"pav"`` (exact) or ``"dykstra"`` (p = 2 only, ``dykstra_iters`` iterations; approximate).
        dykstra_iters: Dykstra iterations (ignored by PAV).
        n_iter: deprecated name of ``dykstra_iters`` (FutureWarning; giving both is an error).
    """
    return _soft("soft_topk_magnitude", x, k, dim, p, lam, solver, dykstra_iters, mag=True)
