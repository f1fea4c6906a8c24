"""zoo.ops.sinkhorn_attention against SDPA (n_iter=1) and a literal float64 Sinkhorn (S1) written here."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

import zoo.ops.sinkhorn as sk
import zoo.ops.sinkhorn_tiled as sk_tiled
from zoo.errors import ZooError
from zoo.ops import attention_column_sums, column_sum_stats, sinkhorn_attention


def naive_sinkhorn(q, k, v, n_iter, allowed=None, scale=None):
    """(S1) in float64: alternate rownorm / colnorm of exp(C) * allowed; columns to n_rows / n_cols."""
    q, k, v = q.double(), k.double(), v.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    K = torch.exp(scale * q @ k.transpose(-1, -2))
    if allowed is not None:
        K = K * allowed.double()
    n_rows = (K.sum(-1) > 0).sum(-1)[..., None, None].double()
    n_cols = (K.sum(-2) > 0).sum(-1)[..., None, None].double()
    for step in range(1, n_iter + 1):
        if step % 2 == 1:
            K = K / K.sum(-1, keepdim=True).clamp_min(1e-300)
        else:
            K = K / K.sum(-2, keepdim=True).clamp_min(1e-300) * n_rows / n_cols
    return K @ v, K


def rand(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype)


def qkv(B=2, H=3, L=7, S=7, E=8, Ev=5, dtype=torch.float32):
    return (
        rand(B, H, L, E, dtype=dtype, seed=1),
        rand(B, H, S, E, dtype=dtype, seed=2),
        rand(B, H, S, Ev, dtype=dtype, seed=3),
    )


def padding(B, S, lengths):
    return torch.arange(S)[None, :] >= torch.tensor(lengths)[:, None]


# ------------------------------------------------------------------------------------------------ n_iter = 1


@pytest.mark.parametrize("mask", ["none", "bool", "float", "causal", "key_padding", "bool+key_padding"])
def test_one_half_step_is_sdpa(mask):
    q, k, v = qkv(L=6, S=6)
    kw, ref_kw = {}, {}
    if mask in ("bool", "bool+key_padding"):
        m = rand(6, 6, seed=5) > -0.5
        m[:, 0] = True
        kw["attn_mask"] = ref_kw["attn_mask"] = m
    if mask == "float":
        kw["attn_mask"] = ref_kw["attn_mask"] = rand(2, 1, 6, 6, seed=6)
    if mask == "causal":
        kw["attn_mask"] = ref_kw["attn_mask"] = torch.ones(6, 6, dtype=torch.bool).tril()
    rows = slice(None)
    if "key_padding" in mask:
        kpm = padding(2, 6, [6, 4])
        kw["key_padding_mask"] = kpm
        valid = ~kpm[:, None, None, :]
        ref_kw["attn_mask"] = valid if "attn_mask" not in ref_kw else ref_kw["attn_mask"] & valid
        rows = slice(0, 4)  # query rows valid in both sequences
    out = sinkhorn_attention(q, k, v, n_iter=1, **kw)
    ref = F.scaled_dot_product_attention(q, k, v, **ref_kw)
    torch.testing.assert_close(out[..., rows, :], ref[..., rows, :])
    out_w, w = sinkhorn_attention(q, k, v, n_iter=1, return_weights=True, **kw)
    torch.testing.assert_close(out_w[..., rows, :], ref[..., rows, :], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1)[..., rows], torch.ones_like(w.sum(-1)[..., rows]))


# ------------------------------------------------------------------------------------------------ Sinkhorn values


@pytest.mark.parametrize("n_iter", [2, 3, 4, 5])
@pytest.mark.parametrize("L,S", [(7, 7), (5, 9), (9, 4)])
def test_matches_naive_sinkhorn(n_iter, L, S):
    q, k, v = qkv(L=L, S=S)
    ref, ref_w = naive_sinkhorn(q, k, v, n_iter)
    out = sinkhorn_attention(q, k, v, n_iter=n_iter)
    torch.testing.assert_close(out, ref.float(), atol=2e-5, rtol=1e-4)
    out64, w = sinkhorn_attention(q.double(), k.double(), v.double(), n_iter=n_iter, return_weights=True)
    torch.testing.assert_close(out64, ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(w, ref_w, atol=1e-12, rtol=1e-10)


def test_doubly_stochastic_after_21_half_steps():
    q, k, v = qkv(L=6, S=10)
    _, w = sinkhorn_attention(q, k, v, n_iter=21, return_weights=True)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 6), atol=1e-4, rtol=0)
    torch.testing.assert_close(w.sum(-2), torch.full((2, 3, 10), 6 / 10), atol=1e-4, rtol=0)
    stats = column_sum_stats(w)
    assert float(stats["dev"]) < 1e-3 and abs(float(stats["mean"]) - 1) < 1e-4
    # softmax is not doubly stochastic: the diagnostic sees it
    _, w1 = sinkhorn_attention(q, k, v, n_iter=1, return_weights=True)
    assert float(column_sum_stats(w1)["dev"]) > 0.05


def test_doubly_stochastic_with_padding_valid_tokens_only():
    q, k, v = qkv(L=8, S=8)
    kpm = padding(2, 8, [8, 5])
    _, w = sinkhorn_attention(q, k, v, n_iter=21, key_padding_mask=kpm, return_weights=True)
    rows = w.sum(-1)
    torch.testing.assert_close(rows[0], torch.ones(3, 8), atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[1, :, :5], torch.ones(3, 5), atol=1e-4, rtol=0)
    assert (w[1, :, 5:, :] == 0).all() and (w[1, :, :, 5:] == 0).all()
    torch.testing.assert_close(w[1].sum(-2)[:, :5], torch.ones(3, 5), atol=1e-4, rtol=0)
    cols = attention_column_sums(w, key_padding_mask=kpm)
    torch.testing.assert_close(cols[1, :, :5], torch.ones(3, 5), atol=1e-4, rtol=0)
    assert torch.isnan(cols[1, :, 5:]).all()


@pytest.mark.parametrize("n_iter", [2, 3, 5])
def test_padded_batch_equals_each_sequence_alone(n_iter):
    q, k, v = qkv(B=3, L=8, S=8)
    lengths = [8, 5, 2]
    kpm = padding(3, 8, lengths)
    out = sinkhorn_attention(q, k, v, n_iter=n_iter, key_padding_mask=kpm)
    for b, n in enumerate(lengths):
        alone = sinkhorn_attention(q[b : b + 1, :, :n], k[b : b + 1, :, :n], v[b : b + 1, :, :n], n_iter=n_iter)
        torch.testing.assert_close(out[b : b + 1, :, :n], alone, atol=1e-5, rtol=1e-5)
        assert (out[b, :, n:] == 0).all()  # padded queries: zero rows
        ref, _ = naive_sinkhorn(q[b, :, :n], k[b, :, :n], v[b, :, :n], n_iter)
        torch.testing.assert_close(out[b, :, :n], ref.float(), atol=2e-5, rtol=1e-4)


def test_cross_attention_query_padding():
    q, k, v = qkv(B=2, L=6, S=9)
    kpm, qpm = padding(2, 9, [9, 7]), padding(2, 6, [4, 6])
    out = sinkhorn_attention(q, k, v, n_iter=3, key_padding_mask=kpm, query_padding_mask=qpm)
    for b, (nq, nk) in enumerate([(4, 9), (6, 7)]):
        alone = sinkhorn_attention(q[b, :, :nq], k[b, :, :nk], v[b, :, :nk], n_iter=3)
        torch.testing.assert_close(out[b, :, :nq], alone, atol=1e-5, rtol=1e-5)
        assert (out[b, :, nq:] == 0).all()


@pytest.mark.parametrize("n_iter", [3, 4])
def test_masks_are_sinkhorn_on_the_masked_kernel(n_iter):
    q, k, v = qkv(L=6, S=6)
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    ref, _ = naive_sinkhorn(q, k, v, n_iter, allowed=causal)
    torch.testing.assert_close(
        sinkhorn_attention(q, k, v, n_iter=n_iter, attn_mask=causal), ref.float(), atol=2e-5, rtol=1e-4
    )
    additive = torch.zeros(6, 6).masked_fill(~causal, float("-inf"))
    torch.testing.assert_close(
        sinkhorn_attention(q, k, v, n_iter=n_iter, attn_mask=additive), ref.float(), atol=2e-5, rtol=1e-4
    )
    # a finite additive bias multiplies the kernel by exp(bias)
    bias = rand(6, 6, seed=9)
    ref_b, _ = naive_sinkhorn(q, k, v, n_iter, allowed=torch.exp(bias))
    torch.testing.assert_close(
        sinkhorn_attention(q, k, v, n_iter=n_iter, attn_mask=bias), ref_b.float(), atol=2e-5, rtol=1e-4
    )


def test_fully_masked_rows_and_columns_give_no_nan():
    q, k, v = qkv(L=5, S=6)
    m = torch.ones(5, 6, dtype=torch.bool)
    m[2, :] = False  # empty row
    m[:, 4] = False  # empty column
    for n_iter in (1, 2, 3):
        qq, kk, vv = (t.clone().requires_grad_() for t in (q, k, v))
        out = sinkhorn_attention(qq, kk, vv, n_iter=n_iter, attn_mask=m)
        assert torch.isfinite(out).all() and (out[..., 2, :] == 0).all()
        out.square().sum().backward()
        assert all(torch.isfinite(t.grad).all() for t in (qq, kk, vv))
        ref, _ = naive_sinkhorn(q, k, v, n_iter, allowed=m)
        torch.testing.assert_close(out.detach(), ref.float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("n_iter", [1, 2, 3, 4])
@pytest.mark.parametrize("mask", ["attn_mask", "key_padding"])
def test_weights_path_backward_with_masks_equals_the_kernel(mask, n_iter):
    """return_weights=True (plain autograd) with masks, empty rows and columns included: finite gradients equal to
    the custom kernel's (n_iter > 1) or SDPA's (n_iter = 1); it raised an in-place modification error before."""
    q, k, v = qkv(L=5, S=6, dtype=torch.float64)
    if mask == "attn_mask":
        m = torch.ones(5, 6, dtype=torch.bool)
        m[2, :] = False  # empty row
        m[:, 4] = False  # empty column
        kw = {"attn_mask": m}
    else:
        kw = {"key_padding_mask": padding(2, 6, [6, 3]), "query_padding_mask": padding(2, 5, [5, 2])}
    a = [t.clone().requires_grad_() for t in (q, k, v)]
    b = [t.clone().requires_grad_() for t in (q, k, v)]
    out, w = sinkhorn_attention(*a, n_iter=n_iter, return_weights=True, **kw)
    ref = sinkhorn_attention(*b, n_iter=n_iter, **kw)
    torch.testing.assert_close(out, ref)
    dout = rand(*out.shape, dtype=torch.float64, seed=7)
    ga = torch.autograd.grad((out * dout).sum(), a, retain_graph=True)
    gb = torch.autograd.grad((ref * dout).sum(), b)
    for x, y in zip(ga, gb):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y)
    assert torch.isfinite(torch.autograd.grad(w.square().sum(), a[0])[0]).all()


# ------------------------------------------------------------------------------------------------ shapes, dtypes


def test_leading_dims_single_and_none():
    q, k, v = qkv(B=1, H=1, L=5, S=6)
    ref, _ = naive_sinkhorn(q, k, v, 3)
    torch.testing.assert_close(sinkhorn_attention(q, k, v), ref.float(), atol=2e-5, rtol=1e-4)  # batch*heads = 1
    torch.testing.assert_close(sinkhorn_attention(q[0], k[0], v[0]), ref[0].float(), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(sinkhorn_attention(q[0, 0], k[0, 0], v[0, 0]), ref[0, 0].float(), atol=2e-5, rtol=1e-4)
    # (B, L, E) with key padding: the mask's B is the first leading dim
    q3, k3, v3 = (t[:, 0] for t in qkv(L=6, S=6))
    kpm = padding(2, 6, [6, 3])
    out = sinkhorn_attention(q3, k3, v3, key_padding_mask=kpm)
    torch.testing.assert_close(out[1, :3], sinkhorn_attention(q3[1, :3], k3[1, :3], v3[1, :3]), atol=1e-5, rtol=1e-5)


EMPTY_SHAPES = {"batch": (0, 2, 3, 4), "heads": (2, 0, 3, 4), "queries": (2, 2, 0, 4), "keys": (2, 2, 3, 0)}


def empty_case_masks(mask, B, L, S):
    """(kwargs for sinkhorn_attention, attn_mask for SDPA) of one mask kind on an empty shape."""
    if mask == "bool":
        m = torch.ones(L, S, dtype=torch.bool)
        return {"attn_mask": m}, m
    if mask == "float":
        m = torch.zeros(B, 1, L, S)
        return {"attn_mask": m}, m
    if mask == "key_padding":
        kpm = torch.zeros(B, S, dtype=torch.bool)
        return {"key_padding_mask": kpm}, ~kpm[:, None, None, :]
    if mask == "query_padding":
        return {"query_padding_mask": torch.zeros(B, L, dtype=torch.bool)}, None
    return {}, None


@pytest.mark.parametrize("n_iter", [1, 2, 3])
@pytest.mark.parametrize("mask", ["none", "bool", "float", "key_padding", "query_padding"])
@pytest.mark.parametrize("empty", EMPTY_SHAPES)
def test_empty_dimensions_give_what_sdpa_gives(empty, mask, n_iter):
    """No batch, head, query or key: SDPA's output (empty, or zero rows when S = 0) and SDPA's gradients, for
    every n_iter (raised ZeroDivisionError / ValueError for n_iter > 1), with and without the weights."""
    B, H, L, S = EMPTY_SHAPES[empty]
    q, k, v = rand(B, H, L, 4, seed=1), rand(B, H, S, 4, seed=2), rand(B, H, S, 5, seed=3)
    kw, sdpa_mask = empty_case_masks(mask, B, L, S)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, attn_mask=sdpa_mask)
    dout = rand(*ref.shape, seed=4)
    ref_grads = torch.autograd.grad((ref * dout).sum(), leaves)
    assert ref.shape == (B, H, L, 5)
    for return_weights in (False, True):
        mine = [t.clone().requires_grad_() for t in (q, k, v)]
        out = sinkhorn_attention(*mine, n_iter=n_iter, return_weights=return_weights, **kw)
        if return_weights:
            out, w = out
            assert w.shape == (B, H, L, S) and w.dtype == q.dtype
        assert out.shape == ref.shape and out.dtype == ref.dtype
        assert torch.equal(out, ref.detach())  # empty, or exact zeros (an empty sum) when S = 0
        grads = torch.autograd.grad((out * dout).sum(), mine)
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape and torch.equal(g, r)


def test_empty_dimensions_with_dropout_bf16_and_embedding_dim_zero():
    for B, H, L, S in EMPTY_SHAPES.values():
        q, k, v = rand(B, H, L, 4), rand(B, H, S, 4), rand(B, H, S, 5)
        out = sinkhorn_attention(q, k, v, n_iter=3, dropout_p=0.5)
        assert out.shape == (B, H, L, 5) and not out.any()
        out = sinkhorn_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), n_iter=2)
        assert out.dtype == torch.bfloat16 and out.shape == (B, H, L, 5) and not out.any()
    # E = 0: every score is 0, uniform weights (SDPA: the mean of the values); 1 / sqrt(0) raised before
    q, k, v = rand(2, 3, 4, 0), rand(2, 3, 5, 0), rand(2, 3, 5, 6)
    for n_iter in (1, 2, 3):
        torch.testing.assert_close(sinkhorn_attention(q, k, v, n_iter=n_iter), F.scaled_dot_product_attention(q, k, v))


def test_column_sum_stats_of_empty_weights():
    """No valid column: the statistics of the empty set (mean, std, dev 0; min +inf, max -inf, as with every key
    padded); amin of an empty tensor raised."""
    for shape in [(0, 2, 3, 4), (2, 2, 3, 0)]:
        st = column_sum_stats(torch.zeros(shape))
        assert float(st["mean"]) == 0.0 and float(st["dev"]) == 0.0 and float(st["std"]) == 0.0
        assert float(st["min"]) == float("inf") and float(st["max"]) == float("-inf")


def test_chunking_does_not_change_results(monkeypatch):
    q, k, v = qkv(B=3, H=4, L=6, S=6)
    kpm = padding(3, 6, [6, 4, 2])
    full = sinkhorn_attention(q, k, v, key_padding_mask=kpm)
    monkeypatch.setattr(sk, "_CHUNK_BYTES", 4 * 6 * 6 * 5)  # 5 slices per chunk: 12 = 5 + 5 + 2
    torch.testing.assert_close(sinkhorn_attention(q, k, v, key_padding_mask=kpm), full)


def test_bf16_in_float32_out_bf16():
    q, k, v = qkv(L=16, S=16, E=16)
    ref = sinkhorn_attention(q, k, v)
    out = sinkhorn_attention(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    qq = q.bfloat16().requires_grad_()
    sinkhorn_attention(qq, k.bfloat16(), v.bfloat16()).float().sum().backward()
    assert qq.grad.dtype == torch.bfloat16 and torch.isfinite(qq.grad.float()).all()


def test_autocast_bf16_cpu():
    q, k, v = qkv(L=16, S=16, E=16)
    ref = sinkhorn_attention(q, k, v)
    qq = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(qq.bfloat16(), k.bfloat16(), v.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, atol=3e-2, rtol=3e-2)
    out.float().sum().backward()
    assert torch.isfinite(qq.grad).all()


@pytest.mark.parametrize("path", ["chunked", "tiled"])
@pytest.mark.parametrize("n_iter", [1, 2, 3])
def test_autocast_output_dtype_is_sdpas_for_every_n_iter(monkeypatch, path, n_iter):
    """Under autocast, float32 inputs give the autocast dtype whatever n_iter (SDPA's dtype at n_iter=1), on the
    chunked and the tiled kernel, with the float32 result up to bf16 rounding (the iterations run in float32);
    float64 inputs stay float64, as autocast leaves them for SDPA."""
    q, k, v = qkv(L=16, S=16, E=16)
    kpm = padding(2, 16, [16, 11])
    ref = sinkhorn_attention(q, k, v, n_iter=n_iter, key_padding_mask=kpm)
    calls = []
    if path == "tiled":  # one slice's 16 x 16 scores above the threshold: the tiled kernel runs
        monkeypatch.setattr(sk, "TILED_MIN_BYTES", 16)
        monkeypatch.setattr(sk, "tiled_sinkhorn", lambda *a: calls.append(1) or sk_tiled.tiled_sinkhorn(*a))
    qq = q.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = sinkhorn_attention(qq, k, v, n_iter=n_iter, key_padding_mask=kpm)
        out64 = sinkhorn_attention(q.double(), k.double(), v.double(), n_iter=n_iter, key_padding_mask=kpm)
    assert out.dtype == torch.bfloat16
    assert out64.dtype == torch.float64
    assert bool(calls) == (path == "tiled" and n_iter > 1)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out64.float(), ref, atol=1e-5, rtol=1e-5)
    out.float().sum().backward()
    assert qq.grad.dtype == torch.float32 and torch.isfinite(qq.grad).all()


def test_dropout_on_final_weights():
    q, k, v = qkv(L=8, S=8)
    plain = sinkhorn_attention(q, k, v)
    torch.manual_seed(0)
    a = sinkhorn_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(0)
    b = sinkhorn_attention(q, k, v, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, plain)
    # dropout is applied to W (unbiased): averaging over draws approaches the plain output
    torch.manual_seed(1)
    mean = torch.stack([sinkhorn_attention(q, k, v, dropout_p=0.5) for _ in range(300)]).mean(0)
    assert (mean - plain).abs().mean() < 0.1 * plain.abs().mean()
    # gradient with dropout: the same mask in forward and backward (checked against autograd on the weights path)
    qq = q.double().requires_grad_()
    torch.manual_seed(2)
    (sinkhorn_attention(qq, k.double(), v.double(), dropout_p=0.3) ** 2).sum().backward()
    g_fn = qq.grad.clone()
    qq.grad = None
    torch.manual_seed(2)
    keep = torch.empty(2 * 3, 8, 8, dtype=torch.bool).bernoulli_(0.7).view(2, 3, 8, 8)
    _, w = sinkhorn_attention(qq, k.double(), v.double(), return_weights=True)
    ((w * keep / 0.7 @ v.double()) ** 2).sum().backward()
    torch.testing.assert_close(g_fn, qq.grad)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("n_iter", [2, 3, 5])
def test_gradcheck(n_iter):
    q, k, v = (t.requires_grad_() for t in qkv(B=1, H=2, L=4, S=5, E=3, Ev=2, dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda a, b, c: sinkhorn_attention(a, b, c, n_iter=n_iter), (q, k, v))


def test_gradcheck_with_padding_and_mask():
    q, k, v = (t.requires_grad_() for t in qkv(B=2, H=1, L=5, S=5, E=3, Ev=2, dtype=torch.float64))
    kpm = padding(2, 5, [5, 3])
    m = torch.ones(5, 5, dtype=torch.bool).tril()
    m[:, 0] = True
    assert torch.autograd.gradcheck(
        lambda a, b, c: sinkhorn_attention(a, b, c, n_iter=3, key_padding_mask=kpm, attn_mask=m), (q, k, v)
    )
    assert torch.autograd.gradcheck(
        lambda a, b, c: sinkhorn_attention(a, b, c, n_iter=4, key_padding_mask=kpm), (q, k, v)
    )


def test_gradients_match_naive_through_every_step():
    q, k, v = qkv(L=6, S=8, dtype=torch.float64)
    grads = []
    for fn in (lambda a, b, c: sinkhorn_attention(a, b, c, n_iter=5), lambda a, b, c: naive_sinkhorn(a, b, c, 5)[0]):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        (fn(*ins) * rand(2, 3, 6, 5, dtype=torch.float64, seed=7)).sum().backward()
        grads.append([t.grad for t in ins])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_no_host_sync_compiles_fullgraph():
    q, k, v = qkv(B=1, H=2, L=4, S=4, E=4, Ev=4)
    kpm = padding(1, 4, [3])
    fn = torch.compile(
        lambda a, b, c: sinkhorn_attention(a, b, c, n_iter=3, key_padding_mask=kpm), fullgraph=True, backend="eager"
    )
    torch.testing.assert_close(fn(q, k, v), sinkhorn_attention(q, k, v, n_iter=3, key_padding_mask=kpm))


@pytest.mark.parametrize("n_iter", [2, 3])
def test_export_with_a_dynamic_batch_runs_every_batch_size(n_iter):
    """torch.export with a dynamic batch dim: under tracing the chunk loop does not specialise the batch (the whole
    batch in one piece), so the exported program gives the eager values at other batch sizes; eager keeps chunking."""

    class Attn(torch.nn.Module):
        def forward(self, q, k, v, kpm):
            return sinkhorn_attention(q, k, v, n_iter=n_iter, key_padding_mask=kpm)

    batch = torch.export.Dim("batch", min=2, max=64)
    q, k, v = qkv(B=4, H=2, L=6, S=6, E=4, Ev=3)
    kpm = padding(4, 6, [6, 5, 3, 2])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(sk, "_CHUNK_BYTES", 4 * 6 * 6 * 3)  # 3 slices per chunk: a loop over chunks in eager
        exported = torch.export.export(Attn(), (q, k, v, kpm), dynamic_shapes=({0: batch},) * 4)
        for b in (3, 5):
            q, k, v = qkv(B=b, H=2, L=6, S=6, E=4, Ev=3)
            kpm = padding(b, 6, [6, 5, 3, 2, 1][:b])
            want = sinkhorn_attention(q, k, v, n_iter=n_iter, key_padding_mask=kpm)
            torch.testing.assert_close(exported.module()(q, k, v, kpm), want)


def test_compile_with_dynamic_shapes_traces_one_graph_for_every_batch_size():
    """A caller's torch.compile(dynamic=True, fullgraph=True): forward and backward trace once for every batch size
    (no chunk loop over the symbolic batch, which specialised and recompiled per size), with the eager values."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    fn = torch.compile(
        lambda a, b, c: sinkhorn_attention(a, b, c, n_iter=3), fullgraph=True, dynamic=True, backend="aot_eager"
    )
    torch._dynamo.reset()
    counters.clear()
    for b in (2, 4, 5):  # no size equal to H (Dynamo's duck sizing would tie them)
        q, k, v = (t.requires_grad_() for t in qkv(B=b, H=3, L=6, S=7, E=4, Ev=5))
        out = fn(q, k, v)
        got = [out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))]
        out = sinkhorn_attention(q, k, v, n_iter=3)
        want = [out.detach(), *torch.autograd.grad(out.square().sum(), (q, k, v))]
        for a, w in zip(got, want):
            torch.testing.assert_close(a, w)
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    torch._dynamo.reset()


