"""Fully sharded data parallelism (FSDP2, ``torch.distributed.fsdp.fully_shard``) for every family of the zoo.

FSDP2 splits every parameter along its first dimension over the W ranks of a data-parallel mesh (a ``DTensor``
with a ``Shard(0)`` placement): rank r keeps 1/W of each parameter, its gradient and its optimiser state. Before a
sharding *unit* (a module given to ``fully_shard``) runs its forward, its parameters are all-gathered; after the
forward they are freed again ("resharded"); the backward gathers them once more and reduce-scatters the gradients,
so that rank r receives the shard of (1/W) sum_q dL_q/dtheta, the gradient of the mean loss over the global batch
(each L_q a mean over rank q's batch), as DDP does.

The sharding policy (:func:`fsdp_units`) decides which modules are units; every parameter belongs to the innermost
unit that contains it, the model itself being the last (root) unit:

- a :class:`zoo.nn.ResidualStack` with ``memory="full"`` and untied blocks: each block (and the transition) is a
  unit, gathered and freed one block at a time;
- a :class:`zoo.nn.ResidualStack` with ``memory="adjoint"`` or ``"reversible"``, or with tied blocks: the whole
  stack is ONE unit. Its backward is one autograd function that re-runs every block's forward (from the rebuilt
  state) and differentiates it step by step with respect to the parameters it received in forward; the stack's
  unit gathers them once before that backward (FSDP's pre-backward hook on the stack's output), every re-run sees
  the unsharded parameters, and FSDP's post-backward reduce-scatters their gradients and frees them again. A
  block-level unit inside such a stack would be resharded after each re-run forward and its gradients would not
  reach FSDP (see ``docs/scaling/fsdp.md``);
- the blocks of a transformer (the entries of an ``nn.ModuleList`` / ``nn.Sequential`` of at least two modules of
  one class holding parameters: ViT / V-MoE blocks, encoder and decoder layers, point-cloud attention blocks);
- the model (root): stems, embeddings, norms and heads.

:class:`FSDP2Strategy` applies the policy under Lightning (``--trainer.strategy fsdp2``), on CPU (gloo) and GPU
(NCCL), with FSDP2's mixed-precision policies; checkpoints hold the full (unsharded) state dict by default, so a
checkpoint written by W processes loads in one (:func:`consolidate_checkpoint` converts a sharded DCP folder).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.fabric.plugins.collectives.torch_collective import default_pg_timeout
from lightning.fabric.utilities.init import _materialize_distributed_module
from lightning.fabric.utilities.optimizer import _optimizers_to_device
from lightning.pytorch.strategies import ModelParallelStrategy, StrategyRegistry
from lightning.pytorch.trainer.states import TrainerFn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from zoo.errors import ZooError
from zoo.nn.residual_function import has_tail
from zoo.nn.residual_stack import ResidualStack

__all__ = [
    "FSDP2Strategy",
    "MIXED_PRECISION",
    "consolidate_checkpoint",
    "fsdp_mesh",
    "fsdp_units",
    "mixed_precision_policy",
    "shard_model",
]

# short names of FSDP2 mixed-precision policies: parameters all-gathered (and computed) in the low precision,
# gradients reduce-scattered in float32, the sharded parameters and the optimiser kept in float32
MIXED_PRECISION: Mapping[str, MixedPrecisionPolicy] = {
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp16": MixedPrecisionPolicy(param_dtype=torch.float16, reduce_dtype=torch.float32),
}


def mixed_precision_policy(policy: str | MixedPrecisionPolicy | None) -> MixedPrecisionPolicy:
    """The FSDP2 :class:`~torch.distributed.fsdp.MixedPrecisionPolicy` for ``policy``.

    Args:
        policy: ``None`` (compute in the parameters' dtype), ``"bf16"`` / ``"fp16"`` (parameters gathered and used
            in that dtype, gradients reduced in float32) or a ``MixedPrecisionPolicy``.
    """
    if policy is None:
        return MixedPrecisionPolicy()
    if isinstance(policy, MixedPrecisionPolicy):
        return policy
    if isinstance(policy, str) and policy in MIXED_PRECISION:
        return MIXED_PRECISION[policy]
    raise ZooError(
        f"unknown mixed_precision {policy!r}: choose None, {', '.join(repr(k) for k in MIXED_PRECISION)} or a "
        "torch.distributed.fsdp.MixedPrecisionPolicy"
    )


def _has_parameters(module: nn.Module) -> bool:
    return next(module.parameters(), None) is not None


def _block_list(container: nn.Module) -> list[nn.Module] | None:
    """The entries of a ModuleList / Sequential of >= 2 distinct modules of one class with parameters (blocks)."""
    if not isinstance(container, (nn.ModuleList, nn.Sequential)) or isinstance(container, ResidualStack):
        return None
    entries = list(container)
    if len(entries) < 2 or len({type(m) for m in entries}) != 1 or len({id(m) for m in entries}) != len(entries):
        return None
    return entries if all(_has_parameters(m) for m in entries) else None


def fsdp_units(model: nn.Module) -> list[nn.Module]:
    """The modules :func:`shard_model` gives their own ``fully_shard`` unit, innermost first (the model excluded:
    it is always the root unit). The policy is described in the module docstring.

    Args:
        model: the model (a zoo family or any module built from :class:`zoo.nn.ResidualStack` and block lists).
    """
    units: list[nn.Module] = []
    seen: set[int] = set()

    def add(module: nn.Module) -> None:
        if id(module) not in seen and module is not model and _has_parameters(module):
            seen.add(id(module))
            units.append(module)

    def visit(module: nn.Module) -> None:
        if isinstance(module, ResidualStack):
            if module.memory != "full" or len({id(b) for b in module.blocks}) != module.depth:
                add(module)  # the rebuilding backward (or a tied block) needs the whole stack gathered at once
                return
            for child in module.children():
                visit(child)
                add(child)
            return
        blocks = _block_list(module)
        for child in module.children():
            visit(child)
        if blocks is not None:
            for block in blocks:
                add(block)

    visit(model)
    # children before parents: fully_shard of a parent then manages only the parameters left to it
    order = {id(m): i for i, m in enumerate(model.modules())}
    return sorted(units, key=lambda m: -order[id(m)])


def fsdp_mesh(device_type: str | None = None) -> DeviceMesh:
    """A 1-D data-parallel mesh over the initialised world (dimension ``"data_parallel"``).

    Args:
        device_type: ``"cuda"`` or ``"cpu"`` (default: ``"cuda"`` when CUDA is available).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ZooError(
            "FSDP needs an initialised process group: call torch.distributed.init_process_group (torchrun does the "
            "rendezvous) or train with --trainer.strategy fsdp2 under Lightning"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (dist.get_world_size(),), mesh_dim_names=("data_parallel",))


