"""The tiled Sinkhorn kernel (zoo.ops.sinkhorn_tiled) against the chunked kernel, a literal float64 Sinkhorn written
here, gradcheck, and its memory and selection rules."""

from __future__ import annotations

import pytest
import torch

import zoo.ops.sinkhorn as sk
import zoo.ops.sinkhorn_tiled as st
from zoo.ops import AdditiveMask, AllowedMask, CausalMask, PaddingMask, attention


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def qkv(B=2, H=2, L=40, S=35, E=4, Ev=3, dtype=torch.float64):
    return (
        rand(B, H, L, E, dtype=dtype, seed=1),
        rand(B, H, S, E, dtype=dtype, seed=2),
        rand(B, H, S, Ev, dtype=dtype, seed=3),
    )


def naive_sinkhorn(q, k, v, n_iter, kernel):
    """(S1) in float64 on an explicit kernel K = exp(C) * allowed-or-exp(bias): rownorm / colnorm, columns to
    n_rows / n_cols (numbers of non-empty rows / columns)."""
    K = torch.exp(q.shape[-1] ** -0.5 * q @ k.transpose(-1, -2)) * kernel
    n_rows = (K.sum(-1) > 0).sum(-1)[..., None, None].double()
    n_cols = (K.sum(-2) > 0).sum(-1)[..., None, None].double()
    for step in range(1, n_iter + 1):
        if step % 2 == 1:
            K = K / K.sum(-1, keepdim=True).clamp_min(1e-300)
        else:
            K = K / K.sum(-2, keepdim=True).clamp_min(1e-300) * n_rows / n_cols
    return K @ v


def masks(B, L, S):
    """name -> (typed mask, the kernel multiplier of the naive Sinkhorn, broadcastable to (B, H, L, S))."""
    kpm = torch.arange(S)[None] >= torch.tensor([S, S - 9])[:, None]
    qpm = torch.arange(L)[None] >= torch.tensor([L - 5, L])[:, None]
    padding = (~kpm[:, None, None, :] & ~qpm[:, None, :, None]).double()
    causal = torch.ones(L, S, dtype=torch.bool).tril()
    allowed = rand(L, S, seed=5) > -0.8
    allowed[7, :] = False  # an empty row
    allowed[:, 3] = False  # an empty column
    bias = rand(B, 1, L, S, seed=6).masked_fill(rand(B, 1, L, S, seed=7) > 1.2, float("-inf"))
    return {
        "none": (None, torch.ones(())),
        "padding": (PaddingMask(kpm, qpm), padding),
        "causal": (CausalMask(), causal.double()),
        "allowed": (AllowedMask(allowed), allowed.double()),
        "additive": (AdditiveMask(bias), bias.exp()),
        "combined": (PaddingMask(kpm, qpm) & CausalMask() & AdditiveMask(bias), padding * causal * bias.exp()),
    }


def run(path, q, k, v, mask, n_iter, dout, monkeypatch):
    """out and (dq, dk, dv) of the op forced onto the chunked or tiled kernel."""
    with monkeypatch.context() as m:
        m.setattr(sk, "TILED_MIN_BYTES", 0 if path == "tiled" else 2**62)
        m.setattr(st, "TILE_BYTES", 4 * 16 * k.shape[-2])  # 16 query rows per tile: several row tiles
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*ins, mask, n_iter)
        return out.detach(), torch.autograd.grad((out * dout).sum(), ins)


@pytest.mark.parametrize("n_iter", [2, 3, 4, 5])
@pytest.mark.parametrize("mask", ["none", "padding", "causal", "allowed", "additive", "combined"])
def test_tiled_equals_chunked_kernel_and_naive(mask, n_iter, monkeypatch):
    q, k, v = qkv()
    typed, kernel = masks(2, 40, 35)[mask]
    dout = rand(2, 2, 40, 3, seed=8)
    out_t, grads_t = run("tiled", q, k, v, typed, n_iter, dout, monkeypatch)
    out_c, grads_c = run("chunked", q, k, v, typed, n_iter, dout, monkeypatch)
    torch.testing.assert_close(out_t, out_c, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads_t, grads_c):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(out_t, naive_sinkhorn(q, k, v, n_iter, kernel), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("tile", [(1, 16), (3, 16), (4, 40), (2, 7)])
def test_tile_shapes_do_not_change_results(tile):
    """Chunks of slices (one, three with a remainder, all) and row tiles (with a remainder, whole) alike."""
    q, k, v = (t.reshape(4, *t.shape[2:]) for t in qkv())
    bias = torch.zeros(2, 1, 35, dtype=torch.float64).masked_fill(torch.arange(35) >= 30, float("-inf"))
    idx = torch.tensor([0, 0, 1, 1])
    ins = [t.clone().requires_grad_() for t in (q, k, v)]
    out = st.TiledSinkhornFunction.apply(*ins, bias, idx, None, 3, 0.5, tile)
    grads = torch.autograd.grad(out.square().sum(), ins)
    ref_ins = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = sk._SinkhornFunction.apply(*ref_ins, bias, idx, None, 3, 0.5, None, 4)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-10)
    for a, b in zip(grads, torch.autograd.grad(ref.square().sum(), ref_ins)):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("n_iter", [2, 3, 4, 5])
