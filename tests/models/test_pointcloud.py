"""The point cloud families (zoo/models/pointcloud.py): Set Transformer / Set Sinkformer and Point Cloud
Transformer / Sinkformer. At n_iter=1 the blocks compute torch's attention with the same weights; permutation
invariance (and padding for the Set Transformer); order-independent farthest point sampling; the published PCT
offset-attention; short training runs on the synthetic data; saving and reloading; errors; the recipes.
CPU, random weights, no network."""

from __future__ import annotations

import functools
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import yaml

import zoo
from zoo.data.pointcloud import ModelNet40DataModule, SyntheticPointCloudDataModule
from zoo.errors import ZooError
from zoo.models.pointcloud import (
    MAB,
    PMA,
    OffsetAttention,
    PointCloudTransformer,
    SetTransformer,
    farthest_point_sample,
    knn,
    point_cloud_sinkformer,
    point_cloud_transformer,
    set_sinkformer_modelnet40,
    set_transformer_modelnet40,
)
from zoo.registry import list_models, model_entrypoint
from zoo.tasks.optim import WarmupCosineLR

NAMES = ["point_cloud_sinkformer", "point_cloud_transformer", "set_sinkformer_modelnet40", "set_transformer_modelnet40"]
RECIPES = Path(__file__).resolve().parents[2] / "recipes"
MY_RECIPES = [
    "pointcloud_set_sinkformer_synthetic",
    "pointcloud_pct_synthetic",
    "modelnet40_set_sinkformer",
    "modelnet40_pct",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Small models run several times faster on one thread than on two when the other core is busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def plain(value):
    """Tuples as lists, so that hyperparameters compare with YAML values."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def clouds(b: int = 2, n: int = 64, c: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(b, n, c, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def small_set(**kwargs) -> SetTransformer:
    torch.manual_seed(0)
    return SetTransformer(**{"num_classes": 5, "embed_dim": 16, "num_heads": 2, "num_inducing": 4, **kwargs})


def small_pct(**kwargs) -> PointCloudTransformer:
    torch.manual_seed(0)
    return PointCloudTransformer(
        **{
            "num_classes": 5,
            "embed_dim": 8,
            "sample_points": (32, 16),
            "num_neighbors": 8,
            "depth": 2,
            "fuse_dim": 32,
            "head_dims": (16,),
            **kwargs,
        }
    )


def optimization(model: nn.Module) -> tuple[torch.optim.Optimizer, object]:
    """The optimiser and schedule (None: constant) the model trains with (a plain loop of 10 epochs of 10 steps)."""
    config = model.configure_optimizers(total_steps=100, steps_per_epoch=10)
    if isinstance(config, torch.optim.Optimizer):
        return config, None
    return config["optimizer"], config["lr_scheduler"]["scheduler"]


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random biases, norms and BatchNorm statistics (zero / one initialisations would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.copy_(0.2 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return model


# ------------------------------------------------------------------------------------------------ registry


def test_builders_registered_with_the_published_settings() -> None:
    assert list_models(family="pointcloud") == NAMES
    assert all(model_entrypoint(n).__doc__ for n in NAMES)
    st, sk = set_transformer_modelnet40(), set_sinkformer_modelnet40()
    for m in (st, sk):
        hp = m.hparams
        assert (hp.embed_dim, hp.num_heads, hp.depth, hp.num_inducing, hp.num_seeds, hp.num_classes) == (
            256,
            4,
            2,
            16,
            1,
            40,
        )
        opt, sched = optimization(m)
        assert (type(opt), opt.defaults["lr"], opt.defaults["weight_decay"]) == (torch.optim.Adam, 1e-3, 0.0)
        assert (type(sched), dict(sched.milestones), sched.gamma) == (
            torch.optim.lr_scheduler.MultiStepLR,
            {200: 1},
            0.1,
        )
        assert not {"optimizer", "lr", "lr_scheduler", "scheduler", "milestones"} & set(hp)
        assert len(m.encoder) == 2 and len(m.decoder) == 1 and m.head.out_features == 40
    assert {a.n_iter for a in st.attentions} == {1} and {a.n_iter for a in sk.attentions} == {21}
    assert len(sk.attentions) == 2 * 2 + 1 + 1  # two MABs per ISAB, the PMA, the decoder SAB
    pct, pcs = point_cloud_transformer(), point_cloud_sinkformer()
    for m in (pct, pcs):
        hp = m.hparams
        assert (hp.embed_dim, tuple(hp.sample_points), hp.num_neighbors, hp.depth, hp.fuse_dim) == (
            64,
            (512, 256),
            32,
            4,
            1024,
        )
        opt, sched = optimization(m)
        assert (type(opt), opt.defaults["lr"], opt.defaults["momentum"], opt.defaults["weight_decay"]) == (
            torch.optim.SGD,
            0.01,
            0.9,
            5e-4,
        )
        assert isinstance(sched, WarmupCosineLR) and hp.label_smoothing == 0.2
        assert not {"optimizer", "lr", "momentum", "weight_decay", "scheduler"} & set(hp)
        assert m.channels == 256 and m.fuse[0].in_features == 5 * 256 and m.head.out_features == 40
    assert {b.attention for b in pct.blocks} == {"pct"} and {(b.attention, b.n_iter) for b in pcs.blocks} == {
        ("sinkhorn", 21)
    }
    # the PCT_Pytorch layout (max pooling) has the published 2.88M parameters
    assert round(sum(p.numel() for p in point_cloud_transformer(pooling="max").parameters()) / 1e6, 2) == 2.88


# ------------------------------------------------------------------------------------------------ Set Transformer


def reference_mab(mab: MAB, x: torch.Tensor, y: torch.Tensor, key_padding_mask: torch.Tensor | None = None):
    """MAB with torch's nn.MultiheadAttention loaded with the same weights, LayerNorm and ReLU by hand."""
    attn = mab.attn
    mha = nn.MultiheadAttention(
        attn.embed_dim, attn.num_heads, kdim=attn.kdim, vdim=attn.vdim, batch_first=True, dtype=x.dtype
    )
    mha.load_state_dict(attn.state_dict())
    mha.eval()
    if isinstance(mab.q_embed, nn.Linear):
        x = F.linear(x, mab.q_embed.weight, mab.q_embed.bias)
    dim = attn.embed_dim

    def ln(t, norm):
        return F.layer_norm(t, (dim,), norm.weight, norm.bias, norm.eps) if isinstance(norm, nn.LayerNorm) else t

    h = ln(x + mha(x, y, y, key_padding_mask=key_padding_mask, need_weights=False)[0], mab.norm1)
    return ln(h + F.relu(F.linear(h, mab.ff.weight, mab.ff.bias)), mab.norm2)


def reference_set_transformer(model: SetTransformer, x: torch.Tensor, mask: torch.Tensor | None = None):
    """The whole softmax Set Transformer from reference MABs (eval mode: no dropout)."""
    for isab in model.encoder:
        h = reference_mab(isab.mab0, isab.inducing.expand(x.shape[0], -1, -1), x, mask)
        x = reference_mab(isab.mab1, x, h)
    z = reference_mab(model.pool.mab, model.pool.seeds.expand(x.shape[0], -1, -1), x, mask)
    for sab in model.decoder:
        z = reference_mab(sab.mab, z, z)
    return F.linear(z.flatten(1), model.head.weight, model.head.bias)


@pytest.mark.parametrize("layer_norm", [True, False])
def test_mab_at_one_iteration_is_torch_multihead_attention(layer_norm: bool) -> None:
    torch.manual_seed(0)
    mab = randomize(MAB(3, 5, 16, 4, layer_norm=layer_norm, n_iter=1).double())
    x, y = clouds(2, 7, 3, 1, torch.float64), clouds(2, 9, 5, 2, torch.float64)
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    with torch.no_grad():
        torch.testing.assert_close(mab(x, y), reference_mab(mab, x, y), rtol=0, atol=1e-12)
        torch.testing.assert_close(mab(x, y, mask), reference_mab(mab, x, y, mask), rtol=0, atol=1e-12)
        mab.attn.n_iter = 3
        assert (mab(x, y) - reference_mab(mab, x, y)).abs().max() > 1e-3


def test_set_transformer_at_one_iteration_is_the_softmax_model() -> None:
    model = randomize(small_set(depth=2, num_seeds=2, decoder_depth=1, in_chans=4).double()).eval()
    x = clouds(3, 20, 4, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference_set_transformer(model, x), rtol=0, atol=1e-12)


def test_sinkhorn_pma_with_one_seed_is_mean_pooling() -> None:
    torch.manual_seed(0)
    pma = randomize(PMA(16, 2, num_seeds=1, n_iter=3).double())
    x = clouds(2, 11, 16, dtype=torch.float64)
    mab, attn = pma.mab, pma.mab.attn
    with torch.no_grad():
        w_v, b_v = attn.in_proj_weight.chunk(3)[2], attn.in_proj_bias.chunk(3)[2]
        pooled = attn.out_proj(F.linear(x, w_v, b_v).mean(dim=1, keepdim=True))
        h = mab.norm1(pma.seeds + pooled)
        torch.testing.assert_close(pma(x), mab.norm2(h + F.relu(mab.ff(h))), rtol=0, atol=1e-12)


@pytest.mark.parametrize("n_iter", [1, 21])
def test_set_transformer_is_permutation_invariant_and_ignores_padding(n_iter: int) -> None:
    model = randomize(small_set(n_iter=n_iter, num_seeds=2).double()).eval()
    x = clouds(2, 30, dtype=torch.float64)
    perm = torch.randperm(30, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(model(x[:, perm]), out, rtol=0, atol=1e-12)
        # pad the second cloud with 10 junk points: the same logits
        padded = torch.cat([x, 100 * clouds(2, 10, seed=5, dtype=torch.float64)], dim=1)
        mask = torch.zeros(2, 40, dtype=torch.bool)
        mask[:, 30:] = True
        torch.testing.assert_close(model(padded, padding_mask=mask), out, rtol=0, atol=1e-10)
        # a batch of clouds of different sizes
        mask[1, 20:] = True
        torch.testing.assert_close(model(padded, padding_mask=mask)[1], model(x[1:, :20])[0], rtol=0, atol=1e-10)


def empty_cloud_batch(dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Three clouds of 12 points, padded with junk: the first whole, the second fully padded (an empty cloud), the
    third with 4 padded points."""
    mask = torch.zeros(3, 12, dtype=torch.bool)
    mask[1] = True
    mask[2, 8:] = True
    junk = 100 * clouds(3, 12, seed=5, dtype=dtype)
    return torch.where(mask.unsqueeze(-1), junk, clouds(3, 12, dtype=dtype)), mask


def parameter_grads(
    model: nn.Module, x: torch.Tensor, mask: torch.Tensor, rows: list[int], labels: list[int]
) -> dict[str, torch.Tensor]:
    """Gradients of the summed cross-entropy of the clouds ``rows`` with ``labels``; every parameter has one (None
    would be an unused parameter, which DDP refuses)."""
    model.zero_grad()
    logits = model(x, mask)
    F.cross_entropy(logits[rows], torch.tensor(labels), reduction="sum").backward()
    assert all(p.grad is not None for p in model.parameters())
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("n_iter", [1, 2, 21])
def test_set_transformer_fully_padded_cloud_is_an_empty_set(n_iter: int) -> None:
    model = randomize(small_set(n_iter=n_iter, num_seeds=2).double()).eval()
    x, mask = empty_cloud_batch()
    logits = model(x, mask)
    assert torch.isfinite(logits).all()
    # the empty cloud: zero features, so zero pre-logits and the classifier's bias
    assert torch.equal(model.forward_features(x, mask)[1], torch.zeros(2, 16, dtype=torch.float64))
    assert torch.equal(logits[1], model.head.bias)
    # the others: as alone (same padding), and bit for bit as with a whole cloud in place of the empty one
    for i in (0, 2):
        torch.testing.assert_close(logits[i], model(x[i : i + 1], mask[i : i + 1])[0], rtol=0, atol=1e-12)
    whole, unmasked = x.clone(), mask.clone()
    whole[1], unmasked[1] = clouds(1, 12, seed=7, dtype=torch.float64)[0], False
    assert torch.equal(logits[[0, 2]], model(whole, unmasked)[[0, 2]])
    # the gradient of the other clouds' loss: finite, bit for bit that of the batch with a whole cloud in place of
    # the empty one (whose loss is left out), and that of the batch without it
    grads = parameter_grads(model, x, mask, [0, 2], [0, 2])
    assert all(torch.isfinite(g).all() for g in grads.values())
    same_shape = parameter_grads(model, whole, unmasked, [0, 2], [0, 2])
    assert all(torch.equal(grads[n], same_shape[n]) for n in grads)
    without = parameter_grads(model, x[[0, 2]], mask[[0, 2]], [0, 1], [0, 2])
    torch.testing.assert_close(grads, without, rtol=0, atol=1e-12)
    # the empty cloud's own loss reaches the classifier's bias only: d/db cross_entropy(b, 1) = softmax(b) - e_1
    grads = parameter_grads(model, x, mask, [1], [1])
    expected = model.head.bias.detach().softmax(-1) - F.one_hot(torch.tensor(1), 5)
    torch.testing.assert_close(grads.pop("head.bias"), expected, rtol=0, atol=1e-15)
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())
    # no gradient to the padded points (its points included), whatever the loss
    points = x.clone().requires_grad_(True)
    model(points, mask).sum().backward()
    assert torch.isfinite(points.grad).all() and torch.equal(points.grad[mask], torch.zeros_like(points.grad[mask]))
    assert points.grad[~mask].abs().sum() > 0


def test_set_transformer_empty_cloud_whatever_sdpa_gives_for_a_row_without_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """SDPA's output for a row whose keys are all masked depends on the backend and the version (NaN on some CUDA
    kernels, zeros in the math backend since torch 2.5): with the plain softmax, which gives NaN, an empty cloud
    used to make its own logits and, through 0 * NaN in backward, every parameter gradient NaN."""

    def softmax_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        scores = q @ k.transpose(-2, -1) * (q.shape[-1] ** -0.5 if scale is None else scale)
        if attn_mask is not None:
            scores = (
                scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
            )
        return scores.softmax(-1) @ v

    monkeypatch.setattr(F, "scaled_dot_product_attention", softmax_attention)
    model = randomize(small_set(n_iter=1, num_seeds=2).double()).eval()
    x, mask = empty_cloud_batch()
    logits = model(x, mask)
    assert torch.isfinite(logits).all() and torch.equal(logits[1], model.head.bias)
    grads = parameter_grads(model, x, mask, [0, 2], [0, 2])
    assert all(torch.isfinite(g).all() for g in grads.values())
    torch.testing.assert_close(
        grads, parameter_grads(model, x[[0, 2]], mask[[0, 2]], [0, 1], [0, 2]), rtol=0, atol=1e-12
    )


@pytest.mark.parametrize("n_iter", [1, 3])
def test_set_transformer_empty_cloud_under_autocast_and_torch_compile(n_iter: int) -> None:
    model = randomize(small_set(n_iter=n_iter, num_seeds=2)).eval()
    x, mask = empty_cloud_batch(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x, mask)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert torch.equal(logits[1], model.head.bias.to(torch.bfloat16))
    F.cross_entropy(logits.float(), torch.arange(3)).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    # one graph for every batch (no host read, no data-dependent branch: fullgraph fails on a graph break); the
    # eager backend traces without the minutes of an inductor compile
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    with torch.no_grad():
        logits = model(x, mask)
        torch.testing.assert_close(compiled(x, mask), logits, rtol=0, atol=0)
        torch.testing.assert_close(compiled(x, torch.zeros_like(mask)), model(x), rtol=0, atol=0)
    assert torch.equal(logits[1], model.head.bias)


@pytest.mark.parametrize("n_iter", [1, 21])
@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_set_transformer_padding_values_never_matter(n_iter: int, fill: float) -> None:
    model = randomize(small_set(n_iter=n_iter, num_seeds=2).double()).eval()
    x, mask = empty_cloud_batch()
    logits = model(x, mask)
    bad = x.masked_fill(mask.unsqueeze(-1), fill)
    assert torch.equal(model(bad, mask), logits)
    grads = parameter_grads(model, bad, mask, [0, 1, 2], [0, 1, 2])
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_set_transformer_attention_stats_and_n_iter() -> None:
    model = small_set(n_iter=1, record_stats=True)
    assert model.attention_stats() == {}
    model(clouds())
    stats = model.attention_stats()
    assert "encoder.0.mab0.attn" in stats and "pool.mab.attn" in stats and len(stats) == 6
    model.set_n_iter(21)
    assert {a.n_iter for a in model.attentions} == {21} and model.hparams.n_iter == 21
    model(clouds())
    assert float(model.attention_stats()["encoder.0.mab1.attn"]["dev"]) < 1e-3  # 21 steps: doubly stochastic


# ------------------------------------------------------------------------------------------------ sampling


def test_farthest_point_sampling_is_order_independent_and_deterministic() -> None:
    line = torch.tensor([[float(i), 0.0, 0.0] for i in range(11)]).unsqueeze(0)
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(0))
    for pts in (line, line[:, perm]):
        chosen = pts[0, farthest_point_sample(pts, 5)[0], 0].tolist()
        # 0 and 10 tie as farthest from the centroid 5: the lexicographically first (0) starts; then 10, then 5;
        # then 2, 3, 7, 8 tie at distance 2: 2 (the first); then 7 and 8 tie at distance 2: 7
        assert chosen == [0.0, 10.0, 5.0, 2.0, 7.0]
    x = clouds(3, 100)
    perm = torch.randperm(100, generator=torch.Generator().manual_seed(1))
    a = torch.stack([x[b, i] for b, i in enumerate(farthest_point_sample(x, 20))])
    b = torch.stack([x[:, perm][b, i] for b, i in enumerate(farthest_point_sample(x[:, perm], 20))])
    assert torch.equal(a, b)
    # each new centre is the farthest from the ones before
    for s in range(1, 20):
        d = torch.cdist(x[0], a[0, :s]).amin(dim=1)
        assert torch.isclose(d.max(), torch.cdist(a[0, s : s + 1], a[0, :s]).min())
    first = (x - x.mean(1, keepdim=True)).norm(dim=-1).argmax(-1)
    assert torch.equal(a[:, 0], x[torch.arange(3), first])


def test_knn_is_the_brute_force_neighbourhood() -> None:
    x, c = clouds(2, 50, seed=1), clouds(2, 7, seed=2)
    idx = knn(x, c, 6).sort(-1).values
    ref = torch.cdist(c.double(), x.double()).topk(6, largest=False).indices.sort(-1).values
    assert torch.equal(idx, ref)


# ------------------------------------------------------------------------------------------------ PCT


def reference_sa_layer(layer: OffsetAttention, x: torch.Tensor) -> torch.Tensor:
    """PCT_Pytorch's SA_Layer (channels-first, conv1d weights) with the layer's weights, eval mode."""
    xt = x.transpose(1, 2)  # (B, C, N)
    w_qk = layer.qk.weight.unsqueeze(-1)
    x_q = F.conv1d(xt, w_qk).permute(0, 2, 1)
    x_k = F.conv1d(xt, w_qk)
    x_v = F.conv1d(xt, layer.v.weight.unsqueeze(-1), layer.v.bias)
    attention = torch.softmax(torch.bmm(x_q, x_k), dim=-1)
    attention = attention / (1e-9 + attention.sum(dim=1, keepdim=True))
    x_r = torch.bmm(x_v, attention)
    lin, bn = layer.trans[0], layer.trans[1]
    x_r = F.conv1d(xt - x_r, lin.weight.unsqueeze(-1), lin.bias)
    x_r = F.relu(F.batch_norm(x_r, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps))
    return (xt + x_r).transpose(1, 2)


def test_offset_attention_pct_is_the_published_layer_and_two_sinkhorn_steps() -> None:
    torch.manual_seed(0)
    layer = randomize(OffsetAttention(16, attention="pct").double()).eval()
    x = clouds(2, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), reference_sa_layer(layer, x), rtol=0, atol=1e-12)
        # softmax over keys + L1 over queries with C = Q Q^T symmetric = a column step, then a row step, of exp(C)
        q = layer.qk(x)
        k = torch.bmm(q, q.transpose(1, 2)).exp()
        k = k / k.sum(dim=1, keepdim=True)
        k = k / k.sum(dim=2, keepdim=True)
        layer.record_stats = True
        out = layer(x)
        torch.testing.assert_close(out, x + layer.trans(x - torch.bmm(k, layer.v(x))), rtol=0, atol=1e-9)
        assert set(layer.stats) == {"mean", "std", "min", "max", "dev"}


@pytest.mark.parametrize("n_iter", [1, 5])
def test_offset_attention_sinkhorn(n_iter: int) -> None:
    torch.manual_seed(0)
    layer = randomize(OffsetAttention(16, attention="sinkhorn", n_iter=n_iter).double()).eval()
    x = clouds(2, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        q, v = layer.qk(x), layer.v(x)
        k = torch.bmm(q, q.transpose(1, 2))  # unscaled, as PCT
        for step in range(n_iter):  # rows first
            k = k.log_softmax(dim=-1 if step % 2 == 0 else -2)
        expected = x + layer.trans(x - torch.bmm(k.exp(), v))
        torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("attention, n_iter", [("pct", 1), ("sinkhorn", 1), ("sinkhorn", 21)])
def test_pct_is_permutation_invariant(attention: str, n_iter: int) -> None:
    model = randomize(small_pct(attention=attention, n_iter=n_iter, in_chans=6)).eval()
    x = clouds(2, 64, 6)
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 5)
        torch.testing.assert_close(model(x[:, perm]), out, rtol=0, atol=1e-5)
        assert (model(clouds(2, 64, 6, seed=9)) - out).abs().max() > 1e-4


def test_pct_attention_stats_and_n_iter() -> None:
    model = small_pct(attention="sinkhorn", n_iter=1, record_stats=True)
    model(clouds())
    assert list(model.attention_stats()) == ["blocks.0", "blocks.1"]
    model.set_n_iter(3)
    assert {b.n_iter for b in model.blocks} == {3}
    with pytest.raises(ZooError, match="set_n_iter needs attention='sinkhorn'"):
        small_pct().set_n_iter(3)


# ------------------------------------------------------------------------------------------------ training


def train_and_eval(
    model: pl.LightningModule, epochs: int, tmp_path: Path, per_class: int = 16
) -> tuple[float, float, float]:
    """(train loss before, train loss after, train accuracy after) on 4 synthetic shapes (eval mode)."""
    pl.seed_everything(0, verbose=False)
    data = SyntheticPointCloudDataModule(
        shapes=["sphere", "cube", "torus", "cone"],
        num_points=64,
        train_per_class=per_class,
        val_per_class=4,
        batch_size=16,
    )
    data.setup()
    x, y = data.train_dataset.points, data.train_dataset.labels

    def evaluate() -> tuple[float, float]:
        model.eval()
        with torch.no_grad():
            logits = model(x)
        model.train()
        return F.cross_entropy(logits, y).item(), (logits.argmax(-1) == y).float().mean().item()

    before, _ = evaluate()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=epochs,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, data)
    after, acc = evaluate()
    return before, after, acc


def test_set_sinkformer_learns_the_synthetic_shapes(tmp_path: Path) -> None:
    model = small_set(
        num_classes=4,
        embed_dim=32,
        num_heads=4,
        num_inducing=8,
        layer_norm=False,
        n_iter=5,
        optimizer=functools.partial(torch.optim.Adam, lr=3e-3),
        lr_scheduler=None,
    )
    before, after, acc = train_and_eval(model, 12, tmp_path)
    assert after < 0.8 * before and acc > 0.5, (before, after, acc)  # chance: 0.25


def test_point_cloud_sinkformer_learns_the_synthetic_shapes(tmp_path: Path) -> None:
    model = small_pct(
        num_classes=4,
        attention="sinkhorn",
        n_iter=3,
        optimizer=functools.partial(torch.optim.Adam, lr=2e-3),
        lr_scheduler=None,
        label_smoothing=0.0,
        drop_rate=0.0,
    )
    before, after, acc = train_and_eval(model, 8, tmp_path, per_class=32)  # enough steps for the BatchNorm stats
    assert after < 0.8 * before and acc > 0.5, (before, after, acc)


# ------------------------------------------------------------------------------------------------ timm's protocol


@pytest.mark.parametrize(
    "build, unpooled",
    [(lambda: small_set(num_seeds=2), (2, 2, 16)), (lambda: small_pct(), (2, 16, 32))],
    ids=["set", "pct"],
)
def test_timm_protocol_where_it_applies(build, unpooled: tuple[int, ...], tmp_path: Path) -> None:
    model = randomize(build()).eval()
    x = clouds()
    with torch.no_grad():
        logits = model(x)
        features = model.forward_features(x)  # unpooled: the seeds / the fused per-centre features
        assert features.shape == unpooled
        assert model.num_features == features.shape[-1]  # timm's: the channels of forward_features
        assert torch.equal(model.forward_head(features), logits)
        pre_logits = model.forward_head(features, pre_logits=True)
        assert pre_logits.shape == (2, model.head_hidden_size)
        assert model.head_hidden_size == (16 if isinstance(model, PointCloudTransformer) else 2 * 16)
        torch.testing.assert_close(model.get_classifier()(pre_logits), logits, rtol=0, atol=0)
        model.reset_classifier(0)  # no classifier: forward gives the pre-logits features
        assert isinstance(model.get_classifier(), nn.Identity) and model.num_classes == 0 == model.hparams.num_classes
        torch.testing.assert_close(model(x), pre_logits, rtol=0, atol=0)
        model.reset_classifier(3)
        assert model(x).shape == (2, 3) and model.val_acc.num_classes == 3
    again = type(model).from_pretrained(model.save_pretrained(tmp_path / "m"))  # hparams follow the new head
    assert again.head.out_features == 3 and again.num_classes == 3
    with pytest.raises(ZooError, match="has no global_pool to change"):
        model.reset_classifier(0, "avg")
    cfg = model.pretrained_cfg  # the keys that apply to point clouds: no image size, mean, std, crop
    assert cfg is model.default_cfg and not {"input_size", "mean", "std", "crop_pct", "interpolation"} & set(cfg)
    # the model as it is (timm's rule): its head since reset_classifier(3)
    assert (cfg["num_classes"], cfg["classifier"], cfg["in_chans"]) == (3, "head", 3)
    assert cfg["min_num_points"] == (32 if isinstance(model, PointCloudTransformer) else 1)


def test_builders_without_classifier_and_the_published_configurations() -> None:
    features = set_sinkformer_modelnet40(num_classes=0, embed_dim=32)
    assert features(clouds()).shape == (2, 32) and features.pretrained_cfg["num_classes"] == 0
    published = {
        "set_sinkformer_modelnet40": ({"best": 89.1, "median": 88.4}, "modelnet40_set_sinkformer"),
        "set_transformer_modelnet40": ({"best": 87.8, "median": 86.3}, "modelnet40_set_sinkformer"),
        "point_cloud_sinkformer": ({"median": 92.8}, "modelnet40_pct"),
        "point_cloud_transformer": ({"median": 92.5}, "modelnet40_pct"),
    }  # the Sinkformers paper's numbers
    for name, (accuracy, recipe) in published.items():
        cfg = zoo.get_pretrained_cfg(name)
        assert cfg.source is None and cfg.recipe == recipe and (RECIPES / f"{recipe}.yaml").is_file()
        assert {k.removeprefix("modelnet40/top1_"): m["value"] for k, m in cfg.metrics.items()} == accuracy
        assert all((m["kind"], m["of"]) == ("published", "model") for m in cfg.metrics.values())
        with pytest.raises(
            ZooError, match=f"{name}.sinkformers_paper is a published configuration without weights.*recipe '{recipe}'"
        ):
            zoo.create_model(name, pretrained=True)
    # another architecture than the published one: the published accuracy no longer applies to it
    assert (
        set_sinkformer_modelnet40().pretrained_cfg["metrics"]
        == zoo.get_pretrained_cfg("set_sinkformer_modelnet40").metrics
    )
    assert set_sinkformer_modelnet40(n_iter=3).pretrained_cfg.get("metrics", {}) == {}


# ------------------------------------------------------------------------------------------------ weights


@pytest.mark.parametrize(
    "build", [lambda: small_set(n_iter=3), lambda: small_pct(attention="sinkhorn", n_iter=3)], ids=["set", "pct"]
)
def test_save_and_reload(build, tmp_path: Path) -> None:
    model = randomize(build()).eval()
    x = clouds()
    with torch.no_grad():
        out = model(x)
    saved = model.save_pretrained(tmp_path / "m")
    torch.save(model.state_dict(), tmp_path / "sd.pth")
    cls = type(model)
    for reloaded in (cls.from_pretrained(saved), cls(**dict(model.hparams), weights=str(tmp_path / "sd.pth"))):
        with torch.no_grad():
            torch.testing.assert_close(reloaded.eval()(x), out, rtol=0, atol=0)
    other = cls.from_pretrained(saved, num_classes=7)  # another label set: new classifier
    assert other.head.out_features == 7


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "build, points, message",
    [
        (small_set, clouds(2, 10, 4), r"expects points of shape \(B, N, 3\)"),
        (small_set, torch.randn(10, 3), r"expects points of shape \(B, N, 3\)"),
        (small_pct, clouds(2, 64, 2), r"expects points of shape \(B, N, 3\)"),
        (small_pct, clouds(2, 20), "clouds need at least 32 points, got 20"),
        # a float64 numpy cloud (torch.from_numpy) or integer coordinates: one ZooError naming the cast, not
        # torch's "mat1 and mat2 must have the same dtype" from the first Linear
        (small_set, clouds(2, 10).double(), r"got torch\.float64: give points\.to\(torch\.float32\)"),
        (small_pct, clouds(2, 64).double(), r"got torch\.float64: give points\.to\(torch\.float32\)"),
        (small_set, torch.ones(2, 10, 3, dtype=torch.long), r"floating point coordinates.*got torch\.int64"),
    ],
)
def test_bad_points_are_one_clear_error(build, points: torch.Tensor, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        build()(points)


@pytest.mark.parametrize("num_classes", [3, 5])  # fewer outputs than classes, and more
def test_model_and_data_with_other_numbers_of_classes_are_one_clear_error(num_classes: int, tmp_path: Path) -> None:
    data = SyntheticPointCloudDataModule(
        shapes=["sphere", "cube", "torus", "cone"], num_points=16, train_per_class=2, val_per_class=1, batch_size=4
    )
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path
    )
    with pytest.raises(ZooError, match=r"has 4 classes \(sphere, cube, torus, cone\).*num_classes=4"):
        trainer.fit(small_set(num_classes=num_classes), datamodule=data)
    with pytest.raises(ZooError, match="num_classes=4"):
        trainer.test(small_set(num_classes=num_classes), datamodule=data)


def test_float64_points_run_on_a_float64_model() -> None:
    model = small_set().double()  # the dtype check follows the model's parameters
    assert model(clouds(2, 10).double()).dtype == torch.float64


def test_channels_first_points_get_the_transpose_hint() -> None:
    with pytest.raises(ZooError, match=r"channels first.*points\.transpose\(1, 2\)") as info:
        small_set()(torch.randn(2, 3, 40))
    assert "in_chans=40" not in str(info.value)
    with pytest.raises(ZooError, match=r"points\.unsqueeze\(0\)"):
        small_set()(torch.randn(10, 3))
    with pytest.raises(ZooError, match="in_chans=4"):  # neither layout fits: another model
        small_set()(clouds(2, 10, 4))


def test_bad_padding_mask_is_one_clear_error() -> None:
    with pytest.raises(ZooError, match="padding_mask must be a bool tensor of shape"):
        small_set()(clouds(2, 10), padding_mask=torch.zeros(2, 9, dtype=torch.bool))


@pytest.mark.parametrize(
    "build, kwargs, message",
    [
        (small_set, {"n_iter": 0}, "n_iter must be an integer >= 1"),
        (small_set, {"embed_dim": 10, "num_heads": 4}, "not divisible by num_heads"),
        (small_set, {"num_inducing": 0}, "num_inducing must be an integer >= 1, got 0"),
        (small_set, {"optimizer": "adam"}, "optimizer must be a callable that builds the optimizer"),
        (small_set, {"lr": 0.1}, "lr is a training setting, not an argument of SetTransformer: give the optimiser"),
        (
            small_pct,
            {"momentum": 0.9, "scheduler": "step"},
            "momentum, scheduler are training settings, not arguments of PointCloudTransformer",
        ),
        (small_pct, {"attention": "linear"}, "attention must be one of 'pct', 'sinkhorn', got 'linear'"),
        (small_pct, {"n_iter": 3}, "n_iter=3 needs attention='sinkhorn'"),
        (small_pct, {"sample_points": (16, 32)}, "must not increase"),
        (small_pct, {"sample_points": (32, 4)}, None),
        (small_pct, {"num_neighbors": 40}, "num_neighbors=40 exceeds"),
        (small_pct, {"pooling": "sum"}, "pooling must be one of 'max\\+avg', 'max', got 'sum'"),
        (small_pct, {"in_chans": 2}, "in_chans must be an integer >= 3, got 2 .*xyz"),
    ],
)
def test_bad_options_are_one_clear_error(build, kwargs: dict, message: str | None) -> None:
    if message is None:  # fine: more neighbours than the last stage's centres is allowed
        build(**kwargs)
        return
    with pytest.raises(ZooError, match=message):
        build(**kwargs)


# ------------------------------------------------------------------------------------------------ recipes


@pytest.mark.parametrize("name", MY_RECIPES)
def test_recipe_instantiates(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo.cli import ZooCLI

    monkeypatch.chdir(tmp_path)
    path = RECIPES / f"{name}.yaml"
    recipe = yaml.safe_load(path.read_text())
    cli = ZooCLI(
        pl.LightningModule,
        pl.LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        run=False,
        args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path / "run")],
    )
    model, data = cli.model, cli.datamodule
    assert type(model) is (SetTransformer if "set" in name else PointCloudTransformer)
    assert type(data) is (SyntheticPointCloudDataModule if "synthetic" in name else ModelNet40DataModule)
    init_args = dict(recipe["model"]["init_args"])
    settings = {key: init_args.pop(key) for key in ("optimizer", "lr_scheduler") if key in init_args}
    for key, value in init_args.items():
        assert plain(model.hparams[key]) == value, key
    opt, sched = optimization(model)  # the recipe's training settings, built as the recipe says
    assert type(opt).__name__ == settings["optimizer"]["class_path"].rsplit(".", 1)[1]
    assert {k: opt.defaults[k] for k in settings["optimizer"]["init_args"]} == settings["optimizer"]["init_args"]
    if "lr_scheduler" in settings:
        assert type(sched).__name__ == settings["lr_scheduler"]["class_path"].rsplit(".", 1)[1]
    for key, value in recipe["data"]["init_args"].items():
        assert plain(data.hparams[key]) == value, key
    assert cli.trainer.max_epochs == recipe["trainer"]["max_epochs"]
    assert model.head.out_features == recipe["model"]["init_args"]["num_classes"]
    assert list(tmp_path.iterdir()) == []  # nothing read, downloaded or written
    if "synthetic" in name:  # the synthetic recipes run: one train and one val batch
        data.setup()
        assert data.num_classes == model.hparams.num_classes
        trainer = pl.Trainer(
            fast_dev_run=1, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
        )
        trainer.fit(model, data)
        assert trainer.state.finished
    else:  # ModelNet40 is not on disk: one clear error at setup
        with pytest.raises(ZooError, match="does not exist"):
            data.setup()


# ------------------------------------------------------------------------------------------------ export


def test_lexicographic_order_is_the_stable_sorts_without_a_stable_sort() -> None:
    """Farthest point sampling's lexicographic order (stable sorts by z, y, then x) comes from sorts of unique keys
    (rank among the distinct values, position): the same permutation as stable sorts, ties, -0.0 and NaN included,
    and no ``aten.sort.stable`` in an exported program, which ONNX cannot express (``torch.onnx.export`` of a PCT
    failed on it)."""
    from zoo.models.pointcloud import _lexicographic_order

    def reference(xyz: torch.Tensor) -> torch.Tensor:
        perm = torch.arange(xyz.shape[1]).expand(xyz.shape[0], -1)
        for d in reversed(range(xyz.shape[-1])):
            perm = perm.gather(1, xyz[..., d].gather(1, perm).argsort(dim=1, stable=True))
        return perm

    torch.manual_seed(0)
    for n in (1, 2, 7, 40):
        xyz = torch.randint(-2, 3, (3, n, 3)).float()  # many ties
        xyz[torch.rand(xyz.shape) < 0.1] = -0.0
        xyz[torch.rand(xyz.shape) < 0.05] = float("nan")
        assert torch.equal(_lexicographic_order(xyz), reference(xyz))

    class Sample(nn.Module):
        def forward(self, xyz: torch.Tensor) -> torch.Tensor:
            return farthest_point_sample(xyz, 4)

    xyz = torch.randn(2, 16, 3)
    exported = torch.export.export(Sample(), (xyz,)).run_decompositions()
    assert not [n for n in exported.graph.nodes if "sort.stable" in str(n.target)]
    assert torch.equal(exported.module()(xyz), farthest_point_sample(xyz, 4))
