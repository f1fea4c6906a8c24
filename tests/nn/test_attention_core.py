"""The Sinkhorn attention classes share one core (zoo.nn.attention.SinkhornCore): the translation attention (fairseq's
parameter names) computes what zoo.nn.SinkhornMultiheadAttention (torch's) computes with the same weights."""

import pytest
import torch

from zoo.models.translation import MultiheadAttention
from zoo.nn import SinkhornAttention, SinkhornMultiheadAttention
from zoo.nn.attention import SinkhornCore


def _pair(n_iter, record_stats=False):
    torch.manual_seed(0)
    fs = MultiheadAttention(8, 2, n_iter=n_iter, record_stats=record_stats).double()
    pt = SinkhornMultiheadAttention(8, 2, batch_first=True, n_iter=n_iter, record_stats=record_stats).double()
    with torch.no_grad():
        pt.in_proj_weight.copy_(torch.cat([fs.q_proj.weight, fs.k_proj.weight, fs.v_proj.weight]))
        pt.in_proj_bias.copy_(torch.cat([fs.q_proj.bias, fs.k_proj.bias, fs.v_proj.bias]))
        pt.out_proj.weight.copy_(fs.out_proj.weight)
        pt.out_proj.bias.copy_(fs.out_proj.bias)
    return fs, pt


def test_every_attention_class_is_built_on_the_core():
    fs, pt = _pair(3)
    assert isinstance(fs, SinkhornCore) and isinstance(pt, SinkhornCore)
    assert isinstance(SinkhornAttention(8, num_heads=2), SinkhornCore)
    assert {"q_proj.weight", "k_proj.weight", "v_proj.weight", "out_proj.weight"} <= set(fs.state_dict())


@pytest.mark.parametrize("n_iter", [1, 3])
@pytest.mark.parametrize("cross", [False, True])
def test_translation_attention_equals_torch_style_sinkhorn_attention(n_iter, cross):
    """Self-attention: padded queries out of the marginals (n_iter > 1); cross-attention of equal lengths: every
    query kept (the source padding is not the target's)."""
    fs, pt = _pair(n_iter, record_stats=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 8, generator=g, dtype=torch.float64)
    y = torch.randn(2, 5, 8, generator=g, dtype=torch.float64) if cross else x
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out = fs(x, y if cross else None, key_padding_mask=pad)
    ref = pt(x, y, y, key_padding_mask=pad, need_weights=False)[0]
    torch.testing.assert_close(out, ref)
    for key in ("mean", "dev"):
        torch.testing.assert_close(fs.stats[key], pt.stats[key])
