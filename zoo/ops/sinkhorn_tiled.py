"""Tiled (flash-style) Sinkhorn attention kernel: memory O(n), cost per score entry independent of the length.

The same Sinkhorn iteration as :mod:`zoo.ops.sinkhorn` (log domain, ``n_iter`` half-steps starting with a row
step; scores C = q k^T + b with q pre-scaled and b the additive form of the masks):

    f_l = -logsumexp_j (C_ij + g_{l-1,j})   (row step l, odd; g_0 = 0)
    g_l = -logsumexp_i (C_ij + f_{l-1,i})   (column step l, even)
    P_l = exp(C + pot_l + pot_{l-1}),   out = factor * P_n v

but the (L, S) scores of one (batch x head) slice are never held: a few slices at a time are cut into blocks of
query rows ("tiles", each row block with every key, ``TILE_BYTES`` = 8 MiB of scores: last-level-cache-sized),
and each tile's scores are recomputed by one matmul in every pass over it. Only the potentials (vectors of
length L or S) live between passes:

* forward: one pass per row step. A tile's row step is complete within the tile (it holds whole rows); the
  column step that follows needs every row, so its log-sum-exp is merged over the tiles (``logaddexp`` of the
  tiles' partial log-sum-exps) during the same pass. The last pass applies the last half-step and computes P_n v.
  ``n_iter = 3``: two passes (3 matmuls of the size of C, counting P_n v).
* backward, unrolled through every half-step (the exact gradients of the iteration, as the chunked kernel of
  :mod:`zoo.ops.sinkhorn`): with D_i = dout_i . out_i and w_j = v_j . dv_j, the last half-step gives the gradient
  of the previous potential without forming dP = dout v^T: for a last row step grad g_{n-1} = w - P_n^T D (a
  column reduction, accumulated with dv = P_n^T dout in one matmul P_n^T [dout | D]), for a last column step
  grad f_{n-1} = D - P_n w (a row reduction). Each earlier half-step passes the gradient down,
  grad pot_{m-1} = -reduce(P_m * grad pot_m) over the axis of pot_m: rows for a column step (local to the tile),
  columns for a row step (one more pass). The last pass forms dC = dC_n - sum_m P_m * grad pot_m with
  dC_n = P_n * (dP - D) (row) or dP * P_n - P_n * w (column) and gives dq = dC k, dk = sum over tiles dC^T q.
  ``n_iter = 3``: two passes (6 matmuls of the size of C), no extra pass for n_iter = 2, one more for 4 and 5.
  Each pass takes one exp per score entry, for P_n: the earlier matrices follow from it by a row or column factor,
  P_{m-1} = P_m * exp(pot_{m-2} - pot_m) (pot_0 = 0), a vector computed once per slice (see :func:`_ratios`).

Each pass's per-tile work is one function (compiled by default with the chunked kernels, see
:func:`zoo.ops.sinkhorn.set_compile`): each half-step's exp and reduction become one loop over the tile.
Deterministic (fixed order of the tiles and of every accumulation); no host sync.
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.ops.compiled import CompiledKernels

__all__ = ["tiled_sinkhorn", "tile_shape", "TILE_BYTES"]

# float32 scores per tile (slices x rows x keys). Measured on CPU (AMD EPYC, 2 MiB L2 per core, 32 MiB L3) at
# 8,192 tokens, forward + backward against SDPA: 1 MiB tiles 2.8x, 2 MiB 2.2x, 4 MiB 2.1x, 8 MiB 1.8x, 16 MiB 1.9x:
# a matmul of 256 query rows runs near peak, and the tile's few temporaries stay in the last-level cache.
TILE_BYTES = 8 * 2**20
MIN_ROWS = 16  # query rows per tile at least (a matmul of fewer rows runs far below peak)


def tile_shape(n_slices: int, L: int, S: int, tile_bytes: int | None = None) -> tuple[int, int]:
    """(slices per chunk, query rows per tile): a tile holds about ``tile_bytes`` (default ``TILE_BYTES``) of
    float32 scores, whole rows of at least ``MIN_ROWS`` queries (fewer only when L is smaller), and several slices
    at once when one slice's rows fit.
    ``n_slices``: the (batch x head) slices; ``S``: the number of keys."""
    elems = max(1, (TILE_BYTES if tile_bytes is None else tile_bytes) // 4)
    rows = min(L, max(MIN_ROWS, elems // max(S, 1)))
    slices = min(n_slices, max(1, elems // max(rows * S, 1)))
    return slices, rows


# ------------------------------------------------------------------------------------------------ per-tile math


def _scores(q: torch.Tensor, k: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """C = q k^T + bias (q already scaled), (Nc, rows, S)."""
    kt = k.transpose(-1, -2)
    return torch.bmm(q, kt) if bias is None else torch.baddbmm(bias, q, kt)


def _neg_lse(x: torch.Tensor, dim: int, masked: bool) -> torch.Tensor:
    """-logsumexp along dim; 0 for an empty (all -inf) row / column (as the chunked kernel)."""
    lse = torch.logsumexp(x, dim, keepdim=True)
    return torch.where(lse == float("-inf"), 0.0, -lse) if masked else -lse


def _matrix(c: torch.Tensor, pots: list[torch.Tensor], m: int) -> torch.Tensor:
    """P_m = exp(C + pot_m + pot_{m-1}) on the tile (pots[m - 1] is pot_m, already cut to the tile's rows)."""
    x = c + pots[m - 1]
    return (x if m == 1 else x + pots[m - 2]).exp()


def _forward_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    g: torch.Tensor | None,
    f_prev: torch.Tensor | None,
    *,
    masked: bool,
    mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One tile of a forward pass. ``mode``:

    * "row_col": row step f = -lse_j(C + g) and the tile's partial column log-sum-exp lse_i(C + f) of the next
      (column) step; returns (f, partial);
    * "row_out": the last, row step and its output: f = -lse_j(C + g), P = exp(C + g + f), returns (P v, f);
    * "out": the output after a last column step g: P = exp(C + f_prev + g), returns (P v, P v).
    """
    c = _scores(q, k, bias)
    if mode == "out":
        assert f_prev is not None and g is not None
        out = torch.bmm((c + f_prev + g).exp(), v)
        return out, out
    x = c if g is None else c + g
    if mode == "row_col":
        f = _neg_lse(x, -1, masked)
        return f, torch.logsumexp(c + f, -2, keepdim=True)
    # row softmax with one exp: P = e / s with e = exp(x - max), f = -(max + log s)
    m = x.amax(-1, keepdim=True)
    if masked:
        m = torch.where(m == float("-inf"), 0.0, m)
    e = (x - m).exp()
    s = e.sum(-1, keepdim=True)
    if masked:
        f = torch.where(s == 0, 0.0, -(m + s.log()))
        p = e / torch.where(s == 0, 1.0, s)
    else:
        f = -(m + s.log())
        p = e / s
    return torch.bmm(p, v), f


def _ratios(pots: list[torch.Tensor]) -> list[torch.Tensor]:
    """r_m = exp(pot_{m-1} - pot_{m+1}) for m = 1 .. n - 1 (pot_0 = 0), so that P_m = P_{m+1} * r_m: a column
    vector (N, 1, S) for odd m, a row vector (N, L, 1) for even m.

    Bounded, so the product neither overflows nor loses what matters: P_{m+1} is normalised along r_m's axis (its
    rows or columns sum to 1, or it is empty and its potential 0), so r_m is the sum of P_m along that axis, at most
    the number of entries summed (each P entry is at most 1). An entry of P_{m+1} that underflows to 0 makes P_m's
    entry 0 where exp(C + pot_m + pot_{m-1}) would give at most that bound times the smallest normal float: an
    absolute error far below the rounding of the sums it enters."""
    n = len(pots)
    return [(-pots[1] if m == 1 else pots[m - 2] - pots[m]).exp() for m in range(1, n)]


def _grad_chain(
    p_next: torch.Tensor,
    ratios: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    top: int,
    stop: int,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Half-steps m = top .. max(stop, 1) of the unrolled backward on one tile, from P_{top+1} = ``p_next`` and the
    tile's ratios (P_m = P_{m+1} * r_m, :func:`_ratios`): t_m = P_m * grad pot_m is subtracted from dC; a column step
    m (even) passes grad pot_{m-1} = -rowsum(t_m) down (stored in ``grads``, local to the tile); the row step ``stop``
    (odd, > 1) ends the walk and returns its partial column reduction -colsum(t_stop) (the tile's share of
    grad pot_{stop-1}). Returns (-sum_m t_m, partial or None)."""
    acc: torch.Tensor | None = None
    p = p_next
    for m in range(top, max(stop, 1) - 1, -1):
        gm = grads[m - 1]
        assert gm is not None
        p = p * ratios[m - 1]
        t = p * gm
        acc = -t if acc is None else acc - t
        if m == stop:
            return acc, -t.sum(-2, keepdim=True)
        if m > 1 and m % 2 == 0:
            grads[m - 2] = -t.sum(-1, keepdim=True)
    return acc, None


