"""converters.transform(..., to="sinkhorn"): timm ViTs (-> zoo SinkformerViT, or the timm model with its attention
swapped), torchvision ViTs, nn.TransformerEncoder and any module with nn.MultiheadAttention. n_iter=1 is the
source function; n_iter=3 differs, trains and lowers the loss. CPU, random weights, no network."""

from __future__ import annotations

import copy
import functools

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn as nn
import torchvision
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.utils.data import DataLoader, TensorDataset

import converters
import zoo
from zoo.errors import ZooError
from zoo.models import SinkformerViT
from zoo.nn import SinkhornAttention, SinkhornMultiheadAttention


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random perturbation of every parameter (biases and norms are constants at init)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
    return model.eval()


def timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    return randomized(
        timm.create_model(
            "vit_tiny_patch16_224", **{"img_size": 32, "num_classes": 7, "depth": 3, "embed_dim": 48, **kwargs}
        )
    )


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return randomized(
        torchvision.models.VisionTransformer(
            image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64, num_classes=5
        )
    )


def encoder() -> nn.Module:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    return randomized(nn.TransformerEncoder(layer, 2, norm=nn.LayerNorm(32)))


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def tokens_and_padding() -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(2))
    kpm = torch.zeros(3, 6, dtype=torch.bool)
    kpm[1, 4:] = True
    kpm[2, 2:] = True
    return x, kpm


def lowers_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 4, **kwargs) -> bool:
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(steps):
        out = model(x, **kwargs)
        loss = nn.functional.cross_entropy(out, y) if out.dim() == 2 else (out - y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses[-1] < losses[0]


# ------------------------------------------------------------------------------------------------ registry


def test_sinkhorn_target_and_sources() -> None:
    assert "sinkhorn" in converters.list_targets()
    assert converters._get_target("sinkhorn").families == ("attention",)
    sources = converters.list_sources("sinkhorn")
    for name in ("torchvision.models.VisionTransformer", "timm.models.vision_transformer.VisionTransformer"):
        assert name in sources
    assert any("timm.layers.Attention" in s for s in sources)
    assert any("nn.MultiheadAttention" in s for s in sources)


# ------------------------------------------------------------------------------------------------ timm ViT


def test_timm_vit_becomes_the_zoo_sinkformer_with_the_same_function_at_one_iteration() -> None:
    src = timm_vit()
    before = copy.deepcopy(src.state_dict())
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    assert type(model) is SinkformerViT and model.hparams.n_iter == 1 and not model.training
    assert list(model.state_dict()) == list(src.state_dict())
    x = images()
    with torch.no_grad():
        assert close(model(x), src(x))
    three = converters.transform(src, to="sinkhorn")  # default n_iter=3
    assert three.hparams.n_iter == 3 and all(b.attn.n_iter == 3 for b in three.blocks)
    with torch.no_grad():
        assert not close(three(x), src(x), 1e-3)
    # copies by default: training the conversion leaves the source alone
    assert lowers_loss(three, x, torch.arange(4) % 7)
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())
    assert all(p is not q for p, q in zip(three.parameters(), src.parameters()))


def test_timm_vit_inplace_shares_parameters_and_mirrors_state() -> None:
    src = timm_vit(global_pool="avg", drop_path_rate=0.1)
    src.patch_embed.requires_grad_(False)
    src.blocks[0].train()
    adam = functools.partial(torch.optim.Adam, lr=1e-3)
    model = converters.transform(src, to="sinkhorn", n_iter=3, inplace=True, optimizer=adam, record_stats=True)
    assert type(model) is SinkformerViT and model.optimizer_factory is adam and model.hparams.global_pool == "avg"
    assert model.hparams.drop_path_rate == 0.1  # as given to timm, not its float32 value
    assert model.blocks[0].attn.qkv.weight is src.blocks[0].attn.qkv.weight and model.pos_embed is src.pos_embed
    assert not model.patch_embed.proj.weight.requires_grad and src.blocks[1].attn.qkv.weight.requires_grad
    assert model.blocks[0].training and not model.blocks[1].training and not model.training
    model.eval()(images())
    assert set(model.attention_stats()) == {"blocks.0.attn", "blocks.1.attn", "blocks.2.attn"}