def test_compiled_kernels_match_eager():
    """The default torch.compile'd chunk kernels give the eager values (the suite runs them eagerly)."""
    q, k, v = qkv(L=6, S=6)
    kpm = padding(2, 6, [6, 4])
    grads = []
    before = sk._KERNELS.enabled
    try:
        for compiled in (True, False):
            sk.set_compile(compiled)
            ins = [t.clone().requires_grad_() for t in (q, k, v)]
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a failed compilation falls back with a warning: fail instead
                out = sinkhorn_attention(*ins, n_iter=3, key_padding_mask=kpm)
                (out * rand(2, 3, 6, 5, seed=7)).sum().backward()
            assert sk._KERNELS.enabled is compiled
            grads.append([out.detach()] + [t.grad for t in ins])
    finally:
        sk.set_compile(before)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"n_iter": 0}, "n_iter must be an integer >= 1"),
        ({"n_iter": 2.0}, "n_iter must be an integer >= 1"),
        ({"n_iter": True}, "n_iter must be an integer >= 1"),
        ({"attn_mask": torch.ones(7, 6, dtype=torch.bool)}, "attn_mask of shape"),
        ({"attn_mask": torch.ones(7, 7, dtype=torch.long)}, "attn_mask must be bool"),
        ({"key_padding_mask": torch.zeros(2, 6, dtype=torch.bool)}, "key_padding_mask must be a bool tensor"),
        ({"key_padding_mask": torch.zeros(3, 7, dtype=torch.bool)}, "key_padding_mask must be a bool tensor"),
        ({"key_padding_mask": torch.zeros(2, 7)}, "key_padding_mask must be a bool tensor"),
        ({"query_padding_mask": torch.zeros(2, 3, dtype=torch.bool)}, "query_padding_mask must be a bool tensor"),
        ({"dropout_p": 1.0}, "dropout_p"),
    ],
)
def test_bad_arguments(kwargs, match):
    q, k, v = qkv()
    with pytest.raises(ZooError, match=match):
        sinkhorn_attention(q, k, v, **kwargs)


