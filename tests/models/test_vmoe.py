"""The V-MoE family (zoo/models/vmoe.py): MoE blocks placement, dense timm checkpoints upcycled (exactly the dense
function in the settings that keep every token's weights summing to 1), the Lightning task's auxiliary loss and
routing statistics, training with hard and soft routers, saving and reloading; errors. CPU, no network."""

from __future__ import annotations

import functools
import json

import lightning.pytorch as pl
import pytest
import timm
import torch
from helpers import seed_hf_hub_cache
from torch.utils.data import DataLoader, TensorDataset

import zoo
from zoo import hub
from zoo.errors import ZooError
from zoo.models.vmoe import VisionMoE, moe_block_indices
from zoo.nn.moe import MoE

EXACT = [
    {"router": "token_choice", "k": 2, "normalize_gates": True, "capacity_factor": None},
    {"router": "expert_choice", "capacity_factor": None},
]


def images(n: int = 2, size: int = 32, chans: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, chans, size, size, generator=torch.Generator().manual_seed(seed))


def dense_vit(**kwargs) -> torch.nn.Module:
    """A timm ViT-Ti shaped like the small V-MoE below, every parameter randomised (timm sets constants)."""
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", **{"img_size": 32, "patch_size": 8, "num_classes": 5, "depth": 4, **kwargs}
    ).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


def small_vmoe(**kwargs) -> VisionMoE:
    return zoo.vmoe_tiny_patch32_224(
        **{"img_size": 32, "patch_size": 8, "num_classes": 5, "depth": 4, "num_experts": 4, **kwargs}
    )


def test_builders_and_moe_placement() -> None:
    assert {"vmoe_tiny_patch32_224", "vmoe_small_patch32_224"} <= set(zoo.list_models("vmoe_*"))
    assert moe_block_indices(12, 2) == [1, 3, 5, 7, 9, 11] and moe_block_indices(4, 1) == [0, 1, 2, 3]
    assert moe_block_indices(12, 2, moe_blocks=[5, 0, 5]) == [0, 5]
    model = small_vmoe()
    assert model.moe_indices == [1, 3]
    kinds = [type(b.mlp).__name__ for b in model.blocks]
    assert kinds == ["Mlp", "MoE", "Mlp", "MoE"]
    assert model.moe_modules() == [model.blocks[1].mlp, model.blocks[3].mlp]
    moe = model.blocks[1].mlp
    assert moe.experts.fc1.weight.shape == (4, 768, 192) and moe.router.weight.shape == (4, 192)
    assert model.hparams.n_iter == 1 and model.blocks[0].attn.n_iter == 1  # softmax attention
    small = zoo.vmoe_small_patch32_224(img_size=64, depth=2)
    assert (small.embed_dim, small.blocks[1].mlp.num_experts, small.blocks[1].mlp.k) == (384, 32, 28)
    opt = small.configure_optimizers(total_steps=10)["optimizer"]  # the published AdamW lr 1e-3, weight decay 0.1
    assert small.hparams.group_size == 400 and type(opt) is torch.optim.AdamW
    assert (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-3, 0.1)
    assert small(images(2, 64)).shape == (2, 1000)


@pytest.mark.parametrize("routing", EXACT, ids=["token_choice", "expert_choice"])
def test_dense_checkpoint_upcycles_to_the_dense_function(routing: dict, tmp_path) -> None:
    ref = dense_vit()
    sd = ref.state_dict()
    torch.save(sd, tmp_path / "vit.pth")
    seed_hf_hub_cache("timm/vit_tiny_dense.fake", sd)
    x = images()
    for weights in (str(tmp_path / "vit.pth"), "hf-hub:timm/vit_tiny_dense.fake"):
        model = small_vmoe(weights=weights, **routing).eval()
        moe = model.blocks[3].mlp
        for e in range(4):  # every expert a copy of the dense MLP, the router at zero
            assert torch.equal(moe.experts.fc1.weight[e], sd["blocks.3.mlp.fc1.weight"])
            assert torch.equal(moe.experts.fc2.bias[e], sd["blocks.3.mlp.fc2.bias"])
        assert torch.count_nonzero(moe.router.weight) == 0
        with torch.no_grad():
            torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-5)
    sparse = small_vmoe(weights=str(tmp_path / "vit.pth")).eval()  # default: expert choice, capacity 2
    with torch.no_grad():
        assert (sparse(x) - ref(x)).abs().max() > 1e-3  # tokens are shared out: another function until trained


def test_a_vmoe_checkpoint_loads_as_is(tmp_path) -> None:
    model = small_vmoe(router="token_choice", k=2)
    path = model.save_pretrained(tmp_path / "vmoe")
    again = VisionMoE.from_pretrained(path)
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(a, b), name
    assert again.blocks[1].mlp.router_type == "token_choice" and again.blocks[1].mlp.k == 2