def test_timm_vit_dtype_and_trainer_fit(tmp_path) -> None:
    src = timm_vit().double()
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    assert model.pos_embed.dtype == torch.float64
    with torch.no_grad():
        assert close(model(images().double()), src(images().double()), 1e-10)
    model = converters.transform(
        timm_vit(), to="sinkhorn", n_iter=3, optimizer=functools.partial(torch.optim.Adam, lr=1e-3), layer_decay=0.5
    )
    x, y = images(8), torch.arange(8) % 7
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=2,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    rate = {id(p): g["initial_lr"] for g in trainer.optimizers[0].param_groups for p in g["params"]}
    assert rate[id(model.head.weight)] == 1e-3 and rate[id(model.blocks[-1].mlp.fc1.weight)] == 0.5e-3  # layer_decay
    (ckpt,) = tmp_path.rglob("*.ckpt")
    reloaded = SinkformerViT.load_from_checkpoint(ckpt).eval()
    with torch.no_grad():
        assert close(reloaded(x), model.eval()(x))


def test_timm_vit_outside_the_zoo_layout_keeps_its_class_with_attention_swapped() -> None:
    src = timm_vit(reg_tokens=2, no_embed_class=True)
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    assert type(model) is TimmViT and model is not src
    assert all(type(b.attn) is SinkhornAttention for b in model.blocks)
    assert all(type(b.attn) is not SinkhornAttention for b in src.blocks)
    assert list(model.state_dict()) == list(src.state_dict())  # loads back into the timm architecture
    x = images()
    with torch.no_grad():
        assert close(model(x), src(x))
    three = converters.transform(src, to="sinkhorn")
    with torch.no_grad():
        assert not close(three(x), src(x), 1e-3)
    assert lowers_loss(three, x, torch.arange(4) % 7)
    with pytest.raises(ZooError, match=r"'optimizer' only apply when the result is a zoo SinkformerViT.*register"):
        converters.transform(src, to="sinkhorn", optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def test_timm_blocks_and_converted_models_convert_again() -> None:
    src = timm_vit()
    blocks = converters.transform(src.blocks, to="sinkhorn", n_iter=1)
    x = torch.randn(2, 5, 48)
    with torch.no_grad():
        assert close(blocks(x), src.blocks(x))
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    again = converters.transform(model, to="sinkhorn", n_iter=5)
    assert type(again) is SinkformerViT and again.hparams.n_iter == 5 and model.hparams.n_iter == 1
    assert all(b.attn.n_iter == 5 for b in again.blocks) and all(b.attn.n_iter == 1 for b in model.blocks)


# ------------------------------------------------------------------------------------------------ torchvision ViT


def test_torchvision_vit_same_function_at_one_iteration_trains_at_three() -> None:
    src = torchvision_vit()
    before = copy.deepcopy(src.state_dict())
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    assert type(model) is type(src) and model is not src
    attns = [b.self_attention for b in model.encoder.layers]
    assert all(type(a) is SinkhornMultiheadAttention and a.batch_first for a in attns)
    assert list(model.state_dict()) == list(src.state_dict())
    x = images()
    with torch.no_grad():
        assert close(model(x), src(x))
    three = converters.transform(src, to="sinkhorn", n_iter=3)
    with torch.no_grad():
        assert not close(three(x), src(x), 1e-3)
    assert lowers_loss(three, x, torch.arange(4) % 5)
    assert all(torch.equal(before[k], v) for k, v in src.state_dict().items())
    restored = torchvision_vit()
    restored.load_state_dict(three.state_dict())  # saves into / loads from the torchvision architecture


def test_torchvision_vit_inplace_keeps_the_very_parameters() -> None:
    src = torchvision_vit()
    params = {n: p for n, p in src.named_parameters()}
    model = converters.transform(src, to="sinkhorn", inplace=True)
    assert model is src
    assert all(p is params[n] for n, p in model.named_parameters())
    assert type(src.encoder.layers[0].self_attention) is SinkhornMultiheadAttention


# ------------------------------------------------------------------------------------------------ torch modules


def test_transformer_encoder_with_padding_same_valid_outputs_at_one_iteration() -> None:
    src = encoder()
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    assert type(model) is nn.TransformerEncoder and not model.use_nested_tensor
    assert all(type(layer.self_attn) is SinkhornMultiheadAttention for layer in model.layers)
    x, kpm = tokens_and_padding()
    valid = ~kpm
    with torch.no_grad():  # eval + no grad: the source takes torch's nested / fused fast paths
        assert close(model(x, src_key_padding_mask=kpm)[valid], src(x, src_key_padding_mask=kpm)[valid])
    assert close(model(x, src_key_padding_mask=kpm)[valid], src(x, src_key_padding_mask=kpm)[valid])
    causal = nn.Transformer.generate_square_subsequent_mask(6)
    assert close(model(x, mask=causal, is_causal=True), src(x, mask=causal, is_causal=True))


def test_transformer_encoder_at_three_iterations_padding_invariant_and_trains() -> None:
    model = converters.transform(encoder(), to="sinkhorn", n_iter=3)
    x, kpm = tokens_and_padding()
    with torch.no_grad():
        out = model(x, src_key_padding_mask=kpm)
        alone = model(x[2:, :2])
        assert close(out[2, :2], alone[0])
        assert not close(out[~kpm], encoder()(x, src_key_padding_mask=kpm)[~kpm], 1e-3)
    target = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(3))
    assert lowers_loss(model, x, target, src_key_padding_mask=kpm)