@pytest.mark.parametrize("n_iter", [1, 2, 3])
@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
@pytest.mark.parametrize("which", ["q", "k", "v"])
def test_non_floating_inputs_are_one_clear_error(n_iter, dtype, which):
    """Integer or bool q, k or v: one ZooError naming the dtypes and the fix, for every n_iter (it gave wrong values
    for n_iter > 1 and torch's dtype error for n_iter = 1), with or without return_weights."""
    ins = dict(zip("qkv", qkv()))
    ins[which] = ins[which].to(dtype)
    for weights in (False, True):
        with pytest.raises(ZooError, match=r"q, k, v must be floating point .*convert them"):
            sinkhorn_attention(ins["q"], ins["k"], ins["v"], n_iter=n_iter, return_weights=weights)


def test_bad_shapes():
    q, k, v = qkv()
    with pytest.raises(ZooError, match="same last"):
        sinkhorn_attention(q, k[..., :4], v)
    with pytest.raises(ZooError, match="same length S"):
        sinkhorn_attention(q, k, v[..., :5, :])
    with pytest.raises(ZooError, match="do not broadcast"):
        sinkhorn_attention(q, k[:, :2], v[:, :2])
    with pytest.raises(ZooError, match=r"\(\.\.\., L, E\)"):
        sinkhorn_attention(q[0, 0, 0], k, v)
