"""FSDP2 (fully_shard) for every family on 2 real processes (gloo), against one process.

One spawn of 2 workers runs every multi-process check (start-up is the cost). Each worker builds the single-process
reference itself (same seed) and a sharded copy (``zoo.nn.fsdp.shard_model``), in float64, and compares every
parameter's gradient after one training step (``training_step`` of the family on the rank's half of a global batch).
The reference is the single process's gradient of (1/W) sum_r L_r, L_r the training loss of rank r's half: FSDP's
reduce-scatter averages the ranks' gradients as DDP does, and a family with batch statistics (the ResNets' BatchNorm,
PCT's) normalises each half with its own statistics in both. Then the reversible and adjoint stacks: their block
forwards re-run inside backward see the gathered (unsharded) parameters, the parameters are DTensor shards again
after backward, and a block-level unit inside such a stack (what the policy avoids) loses the gradients. Last, a
Sinkformer ViT trained by Lightning with ``--trainer.strategy fsdp2`` (2 steps) writes a full checkpoint and a
sharded one (converted by ``consolidate_checkpoint``); the test loads both into one process and compares them with
one process trained on the same global batches.
"""

from __future__ import annotations

import functools
import os
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
ATOL = 1e-10  # float64: FSDP sums the same per-rank gradients as the reference (reduction order aside)
STEPS, LOCAL_BATCH = 2, 4
VIT = {
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
}


# ------------------------------------------------------------------------------------------------ the families


def _resnet(name: str, memory: str, **kwargs: Any) -> nn.Module:
    import zoo

    return zoo.create_model(name, depth=3, num_classes=4, memory=memory, **kwargs)


def _vit() -> nn.Module:
    from zoo.models import SinkformerViT

    return SinkformerViT(img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=2, num_heads=2)


def _vmoe() -> nn.Module:
    from zoo.models import VisionMoE

    return VisionMoE(
        img_size=16, patch_size=4, in_chans=1, num_classes=4, embed_dim=16, depth=2, num_heads=2,
        num_experts=4, moe_every=1, router="token_choice", capacity_factor=1.0,
    )  # fmt: skip


def _translation() -> nn.Module:
    import zoo

    return zoo.create_model("sinkformer_transformer_toy", src_vocab_size=20, tgt_vocab_size=20, dropout=0.0)


def _pct() -> nn.Module:
    from zoo.models import PointCloudTransformer

    return PointCloudTransformer(
        num_classes=4, embed_dim=8, sample_points=(32, 16), num_neighbors=8, depth=2, fuse_dim=32,
        head_dims=(16,), drop_rate=0.0,
    )  # fmt: skip


def _images(channels: int, size: int) -> Any:
    def make(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10 + rank)
        return torch.randn(3, channels, size, size, generator=g, dtype=torch.float64), torch.randint(
            0, 4, (3,), generator=g
        )

    return make


