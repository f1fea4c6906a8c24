"""Expert parallelism of zoo.nn.MoE on 2 real processes (gloo), against the single-process layer.

One spawn of 2 workers runs every multi-process check (start-up is the cost): each worker builds the
single-process reference layer itself (same seed), shards a copy over the 2 ranks and compares, in float64, the
outputs and every gradient (input, router, experts) for token and expert choice, hard and relaxed top-k; then the
unsharded checkpoint layout, the optimiser state, the (data, expert) mesh shapes runnable on 2 ranks, and a V-MoE
trained through Lightning with ExpertParallelStrategy, which the test compares with a single-process Trainer run on
the same global batches. A last test runs the shipped recipe through the ``zoo`` CLI on 2 processes.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zoo.errors import ZooError
from zoo.nn.moe import MoE

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
DIM, HIDDEN, E = 6, 8, 4
B, T = 3, 5  # sequences and tokens per rank
# (name, MoE options, whether the reference is one call on the global batch (True) or one call per rank's tokens)
LAYERS = [
    ("token_hard_k2_capacity", {"router": "token_choice", "k": 2, "capacity_factor": 1.0}, False),
    ("token_soft_k2_capacity", {"router": "token_choice", "k": 2, "capacity_factor": 1.0, "topk": "soft"}, False),
    ("token_hard_k1_no_limit", {"router": "token_choice", "k": 1, "capacity_factor": None}, True),
    ("expert_hard", {"router": "expert_choice", "capacity_factor": 2.0}, True),
    ("expert_soft", {"router": "expert_choice", "capacity_factor": 2.0, "topk": "soft", "lam": 0.05}, True),
]
SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")
# the Lightning V-MoE run: steps, per-rank batch, SGD, gradient clipping (active: the test checks the norms)
STEPS, LOCAL_BATCH, CLIP = 3, 4, 0.5
VMOE = {
    "img_size": 16,
    "patch_size": 4,
    "in_chans": 1,
    "num_classes": 10,
    "embed_dim": 16,
    "depth": 2,
    "num_heads": 2,
    "mlp_ratio": 2.0,
    "class_token": False,
    "global_pool": "avg",
    "num_experts": 4,
    "moe_every": 1,
    "router": "expert_choice",
    "capacity_factor": 2.0,
}


def make_layer(options: dict[str, Any], seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    return MoE(DIM, HIDDEN, E, dtype=torch.float64, **options)


def make_inputs(seed: int, world: int = WORLD) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (world * B, T, DIM), a padding mask (some padded tokens) and output weights G."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(world * B, T, DIM, generator=g, dtype=torch.float64)
    pad = torch.zeros(world * B, T, dtype=torch.bool)
    pad[1, -2:] = True
    pad[B + 2, -1] = True
    weights = torch.randn(world * B, T, DIM, generator=g, dtype=torch.float64)
    return x, pad, weights


def reference(options: dict[str, Any], one_call: bool, seed: int, world: int = WORLD) -> dict[str, torch.Tensor]:
    """Single process: the layer on the global batch (one call, or one call per rank's tokens), loss
    sum_r [sum(G_r * MoE(x_r)) + aux_r]; outputs and the gradients of every parameter and of x."""
    layer = make_layer(options)
    x, pad, weights = make_inputs(seed, world)
    x = x.clone().requires_grad_(True)
    chunks = (
        [(x, pad, weights)]
        if one_call
        else [(x[r * B : (r + 1) * B], pad[r * B : (r + 1) * B], weights[r * B : (r + 1) * B]) for r in range(world)]
    )
    outs, loss = [], 0.0
    for xc, pc, wc in chunks:
        out = layer(xc, padding_mask=pc)
        outs.append(out)
        loss = loss + (out * wc).sum() + (0.0 if one_call else layer.aux_loss)
    loss.backward()
    result = {"out": torch.cat(outs).detach(), "x.grad": x.grad}
    result.update({f"{name}.grad": p.grad for name, p in layer.named_parameters()})
    result.update({f"param.{name}": p.detach().clone() for name, p in layer.named_parameters()})
    return result


# ------------------------------------------------------------------------------------------------ the workers


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-12) -> None:
    torch.testing.assert_close(a, b, atol=atol, rtol=1e-10, msg=lambda m: f"{what}: {m}")


def _check_layers(rank: int, mesh: Any, world: int = WORLD) -> None:
    """Outputs and every gradient of the sharded layer (the ``mesh``'s expert dimension) against the reference
    on the global batch of the ``world`` ranks; ``reduce_expert_gradients`` (the data dimension) included."""
    from zoo.nn.expert_parallel import reduce_expert_gradients, shard_experts

    P = mesh["expert"].size()
    lo, hi = mesh["expert"].get_local_rank() * E // P, (mesh["expert"].get_local_rank() + 1) * E // P
    for case, (name, options, one_call) in enumerate(LAYERS):
        ref = reference(options, one_call, seed=case, world=world)
        layer = shard_experts(make_layer(options, seed=100 + case), mesh)  # other init: overwritten by the load
        full = {k[len("param.") :]: v for k, v in ref.items() if k.startswith("param.")}
        layer.load_state_dict(full)  # the unsharded layout, sliced to this rank's experts
        assert layer.experts.fc1.weight.shape[0] == E // P
        x, pad, weights = make_inputs(case, world)
        mine = slice(rank * B, (rank + 1) * B)
        xr = x[mine].clone().requires_grad_(True)
        out = layer(xr, padding_mask=pad[mine])
        loss = (out * weights[mine]).sum() + (0.0 if one_call else layer.aux_loss)
        loss.backward()
        _close(out, ref["out"][mine], f"{name}: output")
        _close(xr.grad, ref["x.grad"][mine], f"{name}: input gradient")
        # the replicated router: DDP would average over the ranks; experts: reduce_expert_gradients does
        reduce_expert_gradients(layer)
        for pname, p in layer.named_parameters():
            grad = p.grad.clone()
            if pname.startswith("experts."):
                _close(grad, ref[f"{pname}.grad"][lo:hi] / world, f"{name}: gradient of {pname}")
            else:
                dist.all_reduce(grad)
                _close(grad / world, ref[f"{pname}.grad"] / world, f"{name}: gradient of {pname}")
        # the check is not vacuous: this rank's tokens were computed by another rank's experts too
        routing = layer.route(x[mine], padding_mask=pad[mine])
        remote = torch.cat([routing.index[:lo], routing.index[hi:]])
        assert (remote < B * T).any(), f"{name}: no token of rank {rank} went to another rank's experts"
        if name == "token_hard_k2_capacity":
            dropped = routing.stats["dropped_fraction"].double().reshape(1)
            dist.all_reduce(dropped)
            assert float(dropped) > 0  # capacity drops assignments (on some rank): per-rank routing groups
        # the unsharded state dict (an all-gather) is the reference's, on every rank
        state = layer.state_dict()
        for key, value in full.items():
            assert torch.equal(state[key], value), f"{name}: state_dict()[{key!r}]"


def _check_no_host_sync(mesh: Any) -> None:
    """Forward and backward of the sharded hard routers read nothing back to the host (the buffer sizes come from
    the capacity): every Tensor-to-Python conversion raises while they run."""
    from zoo.nn.expert_parallel import shard_experts

    x, pad, weights = make_inputs(11)
    for options in (LAYERS[0][1], LAYERS[3][1]):
        layer = shard_experts(make_layer(options), mesh)
        saved = {name: getattr(torch.Tensor, name) for name in SYNCS}

        def forbidden(*args: Any, **kwargs: Any) -> None:
            raise AssertionError("host sync in the expert-parallel layer")

        try:
            for name in SYNCS:
                setattr(torch.Tensor, name, forbidden)
            out = layer(x[:B], padding_mask=pad[:B])
            ((out * weights[:B]).sum() + layer.aux_loss).backward()
        finally:
            for name, method in saved.items():
                setattr(torch.Tensor, name, method)


def _check_checkpoints_and_optimizer(rank: int, mesh: Any, out_dir: Path) -> None:
    from zoo.nn.expert_parallel import (
        gather_expert_optimizer_state,
        reduce_expert_gradients,
        shard_expert_optimizer_state,
        shard_experts,
    )

    options = LAYERS[0][1]
    x, pad, weights = make_inputs(7)
    mine = slice(rank * B, (rank + 1) * B)
    # one Adam step at EP=2, from the single-process checkpoint written by the test (single process -> EP=2)
    layer = shard_experts(make_layer(options, seed=1), mesh)
    layer.load_state_dict(torch.load(out_dir / "single.pt", weights_only=True))
    opt = torch.optim.Adam(layer.parameters(), lr=0.01)
    out = layer(x[mine], padding_mask=pad[mine])
    ((out * weights[mine]).sum() + layer.aux_loss).backward()
    reduce_expert_gradients(layer)
    for pname, p in layer.named_parameters():
        if not pname.startswith("experts."):  # the replicated router: averaged over the ranks, as DDP does
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    opt.step()
    state = layer.state_dict()
    opt_state = gather_expert_optimizer_state(layer, opt, opt.state_dict())
    if rank == 0:  # EP=2 -> single process: the test loads these in one process
        torch.save(state, out_dir / "ep2.pt")
        torch.save(opt_state, out_dir / "ep2_adam.pt")
    # the optimiser's own state stays sharded; the round trip gives it back
    local = shard_expert_optimizer_state(layer, opt, opt_state)
    for index, entry in opt.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(local["state"][index][key], value), (index, key)
    # a sharded-layout tensor is refused with one clear error
    bad = dict(state)
    bad["experts.fc1.weight"] = layer.experts.fc1.weight.detach()
    try:
        layer.load_state_dict(bad)
    except ZooError as e:
        assert "unsharded layout" in str(e)
    else:
        raise AssertionError("a sharded-layout expert tensor was accepted")


def _check_meshes(rank: int) -> None:
    from zoo.nn.expert_parallel import expert_parallel_mesh, is_expert_parallel, shard_experts

    # data x expert = 2 x 1: pure data parallelism, nothing sharded (DDP reduces the experts like any parameter)
    mesh = expert_parallel_mesh(1, "cpu")
    assert mesh.shape == (2, 1) and mesh.mesh_dim_names == ("data", "expert")
    assert dist.get_process_group_ranks(mesh["data"].get_group()) == [0, 1]
    layer = shard_experts(make_layer(LAYERS[0][1]), mesh)
    assert not is_expert_parallel(layer) and layer.experts.fc1.weight.shape[0] == E
    # 1 x 2: both ranks one expert group
    mesh = expert_parallel_mesh(2, "cpu")
    assert mesh.shape == (1, 2) and dist.get_process_group_ranks(mesh["expert"].get_group()) == [0, 1]
    for bad, match in ((3, "dividing the world size 2"), (0, "positive integer")):
        try:
            expert_parallel_mesh(bad, "cpu")
        except ZooError as e:
            assert match in str(e), str(e)
        else:
            raise AssertionError(f"expert_parallel_size={bad} accepted")
    try:
        shard_experts(MoE(DIM, HIDDEN, 3), mesh)
    except ZooError as e:
        assert "not divisible by expert_parallel_size=2" in str(e)
    else:
        raise AssertionError("3 experts sharded over 2 ranks")
    sharded = shard_experts(make_layer(LAYERS[0][1]), mesh)
    try:
        shard_experts(sharded, mesh)
    except ZooError as e:
        assert "already sharded" in str(e)
    else:
        raise AssertionError("sharded twice")


def _digits_batches() -> tuple[torch.Tensor, torch.Tensor]:
    from zoo.data.digits import DigitsDataModule

    data = DigitsDataModule(image_size=16, channels=1, augment=False)
    data.setup("fit")
    n = STEPS * WORLD * LOCAL_BATCH
    return data.train_images[:n].double(), data.train_labels[:n]


def _vmoe(**extra: Any) -> Any:
    from zoo.models import VisionMoE

    torch.manual_seed(0)
    return VisionMoE(
        **VMOE, optimizer=functools.partial(torch.optim.SGD, lr=1.0, momentum=0.9), lr_scheduler=None, **extra
    )


def _trainer(devices: int, steps: int, root: Path, strategy: Any = "auto", callbacks: Any = None) -> Any:
    import lightning.pytorch as pl

    return pl.Trainer(
        callbacks=callbacks,
        gradient_clip_val=CLIP,  # by the norm of the whole model: every rank's experts count
        accelerator="cpu",
        devices=devices,
        strategy=strategy,
        precision="64-true",
        max_steps=steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=str(root),
    )


def _loader(images: torch.Tensor, labels: torch.Tensor, batch: int) -> Any:
    from torch.utils.data import DataLoader, TensorDataset

    return DataLoader(TensorDataset(images, labels), batch_size=batch, shuffle=False)


def _check_lightning(rank: int, out_dir: Path) -> None:
    """V-MoE through Lightning with ExpertParallelStrategy: 2 steps, a checkpoint (unsharded), then 1 more step
    resumed from it; rank r takes samples [r * b, (r + 1) * b) of every global batch of 2b."""
    from zoo.nn.expert_parallel import ExpertParallelStrategy

    os.environ.update({"LOCAL_RANK": str(rank), "NODE_RANK": "0", "WORLD_SIZE": str(WORLD)})
    images, labels = _digits_batches()
    shard = torch.cat(
        [
            torch.arange(s * WORLD * LOCAL_BATCH, (s + 1) * WORLD * LOCAL_BATCH).view(WORLD, -1)[rank]
            for s in range(STEPS)
        ]
    )
    loader = _loader(images[shard], labels[shard], LOCAL_BATCH)
    model = _vmoe()
    trainer = _trainer(WORLD, STEPS - 1, out_dir, ExpertParallelStrategy(expert_parallel_size=WORLD))
    trainer.fit(model, train_dataloaders=loader)
    assert model.blocks[0].mlp.experts.fc1.weight.shape[0] == VMOE["num_experts"] // WORLD
    trainer.save_checkpoint(out_dir / "ep2.ckpt")  # every rank takes part (gathers); rank 0 writes
    state = model.state_dict()
    if rank == 0:
        torch.save(state, out_dir / f"vmoe_step{STEPS - 1}.pt")
    # resume at EP=2 from the unsharded checkpoint (weights and SGD momentum sliced back)
    resumed = _vmoe()
    trainer = _trainer(WORLD, STEPS, out_dir, ExpertParallelStrategy(expert_parallel_size=WORLD))
    trainer.fit(resumed, train_dataloaders=loader, ckpt_path=out_dir / "ep2.ckpt")
    state = resumed.state_dict()
    if rank == 0:
        torch.save(state, out_dir / f"vmoe_step{STEPS}.pt")


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=120)
    )
    try:
        from zoo.nn.expert_parallel import expert_parallel_mesh

        mesh = expert_parallel_mesh(WORLD, "cpu")
        _check_layers(rank, mesh)
        _check_no_host_sync(mesh)
        _check_checkpoints_and_optimizer(rank, mesh, Path(out_dir))
        _check_meshes(rank)
        _check_lightning(rank, Path(out_dir))
        dist.barrier()
        (Path(out_dir) / f"done{rank}").write_text("ok")
    finally:
        dist.destroy_process_group()


def _worker_data_by_expert(rank: int, init_file: str) -> None:
    """4 ranks, mesh (data 2, expert 2): the experts' gradients are also summed over the data dimension."""
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=4, timeout=timedelta(seconds=120)
    )
    try:
        from zoo.nn.expert_parallel import expert_parallel_mesh

        mesh = expert_parallel_mesh(2, "cpu")
        assert mesh.shape == (2, 2)
        _check_layers(rank, mesh, world=4)
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ the tests


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Spawn the 2 workers once; their files (checkpoints, trained weights) land in the returned folder."""
    out = tmp_path_factory.mktemp("expert_parallel")
    torch.save(make_layer(LAYERS[0][1], seed=5).state_dict(), out / "single.pt")
    mp.spawn(_worker, args=(str(out / "init"), str(out)), nprocs=WORLD, join=True)
    return out


@pytest.mark.distributed
def test_two_processes_match_one(two_ranks: Path) -> None:
    """Every worker check passed (outputs and all gradients of the 5 router settings, meshes, errors)."""
    assert {p.name for p in two_ranks.glob("done*")} == {"done0", "done1"}


@pytest.mark.distributed
def test_checkpoint_saved_at_ep2_loads_in_one_process(two_ranks: Path) -> None:
    """The EP=2 state dict and Adam state (unsharded) are those of one process taking the same step."""
    options = LAYERS[0][1]
    layer = make_layer(options, seed=3)
    layer.load_state_dict(torch.load(two_ranks / "ep2.pt", weights_only=True))
    ref = make_layer(options, seed=5)
    opt = torch.optim.Adam(ref.parameters(), lr=0.01)
    x, pad, weights = make_inputs(7)
    loss = 0.0
    for r in range(WORLD):  # one routing group per rank, the loss a mean over the ranks (DDP)
        mine = slice(r * B, (r + 1) * B)
        loss = loss + ((ref(x[mine], padding_mask=pad[mine]) * weights[mine]).sum() + ref.aux_loss) / WORLD
    loss.backward()
    opt.step()
    for key, value in ref.state_dict().items():
        torch.testing.assert_close(layer.state_dict()[key], value, atol=1e-12, rtol=1e-10, msg=key)
    saved = torch.load(two_ranks / "ep2_adam.pt", weights_only=True)
    for index, entry in opt.state_dict()["state"].items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(saved["state"][index][key], entry[key], atol=1e-12, rtol=1e-10)
    before = make_layer(options, seed=5).state_dict()
    assert not torch.allclose(layer.state_dict()["experts.fc1.weight"], before["experts.fc1.weight"])


@pytest.mark.distributed
@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_vmoe_lightning_expert_parallel_matches_one_process(two_ranks: Path, tmp_path: Path) -> None:
    """The V-MoE trained by 2 processes with ExpertParallelStrategy (2 steps, checkpoint, 1 resumed step) has the
    parameters of one process trained on the same global batches, after step 2 and after the resumed step 3."""
    import lightning.pytorch as pl

    norms = []

    class GradNorm(pl.Callback):  # the norm before clipping (the hook runs after the backward, before the clip)
        def on_before_optimizer_step(self, trainer: Any, module: Any, optimizer: Any) -> None:
            grads = [p.grad for p in module.parameters() if p.grad is not None]
            norms.append(float(torch.nn.utils.get_total_norm(grads)))

    images, labels = _digits_batches()
    loader = _loader(images, labels, WORLD * LOCAL_BATCH)
    model = _vmoe()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = _trainer(1, STEPS - 1, tmp_path, callbacks=[GradNorm()])
    trainer.fit(model, train_dataloaders=loader)
    trainer.save_checkpoint(tmp_path / "one.ckpt")
    for steps in (STEPS - 1, STEPS):
        if steps == STEPS:  # resumed from the checkpoint, as the two processes did
            model = _vmoe()
            trainer = _trainer(1, STEPS, tmp_path, callbacks=[GradNorm()])
            trainer.fit(model, train_dataloaders=loader, ckpt_path=tmp_path / "one.ckpt")
        got = torch.load(two_ranks / f"vmoe_step{steps}.pt", weights_only=True)
        want = model.state_dict()
        assert got.keys() == want.keys()
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, atol=1e-6, rtol=1e-5, msg=f"step {steps}: {key}")
    moved = model.state_dict()["blocks.0.mlp.experts.fc2.weight"] - before["blocks.0.mlp.experts.fc2.weight"]
    assert len(norms) == STEPS and min(norms) > 1.5 * CLIP  # clipping scaled every step
    # the experts of both halves of the mesh were trained, by far more than the tolerance above
    assert moved[: VMOE["num_experts"] // WORLD].abs().amax() > 1e-3
    assert moved[VMOE["num_experts"] // WORLD :].abs().amax() > 1e-3
    # the Lightning checkpoint is in the unsharded layout (weights and optimiser state) and loads in one process
    ckpt = torch.load(two_ranks / "ep2.ckpt", weights_only=False)
    assert ckpt["state_dict"]["blocks.0.mlp.experts.fc1.weight"].shape[0] == VMOE["num_experts"]
    single = _vmoe()
    single.load_state_dict(ckpt["state_dict"])


@pytest.mark.distributed
def test_four_processes_data_2_by_expert_2(tmp_path: Path) -> None:
    """DP x EP = 2 x 2 on 4 processes: outputs and every gradient equal the single process on the global batch."""
    mp.spawn(_worker_data_by_expert, args=(str(tmp_path / "init"),), nprocs=4, join=True)


@pytest.mark.parametrize("shape", [(4, 2), (2, 4), (1, 8), (8, 1)], ids=lambda s: f"data{s[0]}xexpert{s[1]}")
def test_data_by_expert_meshes_of_8_ranks(shape: tuple[int, int]) -> None:
    """The (data, expert) layout at world size 8, with torch's fake process group (no communication): rank
    r = d * P + p holds experts [p E/P, (p + 1) E/P), its expert group is the P consecutive ranks of its row and its
    data group the D ranks with the same p; DDP is told to skip exactly the expert parameters."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from zoo.nn.expert_parallel import expert_parallel_mesh, expert_parameters, is_expert_parallel, shard_experts

    D, P = shape
    for rank in (0, 5, 7):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=8)
        try:
            layer = shard_experts(MoE(DIM, HIDDEN, 8, router_bias=True), expert_parallel_mesh(P, "cpu"))
            d, p = divmod(rank, P)
            assert is_expert_parallel(layer) == (P > 1)
            assert layer.experts.fc1.weight.shape[0] == layer.experts.fc2.bias.shape[0] == 8 // P
            if P == 1:
                assert not hasattr(layer, "_ddp_params_and_buffers_to_ignore")
                continue
            shard = layer.expert_shard
            assert (shard.first, shard.num_local, shard.rank, shard.size, shard.world) == (p * 8 // P, 8 // P, p, P, 8)
            assert dist.get_process_group_ranks(shard.group) == [d * P + q for q in range(P)]
            if D == 1:
                assert shard.data_group is None
            else:
                assert dist.get_process_group_ranks(shard.data_group) == [e * P + p for e in range(D)]
            ignored = set(layer._ddp_params_and_buffers_to_ignore)
            assert ignored == {name for name, _, _ in expert_parameters(layer)}
            assert ignored == {f"experts.{a}.{b}" for a in ("fc1", "fc2") for b in ("weight", "bias")}
        finally:
            dist.destroy_process_group()


@pytest.mark.distributed
def test_recipe_trains_two_cpu_processes_expert_parallel(tmp_path: Path) -> None:
    """``zoo fit --config digits_vmoe_expert_parallel`` as written: 2 CPU processes, 2 experts per rank."""
    cmd = [
        sys.executable, "-m", "zoo.cli", "fit", "--config", "digits_vmoe_expert_parallel",
        "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "2",
        "--trainer.enable_progress_bar", "false", "--trainer.default_root_dir", str(tmp_path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "distributed_backend=gloo" in proc.stderr + proc.stdout
    lines = [line for line in proc.stdout.splitlines() if line.startswith("zoo: val_acc")]
    assert len(lines) == 1, proc.stdout
    (ckpt,) = tmp_path.rglob("*.ckpt")
    from zoo.models import VisionMoE

    single = VisionMoE.load_from_checkpoint(ckpt, weights_only=False)  # the unsharded layout, in one process
    assert single.blocks[1].mlp.experts.fc1.weight.shape[0] == single.hparams["num_experts"] == 4