def test_any_module_with_multihead_attention() -> None:
    class Pool(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.query = nn.Parameter(torch.randn(1, 1, 32))
            self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
            self.head = nn.Linear(32, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.attn(self.query.expand(len(x), -1, -1), x, x)[0][:, 0])

    torch.manual_seed(0)
    src = randomized(Pool())
    model = converters.transform(src, to="sinkhorn", n_iter=1)
    x = torch.randn(4, 6, 32, generator=torch.Generator().manual_seed(4))
    assert type(model.attn) is SinkhornMultiheadAttention and close(model(x), src(x))
    assert lowers_loss(converters.transform(src, to="sinkhorn"), x, torch.arange(4) % 3)
    single = converters.transform(src.attn, to="sinkhorn", n_iter=1)  # the attention module itself
    assert type(single) is SinkhornMultiheadAttention and close(single(x, x, x)[0], src.attn(x, x, x)[0])


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [0, -3, 1.5, None])
def test_bad_n_iter(bad: object) -> None:
    with pytest.raises(ZooError, match=r"n_iter must be an integer >= 1"):
        converters.transform(encoder(), to="sinkhorn", n_iter=bad)


def test_unknown_option_and_bad_flag() -> None:
    with pytest.raises(ZooError, match=r"unknown option 'gamma'.*accepted options are n_iter, record_stats, inplace"):
        converters.transform(encoder(), to="sinkhorn", gamma=0.9)
    with pytest.raises(ZooError, match="inplace must be true or false"):
        converters.transform(encoder(), to="sinkhorn", inplace="yes")


def test_unsupported_models() -> None:
    for model in (nn.Linear(3, 3), torchvision.models.resnet18()):
        with pytest.raises(ZooError, match=r"cannot convert a .* to 'sinkhorn': supported sources .*Attention"):
            converters.transform(model, to="sinkhorn")

    class MyAttention(nn.MultiheadAttention):
        pass

    with pytest.raises(
        ZooError,
        match=r"attn is a .*MyAttention.*only timm.layers.Attention and "
        r"torch.nn.MultiheadAttention themselves convert",
    ):
        converters.transform(nn.ModuleDict({"attn": MyAttention(8, 2)}), to="sinkhorn")
    assert zoo.list_models("sinkformer_vit_small*")  # the zoo family the timm conversion gives