def _backward_tile(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    pots: list[torch.Tensor],
    ratios: list[torch.Tensor],
    grads: list[torch.Tensor | None],
    dout: torch.Tensor,
    d_row: torch.Tensor,
    w: torch.Tensor | None,
    *,
    n_iter: int,
    stop: int,
) -> tuple[Any, ...]:
    """One tile of a backward pass (``dout`` already multiplied by the output factor; d_row = D, w as above;
    ``ratios``: the tile's cut of :func:`_ratios`).

    ``stop`` = 0: the last pass, returns (dq / scale, dC, grads); ``stop`` odd > 1: a middle pass ending at the
    row step ``stop``, returns (partial column gradient of pot_{stop-1}, grads); ``stop`` = -1: the first pass,
    returns P_n (its product with [dout | D] is accumulated by the caller).
    """
    c = _scores(q, k, bias)
    n = n_iter
    p_n = _matrix(c, pots, n)
    if stop == -1:
        return (p_n,)
    grads = list(grads)
    if n % 2 == 0 and grads[n - 2] is None:  # last step on columns: grad f_{n-1} = D - P_n w (a row reduction)
        assert w is not None
        grads[n - 2] = d_row - (p_n * w).sum(-1, keepdim=True)
    if stop > 0:
        _, partial = _grad_chain(p_n, ratios, grads, n - 1, stop)
        return partial, grads
    dp = torch.bmm(dout, v.transpose(-1, -2))
    if n % 2 == 1:
        dc = p_n * (dp - d_row)
    else:
        assert w is not None
        dc = (dp - w) * p_n
    rest, _ = _grad_chain(p_n, ratios, grads, n - 1, 0)
    if rest is not None:
        dc = dc + rest
    return torch.bmm(dc, k), dc