def _clouds(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(20 + rank)
    return torch.randn(3, 64, 3, generator=g, dtype=torch.float64), torch.randint(0, 4, (3,), generator=g)


def _sentences(rank: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(30 + rank)
    pad, eos = 1, 2
    src = torch.randint(4, 20, (3, 7), generator=g)
    src[0, :2] = pad  # left-padded source
    target = torch.randint(4, 20, (3, 6), generator=g)
    target[:, -1] = eos
    target[1, -2:] = pad
    prev = torch.cat([torch.full((3, 1), eos), target[:, :-1]], 1)
    prev[1, -1] = pad
    return {"src_tokens": src, "prev_output_tokens": prev, "target": target, "ntokens": target.ne(pad).sum()}


# (name, builder, batch of rank r)
FAMILIES = [
    ("depth_scaled_resnet_full", functools.partial(_resnet, "depth_scaled_tiny", "full"), _images(3, 16)),
    ("heun_resnet_adjoint", functools.partial(_resnet, "heun_tiny", "adjoint"), _images(3, 16)),
    ("momentum_resnet_reversible", functools.partial(_resnet, "momentum_tiny", "reversible"), _images(3, 16)),
    (
        "momentum_resnet_reversible_stored",  # the last block stores its activations, the first is rebuilt
        functools.partial(_resnet, "momentum_tiny", "reversible", stored_blocks=1),
        _images(3, 16),
    ),
    ("momentum_resnet_full", functools.partial(_resnet, "momentum_tiny", "full"), _images(3, 16)),
    ("sinkformer_vit", _vit, _images(1, 16)),
    ("vmoe", _vmoe, _images(1, 16)),
    ("translation", _translation, _sentences),
    ("point_cloud_transformer", _pct, _clouds),
]


def _build(builder: Any) -> nn.Module:
    torch.manual_seed(0)
    return builder().double().train()


def _step(model: nn.Module, batch: Any, rank: int) -> torch.Tensor:
    torch.manual_seed(100 + rank)  # any sampling in forward draws the same numbers as the reference's call
    return model.training_step(batch, 0)


def _check_families(rank: int) -> None:
    from torch.distributed.tensor import DTensor

    from zoo.nn.fsdp import fsdp_units, shard_model

    for name, builder, batch in FAMILIES:
        ref = _build(builder)
        sum(_step(ref, batch(r), r) for r in range(WORLD)).div(WORLD).backward()
        model = _build(builder)
        units = fsdp_units(model)
        assert units, f"{name}: no unit below the root"
        shard_model(model)
        _step(model, batch(rank), rank).backward()
        grads = dict(ref.named_parameters())
        checked = 0
        for pname, p in model.named_parameters():
            assert isinstance(p, DTensor), f"{name}: {pname} is not sharded"
            want = grads[pname].grad
            got = p.grad.full_tensor() if p.grad is not None else None  # collective: same order on both ranks
            if want is None:
                assert got is None or not got.any(), f"{name}: {pname} has a gradient, the reference none"
                continue
            torch.testing.assert_close(got, want, atol=ATOL * max(1.0, float(want.abs().max())), rtol=0,
                                       msg=lambda m, n=f"{name}: gradient of {pname}": f"{n}: {m}")  # fmt: skip
            checked += 1
        assert checked >= len(grads) * 3 // 4, f"{name}: {checked} of {len(grads)} gradients compared"
        # sharp: this rank's half alone gives other gradients
        alone = _build(builder)
        _step(alone, batch(rank), rank).backward()
        head = [n for n, p in alone.named_parameters() if p.grad is not None][-1]
        full = dict(model.named_parameters())[head].grad.full_tensor()
        assert not torch.allclose(full, dict(alone.named_parameters())[head].grad, atol=1e-6), name


# ------------------------------------------------------------------------------ reversible / adjoint under FSDP


class MLPBlock(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _stack_model(memory: str, rule: str) -> nn.Module:
    from zoo.nn import ResidualStack

    torch.manual_seed(0)
    extra = {"gamma": 0.9, "init_velocity": "f"} if rule == "momentum" else {}
    stack = ResidualStack([MLPBlock(6) for _ in range(4)], rule=rule, memory=memory, **extra)
    return nn.Sequential(nn.Linear(8, 6), stack, nn.Linear(6, 3)).double()


def _stack_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4 * WORLD, 8, generator=g, dtype=torch.float64), torch.randint(0, 3, (4 * WORLD,), generator=g)


def _check_rebuilding_stacks(rank: int) -> None:
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor, Shard

    from zoo.nn.fsdp import fsdp_units, shard_model

    x, y = _stack_data()
    for memory, rule in (("reversible", "momentum"), ("adjoint", "euler"), ("adjoint", "heun")):
        ref = _stack_model(memory, rule)
        sum(F.cross_entropy(ref(x[r::WORLD]), y[r::WORLD]) for r in range(WORLD)).div(WORLD).backward()
        model = _stack_model(memory, rule)
        stack = model[1]
        assert fsdp_units(model) == [stack]  # the rebuilding stack is one unit, its blocks are not
        shard_model(model)
        seen: list[tuple[bool, bool, bool]] = []  # (in backward, DTensor, full shape) of every block call

        def record(module: nn.Module, args: Any, in_backward: list[bool], seen: list = seen) -> None:
            w = module.fc1.weight
            seen.append((in_backward[0], isinstance(w, DTensor), tuple(w.shape) == (12, 6) and w.numel() == 72))

        phase = [False]
        hooks = [b.register_forward_pre_hook(functools.partial(record, in_backward=phase)) for b in stack.blocks]
        loss = F.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD])
        phase[0] = True
        loss.backward()
        for h in hooks:
            h.remove()
        rerun = [s for s in seen if s[0]]
        assert len(rerun) >= stack.depth, f"{memory}/{rule}: {len(rerun)} block forwards re-run in backward"
        # every forward, the re-runs inside backward included, saw the gathered plain parameters
        assert all(not is_dtensor and full for _, is_dtensor, full in seen), (memory, rule, seen)
        for pname, p in model.named_parameters():  # resharded after backward: DTensor shards of dimension 0
            rows = -(-p.shape[0] // WORLD)  # torch.chunk's sizes: ceil(n / W) rows, the last rank the rest
            local = min(rows, max(0, p.shape[0] - rank * rows))
            assert isinstance(p, DTensor) and p.placements == (Shard(0),), (memory, pname)
            assert p.to_local().shape[0] == local, (memory, pname, p.to_local().shape)
            assert isinstance(p.grad, DTensor), (memory, pname)
        grads = dict(ref.named_parameters())
        for pname, p in model.named_parameters():
            want = grads[pname].grad
            torch.testing.assert_close(p.grad.full_tensor(), want, atol=ATOL * float(want.abs().max()), rtol=0,
                                       msg=lambda m, n=f"{memory}/{rule}: {pname}": f"{n}: {m}")  # fmt: skip

    # why the policy shards the stack as a whole: units per block inside a rebuilding stack lose their gradients
    # (each re-run forward reshards them before the step's gradient is taken)
    model = _stack_model("reversible", "momentum")
    for block in model[1].blocks:
        fully_shard(block)
    fully_shard(model)
    F.cross_entropy(model(x[rank::WORLD]), y[rank::WORLD]).backward()
    assert all(b.fc1.weight.grad is None for b in model[1].blocks)


def _check_mixed_precision(rank: int) -> None:
    """FSDP2's bf16 policy: the blocks compute with bf16 parameters, the shards and gradients stay float32."""
    from torch.distributed.tensor import DTensor

    from zoo.nn.fsdp import shard_model

    model = _stack_model("full", "euler").float()
    dtypes: list[torch.dtype] = []
    model[1].blocks[0].register_forward_pre_hook(lambda m, a: dtypes.append(m.fc1.weight.dtype))
    shard_model(model, mixed_precision="bf16")
    x, y = _stack_data()
    F.cross_entropy(model(x[rank::WORLD].float()).float(), y[rank::WORLD]).backward()
    assert dtypes and all(d == torch.bfloat16 for d in dtypes), dtypes
    for p in model.parameters():
        assert isinstance(p, DTensor) and p.dtype == torch.float32 and p.grad.dtype == torch.float32


# ------------------------------------------------------------------------------------------------ Lightning


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    from zoo.data.digits import DigitsDataModule

    data = DigitsDataModule(image_size=16, channels=1, augment=False)
    data.setup("fit")
    n = STEPS * WORLD * LOCAL_BATCH
    return data.train_images[:n].double(), data.train_labels[:n]


def _lightning_vit() -> Any:
    from zoo.models import SinkformerViT

    torch.manual_seed(0)
    model = SinkformerViT(**VIT, optimizer=functools.partial(torch.optim.SGD, lr=0.5, momentum=0.9), lr_scheduler=None)
    return model.double()


def _trainer(devices: int, root: Path, strategy: Any = "auto", validate: bool = False) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        use_distributed_sampler=False, num_sanity_val_steps=int(validate), limit_val_batches=int(validate),
        default_root_dir=str(root),
    )  # fmt: skip


