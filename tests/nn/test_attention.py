"""zoo.nn.SinkhornAttention / SinkhornMultiheadAttention: drop-ins for timm's Attention and torch's
nn.MultiheadAttention (n_iter=1 is the source function), Sinkhorn normalisation against a plain
probability-domain reference, padding, stats and errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from timm.layers import Attention

from zoo.errors import ZooError
from zoo.nn import SinkhornAttention, SinkhornMultiheadAttention, attention_stats


def sinkhorn_reference(scores: torch.Tensor, n_iter: int) -> torch.Tensor:
    """(S1) in the probability domain, float64: alternate row / column normalisations of exp(scores), columns
    to n_rows / n_cols (masked entries at -inf get zero mass)."""
    k = (scores.double() - scores.double().amax(dim=(-1, -2), keepdim=True)).exp()
    L, S = k.shape[-2:]
    for step in range(n_iter):
        if step % 2 == 0:
            k = k / k.sum(-1, keepdim=True)
        else:
            k = k / k.sum(-2, keepdim=True) * (L / S)
    return k


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    if a.shape != b.shape:
        return False
    return a.numel() == 0 or bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def seeded(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------------ timm Attention


TIMM_VARIANTS = {
    "plain": {"qkv_bias": True},
    "qk_norm_scale_norm_gated": {
        "qkv_bias": True,
        "qk_norm": True,
        "scale_norm": True,
        "gated": True,
        "norm_layer": nn.LayerNorm,
    },
    "head_dim": {"attn_head_dim": 5, "dim_out": 12, "proj_bias": False},
}


@pytest.mark.parametrize("variant", TIMM_VARIANTS)
def test_timm_drop_in_same_parameters_and_function_at_one_iteration(variant: str) -> None:
    kwargs = TIMM_VARIANTS[variant]
    torch.manual_seed(0)
    ref = Attention(16, num_heads=4, **kwargs).eval()
    mine = SinkhornAttention(16, num_heads=4, n_iter=1, **kwargs).eval()
    assert {k: v.shape for k, v in mine.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    mine.load_state_dict(ref.state_dict())
    x = seeded(2, 9, 16)
    assert close(mine(x), ref(x))
    # masks: bool (True = attend, SDPA convention) broadcast over heads, additive per head, causal
    allowed = torch.rand(2, 1, 9, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    allowed |= torch.eye(9, dtype=torch.bool)
    additive = seeded(2, 4, 9, 9, seed=2)
    assert close(mine(x, attn_mask=allowed), ref(x, attn_mask=allowed))
    assert close(mine(x, attn_mask=additive), ref(x, attn_mask=additive))
    assert close(mine(x, is_causal=True), ref(x, is_causal=True))
    mine.n_iter = 3
    assert not close(mine(x), ref(x), 1e-3)


def test_timm_sinkhorn_matches_probability_domain_reference() -> None:
    torch.manual_seed(0)
    attn = SinkhornAttention(16, num_heads=2, qkv_bias=True, n_iter=5).eval()
    x = seeded(3, 7, 16)
    q, k, v = attn.qkv(x).reshape(3, 7, 3, 2, 8).permute(2, 0, 3, 1, 4)
    weights = sinkhorn_reference(q @ k.transpose(-1, -2) * attn.scale, 5).float()
    expected = attn.proj((weights @ v).transpose(1, 2).reshape(3, 7, 16))
    assert close(attn(x), expected)


def test_from_timm_reuses_the_parameters_and_mode() -> None:
    ref = Attention(16, num_heads=4, qkv_bias=True)
    ref.eval()
    mine = SinkhornAttention.from_timm(ref, n_iter=3)
    assert mine.qkv is ref.qkv and mine.proj is ref.proj and mine.qkv.weight is ref.qkv.weight
    assert [n for n, _ in mine.named_parameters()] == [n for n, _ in ref.named_parameters()]
    assert not mine.training and mine.n_iter == 3 and mine.num_heads == 4


def test_gradients_flow_through_every_iteration() -> None:
    torch.manual_seed(0)
    attn = SinkhornAttention(16, num_heads=2, n_iter=3)
    x = seeded(2, 5, 16).requires_grad_(True)
    attn(x).square().sum().backward()
    grads = [x.grad, attn.qkv.weight.grad, attn.proj.weight.grad]
    assert all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_record_stats_column_sums_detached_and_closer_to_one_with_more_iterations() -> None:
    torch.manual_seed(0)
    attn = SinkhornAttention(16, num_heads=2, n_iter=1, record_stats=True)
    with torch.no_grad():
        attn.qkv.weight.mul_(2.0)  # peaked scores: softmax columns far from 1
    x = seeded(2, 10, 16)
    attn(x)
    soft = dict(attn.stats)
    assert set(soft) == {"mean", "std", "min", "max", "dev"}
    assert all(t.dim() == 0 and not t.requires_grad for t in soft.values())
    attn.n_iter = 3
    attn(x)
    three = dict(attn.stats)
    attn.n_iter = 21
    out = attn(x)
    assert out.requires_grad  # recording does not detach the output
    assert attn.stats["dev"] < 1e-3 < three["dev"] < soft["dev"]
    assert abs(float(attn.stats["mean"]) - 1.0) < 1e-5
    model = nn.Sequential(attn)
    assert list(attention_stats(model)) == ["0"]


# ------------------------------------------------------------------------------------------------ nn.MultiheadAttention


def mha_pair(n_iter: int = 1, **kwargs) -> tuple[nn.MultiheadAttention, SinkhornMultiheadAttention]:
    torch.manual_seed(0)
    ref = nn.MultiheadAttention(16, 4, **kwargs).eval()
    for p in ref.parameters():  # biases are zero at init: make them count
        nn.init.normal_(p, std=0.3)
    return ref, SinkhornMultiheadAttention.from_torch(ref, n_iter=n_iter)


MHA_CASES = {
    "seq_first": ({}, {}),
    "batch_first": ({"batch_first": True}, {}),
    "bias_kv_zero_attn": ({"add_bias_kv": True, "add_zero_attn": True}, {}),
    "kdim_vdim": ({"kdim": 6, "vdim": 10, "batch_first": True}, {}),
    "no_bias": ({"bias": False}, {}),
    "per_head_weights": ({"batch_first": True}, {"average_attn_weights": False}),
}


@pytest.mark.parametrize("case", MHA_CASES)
def test_mha_drop_in_same_parameters_and_function_at_one_iteration(case: str) -> None:
    ctor, call = MHA_CASES[case]
    ref, mine = mha_pair(**ctor)
    fresh = SinkhornMultiheadAttention(16, 4, **ctor)
    assert list(fresh.state_dict()) == list(ref.state_dict())
    batch_first = ctor.get("batch_first", False)
    L, S, B = 5, 7, 3
    shape = (lambda n, e: (B, n, e)) if batch_first else (lambda n, e: (n, B, e))
    q = seeded(*shape(L, 16), seed=1)
    k = seeded(*shape(S, ctor.get("kdim", 16)), seed=2)
    v = seeded(*shape(S, ctor.get("vdim", 16)), seed=3)
    kpm = torch.zeros(B, S, dtype=torch.bool)
    kpm[1, 4:] = True
    masked = torch.zeros(L, S, dtype=torch.bool)
    masked[:, 2] = True  # torch convention: True = not allowed
    for kwargs in (
        {},
        {"key_padding_mask": kpm},
        {"attn_mask": masked},
        {"key_padding_mask": kpm, "attn_mask": masked},
        {"attn_mask": seeded(B * 4, L, S, seed=4)},
        {"key_padding_mask": kpm.float() * -1e4},
    ):
        out, w = mine(q, k, v, **kwargs, **call)
        ref_out, ref_w = ref(q, k, v, **kwargs, **call)
        assert close(out, ref_out), kwargs
        assert close(w, ref_w), kwargs
    out, w = mine(q, k, v, need_weights=False)
    assert w is None and close(out, ref(q, k, v, need_weights=False)[0])


def test_mha_unbatched_and_causal() -> None:
    ref, mine = mha_pair()
    x = seeded(6, 16)
    assert close(mine(x, x, x)[0], ref(x, x, x)[0])
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    assert close(mine(x, x, x, attn_mask=causal, is_causal=True)[0], ref(x, x, x, attn_mask=causal, is_causal=True)[0])
    assert close(mine(x, x, x, is_causal=True)[0], ref(x, x, x, attn_mask=causal)[0])


def test_mha_self_attention_padding_invariance_at_three_iterations() -> None:
    """Padded tokens get no mass: each sequence of a padded batch gets the result it gets alone."""
    _, mine = mha_pair(n_iter=3, batch_first=True)
    x = seeded(2, 8, 16)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    out, w = mine(x, x, x, key_padding_mask=kpm, average_attn_weights=False)
    alone, w_alone = mine(x[1:, :5], x[1:, :5], x[1:, :5], average_attn_weights=False)
    assert close(out[1, :5], alone[0])
    assert close(w[1, :, :5, :5], w_alone[0])
    assert torch.equal(w[1, :, :, 5:], torch.zeros_like(w[1, :, :, 5:]))
    assert close(w_alone.sum(-1), torch.ones(1, 4, 5))  # 3 half-steps end on rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mha_additive_padding_at_the_dtype_minimum_is_padding(dtype: torch.dtype) -> None:
    """An additive key padding mask whose padded keys hold torch.finfo(dtype).min (Hugging Face's masked value)
    pads as -inf and a bool mask do: each sequence gets the result it gets alone. (As a finite bias, the column
    step renormalised the padded keys' columns and gave them all the mass of the valid queries.)"""
    _, mine = mha_pair(n_iter=3, batch_first=True)
    x = seeded(2, 8, 16)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[1, 5:] = True
    additive = torch.zeros(2, 8, dtype=dtype).masked_fill(kpm, torch.finfo(dtype).min)
    out, w = mine(x, x, x, key_padding_mask=additive, average_attn_weights=False)
    alone, _ = mine(x[1:, :5], x[1:, :5], x[1:, :5])
    assert close(out[1, :5], alone[0])
    assert torch.equal(w[1, :, :, 5:], torch.zeros_like(w[1, :, :, 5:]))
    out_bool, _ = mine(x, x, x, key_padding_mask=kpm)
    assert torch.equal(out, out_bool)


def test_mha_sinkhorn_matches_reference_and_differs_from_softmax() -> None:
    ref, mine = mha_pair(n_iter=3, batch_first=True)
    x = seeded(2, 6, 16)
    out, w = mine(x, x, x, average_attn_weights=False)
    q, k, v = nn.functional.linear(x, ref.in_proj_weight, ref.in_proj_bias).chunk(3, dim=-1)
    q, k, v = (t.reshape(2, 6, 4, 4).transpose(1, 2) for t in (q, k, v))
    expected_w = sinkhorn_reference(q @ k.transpose(-1, -2) / 2.0, 3).float()
    assert close(w, expected_w)
    expected = ref.out_proj((expected_w @ v).transpose(1, 2).reshape(2, 6, 16))
    assert close(out, expected)
    assert not close(out, ref(x, x, x)[0], 1e-3)


def test_encoder_layer_fast_path_does_not_bypass_sinkhorn() -> None:
    """nn.TransformerEncoderLayer's fused kernel (eval, no grad) reads the weights and never calls self_attn."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    softmax_layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True).eval()
    softmax_layer.load_state_dict(layer.state_dict())
    layer.self_attn = SinkhornMultiheadAttention.from_torch(layer.self_attn, n_iter=3)
    x = seeded(2, 6, 16)
    with torch.no_grad():
        fast = layer(x)
        soft = softmax_layer(x)
    assert close(fast, layer(x))  # with grad enabled: the slow path, which calls the module
    assert not close(fast, soft, 1e-3)


def test_mha_record_stats_with_padding() -> None:
    _, mine = mha_pair(n_iter=1, batch_first=True)
    mine.record_stats = True
    x = seeded(2, 8, 16)
    kpm = torch.zeros(2, 8, dtype=torch.bool)
    kpm[0, 6:] = True
    out, w = mine(x, x, x, key_padding_mask=kpm, need_weights=False)
    assert w is None and set(mine.stats) == {"mean", "std", "min", "max", "dev"}
    assert torch.isfinite(torch.stack(list(mine.stats.values()))).all()
    assert abs(float(mine.stats["mean"]) - 1.0) < 1e-5  # rows sum to 1 over valid keys and queries


@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("record_stats", [False, True])
def test_empty_batch_or_sequence_gives_the_source_modules_result(n_iter: int, record_stats: bool) -> None:
    """An empty batch, an empty sequence, and (MHA) cross-attention to no key: the source module's output and
    gradients (empty, or the zero attention plus out_proj's bias for no key), for n_iter > 1 too (raised before)."""
    torch.manual_seed(0)
    ref = Attention(16, num_heads=4, qkv_bias=True)
    mine = SinkhornAttention.from_timm(ref, n_iter=n_iter, record_stats=record_stats)
    for shape in [(0, 5, 16), (2, 0, 16)]:
        x = seeded(*shape)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out, expected = mine(xa), ref(xb)
        assert out.shape == expected.shape and torch.equal(out, expected)
        out.sum().backward()
        expected.sum().backward()
        assert xa.grad.shape == xb.grad.shape == shape
    ref_mha, mha = mha_pair(n_iter=n_iter, batch_first=True)
    mha.record_stats = record_stats
    for q_shape, kv_shape, kpm in [
        ((0, 5, 16), (0, 5, 16), True),
        ((2, 0, 16), (2, 0, 16), True),
        ((2, 5, 16), (2, 0, 16), False),
        ((2, 5, 16), (2, 0, 16), True),
    ]:
        kw = {"key_padding_mask": torch.zeros(kv_shape[:2], dtype=torch.bool)} if kpm else {}
        q, kv = seeded(*q_shape, seed=1), seeded(*kv_shape, seed=2)
        leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
        ref_leaves = [q.clone().requires_grad_(), kv.clone().requires_grad_()]
        out, w = mha(leaves[0], leaves[1], leaves[1], **kw)
        expected, expected_w = ref_mha(ref_leaves[0], ref_leaves[1], ref_leaves[1], **kw)
        assert out.shape == expected.shape and w.shape == expected_w.shape
        assert close(out, expected)
        params = [mha.in_proj_weight, mha.out_proj.weight, mha.out_proj.bias]
        grads = torch.autograd.grad(out.square().sum(), leaves + params)
        ref_grads = torch.autograd.grad(expected.square().sum(), ref_leaves + params)
        for g, r in zip(grads, ref_grads):
            assert g.shape == r.shape and close(g, r)
        if record_stats:
            assert set(mha.stats) == {"mean", "std", "min", "max", "dev"}


def test_mha_training_with_padding_and_weights_backpropagates() -> None:
    """Training mode, key padding, need_weights=True (torch's default): the weights path (plain autograd) gives
    finite gradients equal to need_weights=False's (an in-place nan_to_num broke its backward before)."""
    _, mine = mha_pair(n_iter=3, batch_first=True)
    mine.train()
    x = seeded(2, 6, 16)
    kpm = torch.zeros(2, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    grads = []
    for need_weights in (True, False):
        xx = x.clone().requires_grad_()
        out, _ = mine(xx, xx, xx, key_padding_mask=kpm, need_weights=need_weights)
        grads.append(torch.autograd.grad(out.square().sum(), [xx, mine.in_proj_weight]))
    for a, b in zip(*grads):
        assert torch.isfinite(a).all() and close(a, b)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "3"])
def test_bad_n_iter_is_one_clear_error(bad: object) -> None:
    for build in (
        lambda: SinkhornAttention(16, num_heads=2, n_iter=bad),
        lambda: SinkhornMultiheadAttention(16, 2, n_iter=bad),
    ):
        with pytest.raises(ZooError, match=r"n_iter must be an integer >= 1"):
            build()


def test_nested_tensor_input_is_refused_with_the_fix() -> None:
    _, mine = mha_pair(batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(3, 16), torch.randn(5, 16)])
    with pytest.raises(ZooError, match="enable_nested_tensor=False"):
        mine(nested, nested, nested)


# ------------------------------------------------------------------------------------------------ export


def test_sinkformer_vit_exports_with_a_dynamic_batch() -> None:
    """torch.export of a Sinkformer ViT with a dynamic batch dim (the Sinkhorn kernel's chunk loop used to specialise
    it to the example's size): the exported program gives the eager logits at other batch sizes."""
    import zoo

    torch.manual_seed(0)
    model = zoo.sinkformer_vit_tiny_patch16_224(
        img_size=16, patch_size=8, depth=1, embed_dim=32, num_heads=2, num_classes=3
    ).eval()
    batch = torch.export.Dim("batch", min=2, max=64)
    exported = torch.export.export(model, (torch.randn(4, 3, 16, 16),), dynamic_shapes=({0: batch},))
    for b in (2, 5):
        x = torch.randn(b, 3, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(exported.module()(x), model(x), rtol=1e-5, atol=1e-5)