def test_router_n_iter_and_moe_layers_are_deprecated_names() -> None:
    """VisionMoE(router_n_iter=, moe_layers=) and moe_block_indices(every=, layers=) (the old names): FutureWarnings
    naming dykstra_iters / moe_blocks / moe_every, the same model as the new names (hyperparameters recorded under
    the new names only); giving both names is one ZooError."""
    soft = {"topk": "soft", "lam": 0.05, "num_experts": 4}
    torch.manual_seed(0)
    new = small_vmoe(**soft, dykstra_iters=2, moe_blocks=[0, 2]).eval()
    torch.manual_seed(0)
    with pytest.warns(FutureWarning) as caught:
        old = small_vmoe(**soft, router_n_iter=2, moe_layers=[0, 2]).eval()
    messages = sorted(str(w.message) for w in caught if w.category is FutureWarning)
    assert len(messages) == 2
    assert messages[0].startswith("VisionMoE: moe_layers= is deprecated") and "use moe_blocks=" in messages[0]
    assert messages[1].startswith("VisionMoE: router_n_iter= is deprecated") and "use dykstra_iters=" in messages[1]
    assert old.moe_indices == new.moe_indices == [0, 2] and old.blocks[2].mlp.dykstra_iters == 2
    assert dict(old.hparams) == dict(new.hparams) and {"router_n_iter", "moe_layers"}.isdisjoint(old.hparams)
    assert {"router_n_iter", "moe_layers"}.isdisjoint(old.hparams_initial)
    x = images()
    with torch.no_grad():
        assert torch.equal(old(x), new(x))
        torch.manual_seed(0)
        assert (small_vmoe(**soft, moe_blocks=[0, 2]).eval()(x) - new(x)).abs().max() > 1e-6  # 2 iterations, not 10
    for given in ({"router_n_iter": 2, "dykstra_iters": 2}, {"moe_layers": [1], "moe_blocks": [1]}):
        with pytest.raises(ZooError, match="is the deprecated name of .*; give .* only, not both"):
            small_vmoe(**soft, **given)
    with pytest.warns(FutureWarning, match="every= is deprecated.*use moe_every="):
        assert moe_block_indices(12, every=3) == moe_block_indices(12, 3) == [2, 5, 8, 11]
    with pytest.warns(FutureWarning, match="layers= is deprecated.*use moe_blocks="):
        assert moe_block_indices(12, layers=[5, 0]) == [0, 5]
    with pytest.raises(ZooError, match="not both"):
        moe_block_indices(12, 2, every=2)


@pytest.mark.parametrize("kind", ["save_pretrained", "lightning"])
def test_files_saved_with_the_old_names_still_load(kind: str, tmp_path) -> None:
    """A save_pretrained file or Lightning checkpoint written by the previous release (constructor arguments
    router_n_iter / moe_layers) loads into the same model, with the FutureWarnings; saved again, it has the new
    names only."""
    torch.manual_seed(0)
    model = small_vmoe(topk="soft", lam=0.05, dykstra_iters=3, moe_blocks=[0, 2]).eval()
    sd, meta = hub.read_safetensors(model.save_pretrained(tmp_path / "new") / "model.safetensors")
    config = json.loads(meta["zoo.config"])
    args = config["init_args"]
    assert {"router_n_iter", "moe_layers"}.isdisjoint(args)
    assert (args["dykstra_iters"], args["moe_blocks"]) == (3, [0, 2])
    args["router_n_iter"], args["moe_layers"] = args.pop("dykstra_iters"), args.pop("moe_blocks")  # the old names
    if kind == "save_pretrained":
        path = tmp_path / "old.safetensors"
        hub.save_safetensors(sd, path, metadata={"zoo.config": json.dumps(config), "format": "pt"})
    else:
        path = tmp_path / "old.ckpt"
        torch.save(
            {
                "state_dict": sd,
                "pytorch-lightning_version": "2.6.6",
                "hyper_parameters": {**args, "_class_path": config["class_path"]},
            },
            path,
        )
    with pytest.warns(FutureWarning) as caught:
        again = zoo.from_pretrained(path).eval()
    messages = " ".join(str(w.message) for w in caught if w.category is FutureWarning)
    assert "router_n_iter= is deprecated" in messages and "moe_layers= is deprecated" in messages
    assert type(again) is VisionMoE and again.moe_indices == [0, 2] and again.blocks[2].mlp.dykstra_iters == 3
    for (name, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    x = images()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    resaved = json.loads(
        hub.read_safetensors(again.save_pretrained(tmp_path / "resaved") / "model.safetensors")[1]["zoo.config"]
    )["init_args"]
    assert {"router_n_iter", "moe_layers"}.isdisjoint(resaved) and resaved["dykstra_iters"] == 3


def test_training_loss_adds_the_weighted_aux_loss_and_logs_routing() -> None:
    model = small_vmoe(router="token_choice", k=1, capacity_factor=1.0, aux_loss_weight=0.5)
    x, y = images(4), torch.arange(4) % 5
    logged: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)  # no trainer needed
    total = model.training_step((x, y), 0)
    aux = sum(m.aux_loss for m in model.moe_modules())
    # independent: Switch loss E * sum_e f_e P_e of each layer, recomputed from its router
    ce = torch.nn.functional.cross_entropy(model(x), y)
    assert torch.allclose(total, ce + 0.5 * aux, atol=1e-6)
    assert aux > 0.5  # each layer's Switch loss is >= 1 (equality at perfect balance)
    assert model.auxiliary_losses().keys() == {"moe/weighted_aux_loss"}  # the one interface the task reads
    torch.testing.assert_close(model.auxiliary_losses()["moe/weighted_aux_loss"], 0.5 * aux)
    torch.testing.assert_close(logged["train_moe/weighted_aux_loss"], 0.5 * aux.detach())
    for name in ("aux_loss", "dropped_fraction", "router_entropy", "expert_load_max", "expert_load_min"):
        assert f"train_moe/{name}" in logged
    assert 0 < logged["train_moe/router_entropy"] <= torch.log(torch.tensor(4.0)) + 1e-6
    assert logged["train_moe/expert_load_max"] >= 1.0 >= logged["train_moe/expert_load_min"] >= 0.0
    # independent: tokens per expert of each layer from its own stats, max and min over the mean
    loads = torch.stack([m.stats["tokens_per_expert"].float() for m in model.moe_modules()])
    assert torch.allclose(logged["train_moe/expert_load_max"], (loads.amax(1) / loads.mean(1)).mean())
    expert = small_vmoe()
    expert.log = lambda name, value, **kw: logged.__setitem__(name, value)
    total = expert.training_step((x, y), 0)
    assert logged["train_moe/aux_loss"] == 0  # expert choice: no auxiliary loss
    assert torch.allclose(total, torch.nn.functional.cross_entropy(expert(x), y), atol=1e-6)