def _loader(images: torch.Tensor, labels: torch.Tensor, batch: int) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


def _check_lightning(rank: int, out_dir: Path) -> None:
    """A Sinkformer ViT through Lightning with strategy="fsdp2": rank r takes rows [r b, (r + 1) b) of every global
    batch of W b; a full checkpoint and a sharded (DCP) one."""
    from torch.distributed.tensor import DTensor

    os.environ.update({"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(WORLD)})
    images, labels = _digits()
    rows = torch.arange(len(labels)).view(STEPS, WORLD, LOCAL_BATCH)[:, rank].reshape(-1)
    model = _lightning_vit()
    trainer = _trainer(WORLD, out_dir, "fsdp2", validate=True)  # a validation step before and after training
    loader = _loader(images[rows], labels[rows], LOCAL_BATCH)
    trainer.fit(model, train_dataloaders=loader, val_dataloaders=loader)
    assert "val_loss" in trainer.callback_metrics
    assert type(trainer.strategy).__name__ == "FSDP2Strategy"
    assert all(isinstance(p, DTensor) for p in model.parameters())
    trainer.save_checkpoint(out_dir / "fsdp2.ckpt")  # full state dict, gathered; rank 0 writes
    trainer.strategy._save_distributed_checkpoint = True
    trainer.save_checkpoint(out_dir / "fsdp2_sharded")  # every rank writes its shards


# ------------------------------------------------------------------------------------------------ the workers


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message=".*self.log\\(\\)` but the `self.trainer` reference")
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        _check_rebuilding_stacks(rank)
        _check_mixed_precision(rank)
        _check_families(rank)
        _check_lightning(rank, Path(out_dir))
        dist.barrier()
        (Path(out_dir) / f"done{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.distributed
def test_two_processes_match_one(two_ranks: Path) -> None:
    """Every worker check passed: each family's gradients under FSDP2 equal one process's (ResNets with full,
    adjoint and reversible memory, Sinkformer ViT, V-MoE, translation, point clouds); the rebuilding stacks re-run
    their blocks on gathered parameters and leave them sharded; bf16 mixed precision."""
    assert {p.name for p in two_ranks.glob("done*")} == {"done0", "done1"}


@pytest.mark.distributed
def test_fsdp2_checkpoints_load_into_one_process(two_ranks: Path, tmp_path: Path) -> None:
    """The Lightning FSDP2 run's full checkpoint and its converted sharded checkpoint load into a single-process
    model and hold the parameters of one process trained on the same global batches."""
    from zoo.models import SinkformerViT
    from zoo.nn.fsdp import consolidate_checkpoint

    images, labels = _digits()
    model = _lightning_vit()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    _trainer(1, tmp_path).fit(model, train_dataloaders=_loader(images, labels, WORLD * LOCAL_BATCH))
    want = model.state_dict()
    converted = consolidate_checkpoint(two_ranks / "fsdp2_sharded", tmp_path / "converted.ckpt")
    for path in (two_ranks / "fsdp2.ckpt", converted):
        ckpt = torch.load(path, weights_only=False)
        assert ckpt["global_step"] == STEPS and len(ckpt["optimizer_states"]) == 1
        saved = ckpt["state_dict"]
        assert saved.keys() == want.keys()
        for key, value in want.items():  # float64 as trained: the same parameters to rounding
            torch.testing.assert_close(saved[key], value, atol=1e-9, rtol=1e-7, msg=f"{path.name}: {key}")
        # the optimiser state: by parameter index in the gathered file, by parameter name (DCP's layout) converted
        keys = set(ckpt["optimizer_states"][0]["state"])
        names = {n for n, p in model.named_parameters() if p.requires_grad}
        assert keys == (set(range(len(names))) if path.name == "fsdp2.ckpt" else names), sorted(keys, key=str)[:4]
        single = SinkformerViT.load_from_checkpoint(path, weights_only=False)  # one process, built in float32
        for key, value in single.state_dict().items():
            torch.testing.assert_close(value, want[key].to(value.dtype), msg=f"{path.name}: loaded {key}")
    moved = (want["blocks.1.mlp.fc2.weight"] - before["blocks.1.mlp.fc2.weight"]).abs().amax()
    assert moved > 1e-3  # trained by far more than the tolerance


def test_policy_units_per_family() -> None:
    """Which modules get their own unit (no process group needed)."""
    from zoo.nn.fsdp import fsdp_units

    vit = _build(_vit)
    assert fsdp_units(vit) == list(vit.blocks)[::-1]
    for memory in ("full", "reversible"):
        resnet = _build(functools.partial(_resnet, "momentum_tiny", memory))
        stacks = [m for m in resnet.modules() if type(m).__name__ == "ResidualStack"]
        units = fsdp_units(resnet)
        if memory == "full":
            assert all(b in units for s in stacks for b in s.blocks) and not set(map(id, stacks)) & set(map(id, units))
        else:
            assert units == stacks[::-1]


def test_errors() -> None:
    from zoo.errors import ZooError
    from zoo.nn.fsdp import FSDP2Strategy, consolidate_checkpoint, mixed_precision_policy

    with pytest.raises(ZooError, match="unknown mixed_precision 'bf8'"):
        mixed_precision_policy("bf8")
    with pytest.raises(ZooError, match="reshard_after_forward"):
        FSDP2Strategy(reshard_after_forward="yes")
    with pytest.raises(ZooError, match="not a sharded checkpoint folder"):
        consolidate_checkpoint(Path(__file__).parent, Path("unused.ckpt"))


@pytest.mark.distributed
def test_recipe_trains_with_fsdp2_through_the_cli(tmp_path: Path) -> None:
    """``zoo fit --config digits_momentum_resnet --trainer.strategy fsdp2`` on 2 CPU processes: a reversible
    Momentum ResNet trains and validates sharded, and the checkpoint Lightning's callback wrote loads in one
    process."""
    import subprocess
    import sys

    cmd = [
        sys.executable, "-m", "zoo.cli", "fit", "--config", "digits_momentum_resnet",
        "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "fsdp2",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("zoo: val_acc")]
    assert len(lines) == 1, proc.stdout
    (ckpt,) = tmp_path.rglob("*.ckpt")
    from zoo.models import MomentumResNet

    single = MomentumResNet.load_from_checkpoint(ckpt, weights_only=False)  # the full layout, in one process
    assert single.layer3.memory == "reversible"
    saved = torch.load(ckpt, weights_only=False)["state_dict"]
    assert all(not type(v).__name__ == "DTensor" for v in saved.values())
    assert saved["fc.weight"].shape == single.fc.weight.shape
    # resuming sharded: the strategy loads the weights itself and takes "state_dict" out of the checkpoint, which
    # the model's own key check must not read as every key missing
    resume = [*cmd[: cmd.index("--trainer.max_epochs") + 1], "2", *cmd[cmd.index("--trainer.max_epochs") + 2 :]]
    proc = subprocess.run(
        [*resume, "--ckpt_path", str(ckpt)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "missing" not in proc.stderr and any(line.startswith("zoo: val_acc") for line in proc.stdout.splitlines())
    assert len(list(tmp_path.rglob("epoch=1-*.ckpt"))) == 1


def test_save_pretrained_of_a_sharded_model_names_the_way_out(tmp_path: Path) -> None:
    """A model sharded by fully_shard (its class FSDP<Class>, its parameters shards) is refused by save_pretrained
    with one error naming FSDP2 and how to save from its checkpoint (one process, a world of 1, in a subprocess so
    that no process group outlives it)."""
    import subprocess
    import sys

    script = f"""
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
import zoo
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
model = zoo.depth_scaled_cifar_resnet(layers=(1, 1, 1), widths=(4, 8, 8))
fully_shard(model)
try:
    model.save_pretrained({str(tmp_path / "m")!r})
except zoo.ZooError as e:
    print("ZOOERROR", e)
dist.destroy_process_group()
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    (line,) = [x for x in done.stdout.splitlines() if x.startswith("ZOOERROR")]
    assert "cannot save a DepthScaledResNet sharded by FSDP2" in line
    assert "zoo.models.DepthScaledResNet.load_from_checkpoint(path).save_pretrained(folder)" in line
    assert "consolidate_checkpoint" in line and not (tmp_path / "m").exists()