def shard_model(
    model: nn.Module,
    mesh: DeviceMesh | None = None,
    mixed_precision: str | MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
) -> nn.Module:
    """Apply ``fully_shard`` to every unit of :func:`fsdp_units` (innermost first), then to ``model``, in place.

    Call it after the model is built (and moved to its device and dtype), before the optimiser is created: the
    optimiser must hold the sharded parameters.

    Args:
        model: the model; it must not be sharded yet.
        mesh: a 1-D data-parallel DeviceMesh (default: :func:`fsdp_mesh` over the whole world).
        mixed_precision: ``None``, ``"bf16"``, ``"fp16"`` or a ``MixedPrecisionPolicy``
            (:func:`mixed_precision_policy`).
        reshard_after_forward: free each unit's gathered parameters after its forward (gather again in backward);
            ``False`` keeps them until the backward (more memory, one all-gather less). The root unit is never
            resharded after forward (FSDP2's own rule).

    Returns:
        ``model`` (its class is now also an ``FSDPModule``).
    """
    if isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules()):
        raise ZooError(f"{type(model).__name__} is already sharded (fully_shard was applied to it or to a submodule)")
    mesh = mesh if mesh is not None else fsdp_mesh()
    if mesh.ndim != 1:
        raise ZooError(f"shard_model takes a 1-D data-parallel mesh, got one of shape {tuple(mesh.shape)}")
    policy = mixed_precision_policy(mixed_precision)
    for unit in fsdp_units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
        if has_tail(unit):  # the engine calls split_residual, not forward: FSDP must gather around it too
            register_fsdp_forward_method(unit, "split_residual")
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def consolidate_checkpoint(folder: str | Path, output: str | Path) -> Path:
    """Convert a sharded (DCP) checkpoint folder written by ``FSDP2Strategy(save_distributed_checkpoint=True)`` into
    one Lightning checkpoint file (full tensors) that ``Model.load_from_checkpoint`` reads in a single process.
    Runs in one process, without a process group. The file is written atomically.

    Args:
        folder: the checkpoint folder (``.metadata``, ``__*_*.distcp`` shards and Lightning's ``meta.pt``).
        output: the file to write.

    Returns:
        The path of the written file.
    """
    from lightning.fabric.utilities.load import _METADATA_FILENAME
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from zoo.hub import load_checkpoint_file

    folder, output = Path(folder), Path(output)
    if not (folder / ".metadata").is_file() or not (folder / _METADATA_FILENAME).is_file():
        raise ZooError(
            f"{folder} is not a sharded checkpoint folder (it needs .metadata and {_METADATA_FILENAME}): give the "
            "folder that FSDP2Strategy(save_distributed_checkpoint=True) wrote"
        )
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "full.pt"
        dcp_to_torch_save(folder, raw)  # every shard read and assembled, in this process
        tensors = load_checkpoint_file(raw)
    checkpoint = {**load_checkpoint_file(folder / _METADATA_FILENAME), **tensors}  # tensors and plain data only
    optimizers = sorted(
        (k for k in checkpoint if k.startswith("optimizer_") and k[10:].isdigit()), key=lambda k: int(k[10:])
    )
    checkpoint["optimizer_states"] = [checkpoint.pop(k) for k in optimizers]  # Lightning's list layout
    partial = output.with_name(output.name + ".tmp")
    try:
        torch.save(checkpoint, partial)
        os.replace(partial, output)  # nothing half-written under the final name
    finally:
        partial.unlink(missing_ok=True)
    return output


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning strategy sharding every family with FSDP2 (``--trainer.strategy fsdp2``), on CPU and GPU.

    It is Lightning's :class:`~lightning.pytorch.strategies.ModelParallelStrategy` (process launch, the DeviceMesh,
    distributed sampler, DCP / full checkpoints) with two changes: the world is one data-parallel dimension (W, 1)
    (no tensor parallelism), and the model need not implement ``configure_model``: when it does not, the strategy
    applies :func:`shard_model` (the zoo's sharding policy) itself, after moving the model to its device and
    precision and before the optimisers are built. Lightning's ``FSDPStrategy`` (FSDP1) refuses CPU accelerators;
    ``ModelParallelStrategy`` accepts them, so the same strategy runs over gloo on CPU and NCCL on GPU.

    Args:
        mixed_precision: FSDP2 mixed precision (``"bf16"``, ``"fp16"``, a ``MixedPrecisionPolicy`` or ``None``):
            parameters gathered and used in the low dtype, gradients reduced in float32, sharded parameters and
            optimiser state in float32. Meant for GPUs; leave the Trainer's ``precision`` at ``"32-true"`` with it.
        reshard_after_forward: see :func:`shard_model`.
        save_distributed_checkpoint: ``False`` (default): the full state dict and optimiser state are gathered to
            rank 0 and saved as one ordinary Lightning checkpoint file, which loads in one process. ``True``: every
            rank writes its shards (a DCP folder; resumes at any world size; :func:`consolidate_checkpoint` turns
            it into one file).
        process_group_backend: ``"gloo"`` / ``"nccl"`` (default: from the device).
        timeout: the collectives' timeout.
    """

    strategy_name = "fsdp2"

    def __init__(
        self,
        mixed_precision: str | MixedPrecisionPolicy | None = None,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        self.mp_policy = mixed_precision_policy(mixed_precision)
        if not isinstance(reshard_after_forward, bool):
            raise ZooError(f"reshard_after_forward must be True or False, got {reshard_after_forward!r}")
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # data parallel over every process of every node (ModelParallelStrategy's "auto" is one per node)
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def setup(self, trainer: Any) -> None:
        from lightning.pytorch.utilities.model_helpers import is_overridden

        assert self.model is not None and self.accelerator is not None
        self.accelerator.setup(trainer)
        _materialize_distributed_module(self.model, self.root_device)
        self.model = self.precision_plugin.convert_module(self.model)
        self.model_to_device()
        module = self.lightning_module
        if not any(isinstance(m, FSDPModule) for m in module.modules()):
            if is_overridden("configure_model", module):
                raise ZooError(
                    f"{type(module).__name__}.configure_model did not apply fully_shard: with the fsdp2 strategy, "
                    "either shard the model there (fully_shard per block, then the model) or leave configure_model "
                    "out and let the strategy apply the zoo's sharding policy"
                )
            shard_model(
                module,
                self.device_mesh["data_parallel"],
                self.mp_policy,
                reshard_after_forward=self.reshard_after_forward,
            )
        self.barrier()
        if trainer.state.fn == TrainerFn.FITTING:
            self.setup_optimizers(trainer)
        self.setup_precision_plugin()
        if trainer.state.fn == TrainerFn.FITTING:
            _optimizers_to_device(self.optimizers, self.root_device)

    def _unsharded_root(self, step: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        # evaluation code may call submodules or the root's parameters outside the root's forward (decoding): the
        # root unit is gathered first (the blocks gather themselves when called)
        module = self.lightning_module
        if isinstance(module, FSDPModule):
            module.unshard()
        return step(*args, **kwargs)

    def validation_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsharded_root(super().validation_step, *args, **kwargs)

    def test_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsharded_root(super().test_step, *args, **kwargs)

    def predict_step(self, *args: Any, **kwargs: Any) -> Any:
        return self._unsharded_root(super().predict_step, *args, **kwargs)


if FSDP2Strategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        FSDP2Strategy.strategy_name,
        FSDP2Strategy,
        description="FSDP2 (fully_shard per block, the zoo's sharding policy) on CPU and GPU (zoo.distributed)",
    )
    StrategyRegistry.register(
        "fsdp2_bf16",
        FSDP2Strategy,
        description="FSDP2 with bfloat16 parameters and float32 gradient reduction (GPU)",
        mixed_precision="bf16",
    )