_KERNELS = CompiledKernels(
    {"forward": _forward_tile, "backward": _backward_tile},
    env="ZOO_COMPILE_SINKHORN",
    what="the compiled tiled Sinkhorn kernels",
)


def set_compile(enabled: bool) -> None:
    """Run the per-tile functions compiled (True, the default) or as eager PyTorch ops (False)."""
    _KERNELS.set_enabled(enabled)


# ------------------------------------------------------------------------------------------------ passes


def _bias_tile(
    bias: torch.Tensor | None, bias_idx: torch.Tensor | None, sl: slice, rows: slice, n: int
) -> torch.Tensor | None:
    """The bias of chunk ``sl`` and query rows ``rows``, (n or 1, rows or 1, S or 1): a view where the bias is
    shared by every slice, a tile-sized gather otherwise (never a copy of a whole (L, S) slice)."""
    if bias is None:
        return None
    b = bias if bias.shape[1] == 1 else bias[:, rows]
    if bias.shape[0] == 1:
        return b
    assert bias_idx is not None
    return b[bias_idx[sl]]


def _forward(
    qs: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    bias_idx: torch.Tensor | None,
    factor: torch.Tensor | None,
    n_iter: int,
    tile: tuple[int, int],
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """out (N, L, Ev) and the potentials pot_1..pot_n ((N, L, 1) row, (N, 1, S) column, the column ones with
    the empty-column convention applied)."""
    N, L, _ = qs.shape
    S = k.shape[1]
    masked = bias is not None
    chunk, rows = tile
    out = qs.new_empty(N, L, v.shape[-1])
    pots: list[torch.Tensor] = [
        qs.new_empty(N, L, 1) if m % 2 == 1 else qs.new_empty(N, 1, S) for m in range(1, n_iter + 1)
    ]
    row_col = _KERNELS.get("forward", masked=masked, mode="row_col")
    row_out = _KERNELS.get("forward", masked=masked, mode="row_out")
    last_out = _KERNELS.get("forward", masked=masked, mode="out")
    for i in range(0, N, chunk):
        sl = slice(i, min(i + chunk, N))
        nc = sl.stop - sl.start
        q_c, k_c, v_c = qs[sl], k[sl], v[sl]
        g: torch.Tensor | None = None
        for m in range(1, n_iter + 1, 2):  # one pass per row step m
            last_row = m == n_iter
            col_lse = None
            for r in range(0, L, rows):
                rs = slice(r, min(r + rows, L))
                b = _bias_tile(bias, bias_idx, sl, rs, nc)
                if last_row:
                    out[sl, rs], pots[m - 1][sl, rs] = row_out(q_c[:, rs], k_c, v_c, b, g, None)
                else:
                    f, part = row_col(q_c[:, rs], k_c, v_c, b, g, None)
                    pots[m - 1][sl, rs] = f
                    col_lse = part if col_lse is None else torch.logaddexp(col_lse, part)
            if not last_row:
                assert col_lse is not None
                g = torch.where(col_lse == float("-inf"), 0.0, -col_lse) if masked else -col_lse
                pots[m][sl] = g
        if n_iter % 2 == 0:  # the last step was a column step: one more pass for P_n v
            for r in range(0, L, rows):
                rs = slice(r, min(r + rows, L))
                b = _bias_tile(bias, bias_idx, sl, rs, nc)
                out[sl, rs], _ = last_out(q_c[:, rs], k_c, v_c, b, pots[-1][sl], pots[-2][sl, rs])
    if factor is not None:
        out = out * factor
    return out, pots


def _cut(vectors: list[Any], sl: slice, rs: slice, first_is_row: bool = True) -> list[Any]:
    """Row and column vectors of chunk ``sl``, alternating (potentials and their gradients: entry m - 1 belongs to
    half-step m, a row vector for odd m, so the first is a row; :func:`_ratios`: the first is a column): a row vector
    (N, L, 1) is cut to the rows ``rs``, a column vector (N, 1, S) kept whole; None stays None."""
    return [
        None if t is None else (t[sl, rs] if (i % 2 == 0) == first_is_row else t[sl]) for i, t in enumerate(vectors)
    ]


def _tile_inputs(chunk: tuple[Any, ...], rs: slice) -> tuple[Any, ...]:
    """q, k, v, bias, potentials and ratios of the tile of rows ``rs``, from a chunk's
    (q, k, v, bias, bias_idx, pots, ratios, slices, number of slices)."""
    q_c, k_c, v_c, bias, bias_idx, pots, ratios, sl, nc = chunk
    b = _bias_tile(bias, bias_idx, sl, rs, nc)
    return q_c[:, rs], k_c, v_c, b, _cut(pots, sl, rs), _cut(ratios, sl, rs, False)


def _backward(
    qs: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    bias_idx: torch.Tensor | None,
    factor: torch.Tensor | None,
    pots: list[torch.Tensor],
    out: torch.Tensor,
    dout: torch.Tensor,
    n_iter: int,
    tile: tuple[int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq / scale, dk, dv of the tiled forward (see the module docstring)."""
    N, L, E = qs.shape
    S, Ev = k.shape[1], v.shape[-1]
    n = n_iter
    chunk, rows = tile
    d_row_all = (dout * out).sum(-1, keepdim=True)  # D_i = dout_i . out_i (out includes the factor)
    if factor is not None:
        dout = dout * factor
    dq, dv = torch.empty_like(qs), torch.empty_like(v)
    dk_t = k.new_zeros(N, E, S)  # dk transposed: q^T dC accumulated as a gemm streaming over the tile's rows
    ratios = _ratios(pots)
    first = _KERNELS.get("backward", n_iter=n, stop=-1)
    last = _KERNELS.get("backward", n_iter=n, stop=0)
    middle = {s: _KERNELS.get("backward", n_iter=n, stop=s) for s in range(3, n, 2)}
    for i in range(0, N, chunk):
        sl = slice(i, min(i + chunk, N))
        nc = sl.stop - sl.start
        q_c, k_c, v_c, do_c, d_c = qs[sl], k[sl], v[sl], dout[sl], d_row_all[sl]
        # gradients of the potentials of this chunk: index m - 1 for pot_m; rows (nc, L, 1), columns (nc, 1, S)
        grads: list[torch.Tensor | None] = [None] * (n - 1)
        # first pass: dv = P_n^T dout and, for a last row step, P_n^T D, in one matmul
        # accumulated transposed, [dout | D]^T P_n (Ev (+ 1), S): a gemm streaming over the tile's rows
        rhs_t = (torch.cat([do_c, d_c], -1) if n % 2 == 1 else do_c).transpose(-1, -2)
        acc = qs.new_zeros(nc, rhs_t.shape[1], S)
        for r in range(0, L, rows):
            rs = slice(r, min(r + rows, L))
            b = _bias_tile(bias, bias_idx, sl, rs, nc)
            (p_n,) = first(q_c[:, rs], k_c, v_c, b, _cut(pots, sl, rs), [], grads, do_c[:, rs], d_c[:, rs], None)
            acc.baddbmm_(rhs_t[:, :, rs], p_n)
        dv_c = acc[:, :Ev].transpose(-1, -2)
        dv[sl] = dv_c
        w = (v_c * dv_c).sum(-1)[:, None, :]  # w_j = v_j . dv_j, (nc, 1, S)
        if n % 2 == 1:
            grads[n - 2] = w - acc[:, Ev:]  # grad g_{n-1} = w - P_n^T D
        row_grads = {m: qs.new_empty(nc, L, 1) for m in range(1, n, 2)}  # grad f_m, filled tile by tile
        chunk_inputs = (q_c, k_c, v_c, bias, bias_idx, pots, ratios, sl, nc)
        # middle passes: one per row step m < n - 1 ... 3 whose column reduction is needed
        for s in range(n - 1 if (n - 1) % 2 == 1 else n - 2, 2, -2):
            col = None
            for r in range(0, L, rows):
                rs = slice(r, min(r + rows, L))
                g_tile = _cut(grads, slice(None), rs)
                part, g_tile = middle[s](*_tile_inputs(chunk_inputs, rs), g_tile, None, d_c[:, rs], w)
                for m, gm in row_grads.items():
                    if g_tile[m - 1] is not None:
                        gm[:, rs] = g_tile[m - 1]
                col = part if col is None else col + part
            for m, gm in row_grads.items():
                if m >= s:
                    grads[m - 1] = gm
            grads[s - 2] = col
        for r in range(0, L, rows):
            rs = slice(r, min(r + rows, L))
            g_tile = _cut(grads, slice(None), rs)
            dq_t, dc = last(*_tile_inputs(chunk_inputs, rs), g_tile, do_c[:, rs], d_c[:, rs], w)
            dq[sl, rs] = dq_t
            dk_t[sl].baddbmm_(q_c[:, rs].transpose(-1, -2), dc)
    return dq, dk_t.transpose(-1, -2), dv


class TiledSinkhornFunction(torch.autograd.Function):
    """out = factor * P_n v, tiled over (slices x query rows); saves only q, k, v, the bias, out and the
    potentials, and recomputes each tile's scores in every pass of forward and backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: torch.Tensor | None,
        bias_idx: torch.Tensor | None,
        factor: torch.Tensor | None,
        n_iter: int,
        scale: float,
        tile: tuple[int, int],
    ) -> torch.Tensor:
        qs = q * scale
        out, pots = _forward(qs, k, v, bias, bias_idx, factor, n_iter, tile)
        ctx.save_for_backward(qs, k, v, bias, bias_idx, factor, out, *pots)
        ctx.cfg = (n_iter, scale, tile)
        return out

    @staticmethod
    def backward(ctx: Any, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        qs, k, v, bias, bias_idx, factor, out, *pots = ctx.saved_tensors
        n_iter, scale, tile = ctx.cfg
        dq, dk, dv = _backward(qs, k, v, bias, bias_idx, factor, pots, out, dout.to(qs.dtype), n_iter, tile)
        return dq.mul_(scale), dk, dv, None, None, None, None, None, None


def tiled_sinkhorn(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None,
    bias_idx: torch.Tensor | None,
    factor: torch.Tensor | None,
    n_iter: int,
    scale: float,
    tile_bytes: int | None = None,
) -> torch.Tensor:
    """Sinkhorn attention out = factor * P_n v of flattened (N, L, E), (N, S, E), (N, S, Ev) float inputs, tiled.

    Args:
        q, k, v: (N, L, E), (N, S, E), (N, S, Ev), float32 or float64, N >= 1, L >= 1, S >= 1.
        bias: additive mask bias (Nb, L or 1, S or 1) (0 / -inf for bool masks) or None.
        bias_idx: (N,) index into the bias's first dim for each slice (None when bias is None).
        factor: (N, 1, 1) output factor (n_rows / n_cols of an even ``n_iter``) or None.
        n_iter: Sinkhorn half-steps, >= 2.
        scale: score scale.
        tile_bytes: float32 scores per tile (see :func:`tile_shape`; default ``TILE_BYTES``).

    Returns (N, L, Ev).
    """
    N, L, _ = q.shape
    S = k.shape[1]
    tile = tile_shape(N, L, S, tile_bytes)
    return TiledSinkhornFunction.apply(q, k, v, bias, bias_idx, factor, n_iter, scale, tile)