def test_gradcheck_several_tiles(n_iter):
    q, k, v = (t.requires_grad_() for t in (rand(3, 9, 3, seed=1), rand(3, 7, 3, seed=2), rand(3, 7, 2, seed=3)))
    bias = torch.zeros(1, 9, 7, dtype=torch.float64).masked_fill(
        torch.ones(9, 7, dtype=torch.bool).tril().logical_not(), float("-inf")
    )
    bias[0, :, 0] = 0.0
    factor = torch.full((3, 1, 1), 9 / 7, dtype=torch.float64) if n_iter % 2 == 0 else None
    idx = torch.zeros(3, dtype=torch.long)

    def fn(a, b, c):
        return st.TiledSinkhornFunction.apply(a, b, c, bias, idx, factor, n_iter, 0.8, (2, 4))

    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_memory_is_linear_in_length():
    """Autograd keeps only vectors and the inputs: no saved tensor has a (L, S) slice (the chunked kernel's
    potentials are vectors too, but its forward and backward hold whole slices)."""
    L = S = 64
    q, k, v = (t.reshape(4, L, 4).requires_grad_() for t in qkv(L=L, S=S, Ev=4))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = st.tiled_sinkhorn(q, k, v, None, None, None, 3, 0.5, tile_bytes=4 * 16 * S)
    out.sum().backward()
    assert saved and max(torch.Size(s).numel() for s in saved) <= 4 * max(L, S) * 4
    assert st.tile_shape(32, 8192, 8192) == (1, 256)  # 8 MiB tiles of whole rows: 256 x 8,192 scores
    assert st.tile_shape(32, 64, 64) == (32, 64)  # short sequences: several slices per tile


def test_selection_rule(monkeypatch):
    cpu = torch.device("cpu")
    assert sk.kernel_path(cpu, 1024, 1024) == "chunked"  # 4 MiB of scores per slice: stays in cache
    assert sk.kernel_path(cpu, 2048, 2048) == "tiled"
    assert sk.kernel_path(cpu, 8192, 8192, dropout_p=0.1) == "chunked"  # dropout: the chunked kernel's mask
    calls = []
    real = sk.tiled_sinkhorn
    monkeypatch.setattr(sk, "tiled_sinkhorn", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v = rand(1, 1, 1500, 2, seed=1), rand(1, 1, 1500, 2, seed=2), rand(1, 1, 1500, 2, seed=3)
    out = sk.sinkhorn_attention(q, k, v, n_iter=3)  # 4 * 1500 * 1500 bytes > 8 MiB: tiled
    assert calls == [1]
    with monkeypatch.context() as m:
        m.setattr(sk, "TILED_MIN_BYTES", 2**62)
        torch.testing.assert_close(out, sk.sinkhorn_attention(q, k, v, n_iter=3), atol=1e-12, rtol=1e-10)
    assert calls == [1]


def test_deterministic_no_nan_and_autocast(monkeypatch):
    monkeypatch.setattr(sk, "TILED_MIN_BYTES", 0)
    monkeypatch.setattr(st, "TILE_BYTES", 4 * 16 * 35)
    q, k, v = qkv(dtype=torch.float32)
    typed, _ = masks(2, 40, 35)["allowed"]  # an empty row and an empty column
    results = []
    for _ in range(2):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        out = attention(*ins, typed, 3)
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad for t in ins])
    for a, b in zip(*results):
        assert torch.isfinite(a).all() and torch.equal(a, b)  # bitwise: a fixed order of every accumulation
    assert (results[0][0][..., 7, :] == 0).all()
    qq = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(qq.bfloat16(), k.bfloat16(), v.bfloat16(), typed, 3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), results[0][0], atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert torch.isfinite(qq.grad).all()


def test_no_host_sync_fullgraph():
    """Traced whole by torch.compile(fullgraph=True): no .item(), no data-dependent branch."""
    q, k, v = (t.reshape(4, *t.shape[2:]) for t in qkv(L=20, S=18, dtype=torch.float32))
    bias = torch.zeros(1, 1, 18).masked_fill(torch.arange(18) >= 15, float("-inf"))
    idx = torch.zeros(4, dtype=torch.long)

    def fn(a, b, c):
        return st.tiled_sinkhorn(a, b, c, bias, idx, None, 3, 0.5, tile_bytes=4 * 16 * 18)

    compiled = torch.compile(fn, fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(q, k, v), fn(q, k, v))


@pytest.mark.parametrize("mask", ["none", "additive"])
def test_sharp_float32_attention_gradients_match_float64(mask, monkeypatch):
    """The tiled backward builds P_{m-1} from P_m by a row or column factor instead of a new exp: with sharp
    attention (rows of scores spread over about 120, so many entries of P underflow in float32) its float32 gradients
    stay as close to the float64 ones as the chunked kernel's, which takes an exp for every P_m."""
    q, k, v = qkv(L=48, S=40)
    q = q * 30.0  # logits of standard deviation about 30: rows spread over about 120, entries of P below exp(-87)
    typed, _ = masks(2, 48, 40)[mask]
    dout = rand(2, 2, 48, 3, seed=8)
    _, want = run("chunked", q, k, v, typed, 3, dout, monkeypatch)
    low = [t.float() for t in (q, k, v)]
    if typed is not None:
        typed = AdditiveMask(typed.bias.float())
    _, tiled = run("tiled", *low, typed, 3, dout.float(), monkeypatch)
    _, chunked = run("chunked", *low, typed, 3, dout.float(), monkeypatch)
    for a, b, ref in zip(tiled, chunked, want):
        assert torch.isfinite(a).all()
        err_tiled = (a.double() - ref).abs().max() / ref.abs().max()
        err_chunked = (b.double() - ref).abs().max() / ref.abs().max()
        assert err_tiled <= 2 * err_chunked + 1e-6, (float(err_tiled), float(err_chunked))