def test_plain_models_are_unchanged_by_the_moe_hooks() -> None:
    model = zoo.sinkformer_vit_mnist(patch_size=7)
    logged: dict[str, torch.Tensor] = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, value)
    x, y = images(4, 28, 1), torch.arange(4)
    assert torch.allclose(model.training_step((x, y), 0), torch.nn.functional.cross_entropy(model(x), y))
    assert not any("moe" in k for k in logged) and model.auxiliary_losses() == {} == model.diagnostics()


@pytest.mark.parametrize("topk", ["hard", "soft"])
def test_trains_with_hard_and_soft_expert_choice(topk: str, tmp_path) -> None:
    pl.seed_everything(0, verbose=False)
    model = zoo.vmoe_tiny_patch32_224(
        img_size=16,
        patch_size=4,
        in_chans=1,
        num_classes=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        mlp_ratio=2.0,
        num_experts=4,
        moe_every=1,
        topk=topk,
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3, weight_decay=0.0),
        lr_scheduler=None,
    )
    x, y = images(16, 16, 1), torch.arange(16) % 4
    before = model.loss(model(x), y).item()
    router_before = model.blocks[0].mlp.router.weight.detach().clone()
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=6,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        enable_checkpointing=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    model.eval()
    with torch.no_grad():
        assert model.loss(model(x), y).item() < before
    assert not torch.equal(model.blocks[0].mlp.router.weight, router_before)  # the router learns
    assert "train_moe/router_entropy" in trainer.callback_metrics


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"moe_every": 5}, "moe_every=5 exceeds depth=4"),
        ({"moe_every": 0}, "moe_every must be an integer >= 1"),
        ({"moe_blocks": [4]}, r"moe_blocks \[4\] must be a list of block indices in \[0, 3\]"),
        ({"topk": "soft", "dykstra_iters": 0}, "dykstra_iters must be an int >= 1"),
        ({"dykstra_iters": 10}, "dykstra_iters only apply with topk='soft'"),
        ({"mlp_ratio": 0.0}, "mlp_ratio must be > 0"),
        ({"aux_loss_weight": -1.0}, "aux_loss_weight must be a finite number >= 0, got -1.0"),
        ({"router": "top1"}, "unknown router 'top1'"),
    ],
)
def test_bad_options_are_one_clear_error(kwargs: dict, message: str) -> None:
    with pytest.raises(ZooError, match=message):
        small_vmoe(**kwargs)


def test_dense_mlp_of_another_width_is_refused(tmp_path) -> None:
    torch.save(dense_vit(mlp_ratio=2.0).state_dict(), tmp_path / "narrow.pth")
    with pytest.raises(ZooError, match="shape"):
        small_vmoe(weights=str(tmp_path / "narrow.pth"))
    assert isinstance(small_vmoe().blocks[1].mlp, MoE)
