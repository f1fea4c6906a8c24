"""The typed attention masks (zoo.ops.masks) and the attention entry point zoo.ops.sinkhorn.attention."""

import pytest
import torch
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.ops import (
    AdditiveMask,
    AllowedMask,
    BlockedMask,
    CausalMask,
    PaddingMask,
    attention,
    sinkhorn_attention,
)
from zoo.ops.masks import resolve


def qkv(B=2, H=3, L=5, S=5, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(B, H, L, E, generator=g, dtype=torch.float64),
        torch.randn(B, H, S, E, generator=g, dtype=torch.float64),
        torch.randn(B, H, S, E, generator=g, dtype=torch.float64),
    )


def naive_sinkhorn(q, k, v, n_iter, allowed):
    """Half-steps on the materialised kernel K = exp(C) * allowed (rows first), out = K v (odd n_iter)."""
    K = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).exp() * allowed
    for step in range(n_iter):
        dim = -1 if step % 2 == 0 else -2
        K = K / K.sum(dim, keepdim=True).clamp_min(1e-300)
    return K @ v


@pytest.mark.parametrize("n_iter", [1, 3])
def test_causal_blocked_allowed_additive_are_the_same_mask(n_iter):
    q, k, v = qkv()
    allowed = torch.ones(5, 5, dtype=torch.bool).tril()
    additive = torch.zeros(5, 5, dtype=torch.float64).masked_fill(~allowed, float("-inf"))
    outs = [
        attention(q, k, v, m, n_iter)
        for m in (CausalMask(), AllowedMask(allowed), BlockedMask(~allowed), AdditiveMask(additive))
    ]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=0, atol=0)
    torch.testing.assert_close(outs[0], naive_sinkhorn(q, k, v, n_iter, allowed.double()))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.float16])
@pytest.mark.parametrize("n_iter", [1, 3])
def test_additive_mask_at_the_dtype_minimum_is_not_allowed(dtype, n_iter):
    """torch.finfo(dtype).min, Hugging Face's "masked" value, blocks an entry as -inf does: the Sinkhorn column step
    must not renormalise those entries into mass (the naive reference on the bool mask), and n_iter = 1 stays SDPA."""
    q, k, v = qkv()
    allowed = torch.ones(5, 5, dtype=torch.bool)
    allowed[:, 3:] = False  # two keys blocked for every query: columns of nothing but the minimum
    allowed[0, 1] = False
    hf = torch.zeros(5, 5, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min)
    out = sinkhorn_attention(q, k, v, n_iter, attn_mask=hf)
    torch.testing.assert_close(out, sinkhorn_attention(q, k, v, n_iter, attn_mask=allowed), rtol=0, atol=0)
    torch.testing.assert_close(out, naive_sinkhorn(q, k, v, n_iter, allowed.double()))
    if n_iter == 1:
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=hf.double())
        torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_n_iter_1_is_sdpa_with_key_padding_and_no_query_default():
    """attention() marks only the queries a PaddingMask names: keys padded alone is SDPA with a key mask."""
    q, k, v = qkv()
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = attention(q, k, v, PaddingMask(keys=pad), 1)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=~pad[:, None, None, :])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    both = attention(q, k, v, PaddingMask(keys=pad, queries=pad), 1)
    torch.testing.assert_close(both, ref.masked_fill(pad[:, None, :, None], 0.0), rtol=0, atol=0)


@pytest.mark.parametrize("n_iter", [1, 2, 3])
def test_combined_mask_equals_the_legacy_tensor_arguments(n_iter):
    q, k, v = qkv()
    g = torch.Generator().manual_seed(1)
    allowed = torch.rand(5, 5, generator=g) > 0.3
    bias = torch.randn(2, 1, 5, 5, generator=g, dtype=torch.float64)
    pad = torch.tensor([[False] * 5, [False, False, False, False, True]])
    mask = PaddingMask(pad, pad) & AllowedMask(allowed) & AdditiveMask(bias)
    out, w = attention(q, k, v, mask, n_iter, return_weights=True)
    legacy_bias = bias.masked_fill(~allowed, float("-inf"))
    ref, w_ref = sinkhorn_attention(q, k, v, n_iter, attn_mask=legacy_bias, key_padding_mask=pad, return_weights=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref, rtol=0, atol=0)
    assert (w[..., ~allowed] == 0).all() and (w[1, :, :, 4] == 0).all() and (w[1, :, 4, :] == 0).all()


def test_pad_keys_adds_a_visible_key_column():
    allowed = torch.ones(3, 3, dtype=torch.bool).tril()
    lead = torch.Size([2, 1])
    for mask in (CausalMask(), AllowedMask(allowed), BlockedMask(~allowed)):
        dense = resolve(mask.pad_keys(1), lead, 3, 4, torch.device("cpu")).dense
        torch.testing.assert_close(dense, torch.cat([allowed, torch.ones(3, 1, dtype=torch.bool)], -1))
    pad = torch.tensor([[False, False, True], [False, False, False]])
    keys = resolve(PaddingMask(pad).pad_keys(1), lead, 3, 4, torch.device("cpu")).keys
    assert keys.shape == (2, 1, 1, 4) and keys[0, 0, 0].tolist() == [False, False, True, False]
    bias = resolve(AdditiveMask(torch.ones(3, 3)).pad_keys(1), lead, 3, 4, torch.device("cpu")).dense
    assert bias[:, :3].eq(1).all() and bias[:, 3].eq(0).all()


@pytest.mark.parametrize(
    "mask,match",
    [
        (AllowedMask(torch.ones(4, 5, dtype=torch.bool)), "does not broadcast"),
        (AllowedMask(torch.ones(5, 5)), "must have dtype torch.bool"),
        (AdditiveMask(torch.ones(5, 5, dtype=torch.long)), "additive float"),
        (PaddingMask(keys=torch.zeros(2, 4, dtype=torch.bool)), "key_padding_mask must be a bool tensor"),
        (PaddingMask(queries=torch.zeros(2, 5)), "query_padding_mask must be a bool tensor"),
    ],
)
def test_bad_masks_raise_one_clear_error(mask, match):
    q, k, v = qkv()
    with pytest.raises(ZooError, match=match):
        attention(q, k, v, mask, 3)
