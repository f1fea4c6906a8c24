"""converters.transform(..., to="moe"): timm ViTs (-> zoo VisionMoE, or the timm model with MoE MLPs) and a ViT's
blocks, every expert a copy of the dense MLP and the router at zero ("upcycling"): the dense function exactly in
the settings where every token's weights sum to 1 and nothing is dropped; trains. CPU, random weights."""

from __future__ import annotations

import functools

import lightning.pytorch as pl
import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch.utils.data import DataLoader, TensorDataset

import converters
from zoo.errors import ZooError
from zoo.models import VisionMoE
from zoo.nn import MoE

EXACT = [
    {"router": "token_choice", "k": 2, "normalize_gates": True, "capacity_factor": None},
    {"router": "token_choice", "k": 1, "normalize_gates": True, "capacity_factor": None},
    {"router": "expert_choice", "capacity_factor": None},
]


def timm_vit(**kwargs) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224",
        **{"img_size": 32, "patch_size": 8, "num_classes": 7, "depth": 4, "embed_dim": 48, "num_heads": 4, **kwargs},
    )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def images(n: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_moe_target_and_sources() -> None:
    assert "moe" in converters.list_targets()
    sources = converters.list_sources("moe")
    assert any("VisionTransformer" in s for s in sources) and any("blocks" in s for s in sources)


@pytest.mark.parametrize("routing", EXACT, ids=["token_k2", "token_k1", "expert_all"])
def test_timm_vit_becomes_a_vmoe_computing_the_dense_function(routing: dict) -> None:
    src = timm_vit()
    before = {k: v.clone() for k, v in src.state_dict().items()}
    model = converters.transform(src, to="moe", num_experts=4, **routing)
    assert type(model) is VisionMoE and model.moe_indices == [1, 3] and not model.training
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
    for k, v in src.state_dict().items():  # the source is untouched
        assert torch.equal(v, before[k])
    moe = model.blocks[1].mlp
    assert moe.num_experts == 4 and moe.router_type == routing["router"]
    assert torch.equal(moe.experts.fc2.weight[3], src.blocks[1].mlp.fc2.weight)
    assert moe.experts.fc1.weight.data_ptr() != src.blocks[1].mlp.fc1.weight.data_ptr()


def test_sparse_default_runs_trains_and_keeps_flags(tmp_path) -> None:
    src = timm_vit()
    src.blocks[3].mlp.fc1.weight.requires_grad_(False)
    src.patch_embed.proj.weight.requires_grad_(False)
    model = converters.transform(
        src,
        to="moe",
        num_experts=4,
        moe_every=1,
        optimizer=functools.partial(torch.optim.Adam, lr=1e-3),
        lr_scheduler=functools.partial(torch.optim.lr_scheduler.ConstantLR, factor=1.0),
    )
    assert model.moe_indices == [0, 1, 2, 3] and model.hparams.router == "expert_choice"
    assert not model.blocks[3].mlp.experts.fc1.weight.requires_grad
    assert model.blocks[3].mlp.experts.fc2.weight.requires_grad and model.blocks[2].mlp.experts.fc1.weight.requires_grad
    assert not model.patch_embed.proj.weight.requires_grad
    pl.seed_everything(0, verbose=False)
    x, y = images(8), torch.arange(8) % 7
    model.train()
    before = model.loss(model(x), y).item()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=4,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    model.train()  # same dropout-free mode as `before`
    with torch.no_grad():
        assert model.loss(model(x), y).item() < before


def test_timm_vit_outside_the_zoo_layout_and_blocks_get_moe_mlps() -> None:
    src = timm_vit(reg_tokens=2, no_embed_class=True)
    exact = EXACT[0]
    model = converters.transform(src, to="moe", num_experts=3, **exact)
    assert type(model) is TimmViT and model is not src
    assert [type(b.mlp) for b in model.blocks] == [type(src.blocks[0].mlp), MoE, type(src.blocks[0].mlp), MoE]
    assert all(type(b.mlp) is not MoE for b in src.blocks)
    x = images()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ZooError, match=r"'optimizer' only apply when the result is a zoo VisionMoE.*register"):
        converters.transform(src, to="moe", optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    blocks = converters.transform(src.blocks, to="moe", num_experts=2, moe_blocks=[0], **exact)
    assert type(blocks) is nn.Sequential and type(blocks[0].mlp) is MoE and type(blocks[1].mlp) is not MoE
    t = torch.randn(2, 5, 48)
    with torch.no_grad():
        torch.testing.assert_close(blocks(t), src.blocks(t), rtol=1e-5, atol=1e-5)


def test_every_moe_layers_and_router_n_iter_are_deprecated_option_names() -> None:
    """The options every, moe_layers, router_n_iter (the old names) convert as moe_every, moe_blocks, dykstra_iters,
    with FutureWarnings naming the new names, into a VisionMoE or a timm model's blocks; both names: one ZooError."""
    src = timm_vit()
    soft = {"num_experts": 4, "topk": "soft", "lam": 0.05}
    x = images()
    for source, new_names, old_names in (
        (src, {"moe_every": 1, "dykstra_iters": 2}, {"every": 1, "router_n_iter": 2}),
        (src.blocks, {"moe_blocks": [1, 2], "dykstra_iters": 2}, {"moe_layers": [1, 2], "router_n_iter": 2}),
    ):
        new = converters.transform(source, to="moe", **soft, **new_names)
        with pytest.warns(FutureWarning) as caught:
            old = converters.transform(source, to="moe", **soft, **old_names)
        messages = " ".join(str(w.message) for w in caught if w.category is FutureWarning)
        for name in old_names:
            assert f"converters.transform(to='moe'): {name}= is deprecated" in messages
        assert type(old) is type(new) and old.state_dict().keys() == new.state_dict().keys()
        moes = [m for m in old.modules() if isinstance(m, MoE)]
        assert len(moes) == (4 if source is src else 2) and {m.dykstra_iters for m in moes} == {2}
        t = x if source is src else torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            assert torch.equal(old(t), new(t))
    assert old[1].mlp.dykstra_iters == 2 and type(old[0].mlp) is not MoE
    for both in (
        {"every": 1, "moe_every": 1},
        {"moe_layers": [1], "moe_blocks": [1]},
        {"router_n_iter": 2, "dykstra_iters": 2},
    ):
        with pytest.raises(ZooError, match="is the deprecated name of .*; give .* only, not both"):
            converters.transform(src, to="moe", **soft, **both)


def test_bad_options() -> None:
    src = timm_vit()
    with pytest.raises(ZooError, match=r"unknown option 'gamma'.*accepted options are num_experts, moe_every"):
        converters.transform(src, to="moe", gamma=0.9)
    with pytest.raises(ZooError, match="unknown router 'top2'"):
        converters.transform(src, to="moe", router="top2")
    with pytest.raises(ZooError, match="moe_every=9 exceeds depth=4"):
        converters.transform(src, to="moe", moe_every=9)
    with pytest.raises(ZooError, match=r"cannot convert a .*Linear to 'moe'"):
        converters.transform(nn.Linear(3, 3), to="moe")
    # an empty block list converts nothing (VisionMoE accepts it only as what pruning leaves): refused
    for source in (src, src.blocks):
        with pytest.raises(ZooError, match=r"moe_blocks=\[\] would turn no MLP into experts"):
            converters.transform(source, to="moe", moe_blocks=[])


def test_zoo_convert_to_moe_writes_a_vmoe_checkpoint(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    from test_cli import run_main, zoo_lines

    import zoo

    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224").eval()
    weights = tmp_path / "vit.pth"
    torch.save(src.state_dict(), weights)
    out_file = tmp_path / "vmoe.safetensors"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "timm:vit_tiny_patch16_224",
            "--weights",
            str(weights),
            "--to",
            "moe",
            "--option",
            "num_experts=4",
            "--option",
            "capacity_factor=null",
            "--option",
            "moe_every=6",
            "--out",
            str(out_file),
        ],
        capsys,
    )
    assert code == 0, err
    assert zoo_lines(out)[-1].startswith(f"wrote {out_file} (VisionMoE")
    model = zoo.from_pretrained(out_file).eval()
    assert type(model) is VisionMoE and model.blocks[5].mlp.num_experts == 4 and model.moe_indices == [5, 11]
    x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
