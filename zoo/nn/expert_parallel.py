"""Expert parallelism for :class:`zoo.nn.MoE`: the E experts sharded over an expert-parallel process group.

Layout: a 2-D :class:`~torch.distributed.device_mesh.DeviceMesh` with dimensions ``("data", "expert")`` of shape
(D, P) over the W = D * P ranks (rank r = d * P + p: the P ranks of an expert group are consecutive, i.e. inside a
node when P divides the GPUs per node). Rank (d, p) holds experts [p * E/P, (p + 1) * E/P) of every MoE layer;
the D ranks that share a p hold the same experts (data parallelism over the remaining ranks). Every other parameter
(router, attention, ...) is replicated on all W ranks as under plain DDP.

Forward, on every rank, for its own tokens (GShard / Tutel: each rank's tokens are one routing group, so the
layer computes on each rank exactly what the replicated MoE computes on that rank's batch):

1. route as :meth:`zoo.nn.MoE.route` does: a static (E, C, dim) buffer, slot (e, c) one token for expert e;
2. dispatch: ``all_to_all_single`` over the expert group sends rows [q * E/P, (q + 1) * E/P) of the buffer to
   rank q; rank p receives (P, E/P, C, dim): the slots that every rank of its group filled for its E/P experts;
3. its E/P experts run as batched matmuls on (E/P, P * C, dim);
4. combine: the inverse ``all_to_all_single`` returns every slot's output to the rank that owns the token, which
   scatter-adds w * MLP_e(x) as the single-process layer does.

All buffer sizes come from the capacity C (from the shapes of the call, never from the routing), so nothing
syncs with the host; every rank of an expert group must call the layer with the same token shape (B, T), as
Lightning's ``DistributedSampler`` gives. The all-to-all is its own adjoint (chunk q of rank p goes to chunk p of
rank q), so its backward is the same exchange applied to the gradients (:class:`AllToAll`).

Gradients. Each rank's loss L_r is a mean over its local batch and DDP averages the replicated parameters'
gradients: the step follows (1/W) sum_r L_r, the mean over the global batch. An expert's owner receives, through the
backward all-to-all, sum over its expert group of dL_r/dtheta; :func:`reduce_expert_gradients` sums that over the
data dimension and divides by W, which gives the same (1/W) sum_r dL_r/dtheta as the single process on the global
batch. DDP must therefore not reduce the expert parameters (it would average different experts with each other):
:func:`shard_experts` lists them in ``module._ddp_params_and_buffers_to_ignore`` (DDP's own mechanism; DDP also
skips them when it broadcasts rank 0's parameters). :class:`ExpertParallelStrategy` does all of this under
Lightning: shard before DDP wraps the model, reduce the expert gradients after the backward (before clipping and
the optimiser step, once per step under gradient accumulation), checkpoints in the unsharded layout. Clipping by
norm must use the whole model's norm, every rank's experts included (:func:`clip_grad_norm_`), or the replicated
parameters would be scaled differently on each rank.

Checkpoints. ``state_dict()`` of a sharded layer holds all E experts (an all-gather over the expert group: every
rank must call it, as Lightning's checkpointing does), and ``load_state_dict`` takes all E experts and keeps this
rank's rows, so one checkpoint loads at any expert-parallel degree, in one process or many. The strategy does the
same for the optimiser state of the expert parameters (:func:`gather_expert_optimizer_state`,
:func:`shard_expert_optimizer_state`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.nn.parallel import DistributedDataParallel

from zoo.errors import ZooError
from zoo.nn.moe import MoE

__all__ = [
    "AllToAll",
    "ExpertParallelStrategy",
    "ExpertShard",
    "clip_grad_norm_",
    "expert_parallel_mesh",
    "expert_parameters",
    "gather_expert_optimizer_state",
    "is_expert_parallel",
    "reduce_expert_gradients",
    "shard_expert_optimizer_state",
    "shard_experts",
]

MESH_DIMS = ("data", "expert")
_EXPERT_LEAVES = ("weight", "bias")


class AllToAll(torch.autograd.Function):
    """``all_to_all_single`` with equal splits over ``group``, differentiable: chunk q of rank p becomes chunk p of
    rank q. That permutation of the ranks' chunks is its own inverse and is orthogonal, so the backward is the same
    exchange applied to the gradient."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
        ctx.group = group
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, x.contiguous(), group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = torch.empty_like(grad, memory_format=torch.contiguous_format)
        dist.all_to_all_single(out, grad.contiguous(), group=ctx.group)
        return out, None


class ExpertShard:
    """The expert-parallel placement of one :class:`zoo.nn.MoE` (set as ``moe.expert_shard`` by
    :func:`shard_experts`): this rank holds experts [first, first + num_local) of ``num_experts``.

    Args:
        num_experts: E, the experts of the layer.
        mesh: the (data, expert) mesh (``expert_parallel_mesh``); its ``"expert"`` dimension is the group the
            tokens are exchanged over, its ``"data"`` dimension (if any) the replicas of the same experts.
    """

    def __init__(self, num_experts: int, mesh: DeviceMesh) -> None:
        names = mesh.mesh_dim_names or ()
        expert_mesh = mesh["expert"]
        self.mesh = mesh
        self.group = expert_mesh.get_group()
        self.size = expert_mesh.size()
        self.rank = expert_mesh.get_local_rank()
        self.data_group = mesh["data"].get_group() if "data" in names and mesh["data"].size() > 1 else None
        self.world = mesh.size()
        self.num_experts = num_experts
        self.num_local = num_experts // self.size
        self.first = self.rank * self.num_local

    def __deepcopy__(self, memo: dict) -> ExpertShard:
        return self  # process groups are handles shared by every copy of the model on this rank

    def __repr__(self) -> str:
        return (
            f"ExpertShard(experts {self.first}..{self.first + self.num_local - 1} of {self.num_experts}, "
            f"expert group {self.rank}/{self.size}, world {self.world})"
        )

    def __call__(self, experts: nn.Module, buffer: torch.Tensor) -> torch.Tensor:
        """MLP_e of every slot of this rank's (E, C, dim) ``buffer``, experts run where they live (steps 2-4)."""
        E, C, dim = buffer.shape
        P, El = self.size, self.num_local
        received = AllToAll.apply(buffer.reshape(-1), self.group).view(P, El, C, dim)  # chunk q: rank q's slots
        local = received.transpose(0, 1).reshape(El, P * C, dim)
        out = experts(local)
        out = out.view(El, P, C, dim).transpose(0, 1).reshape(-1)
        return AllToAll.apply(out, self.group).view(E, C, dim)

    # ------------------------------------------------------------------ state dict hooks (unsharded layout)

    def gather_rows(self, t: torch.Tensor) -> torch.Tensor:
        """The (E, ...) tensor from every rank's (E/P, ...) rows (all-gather over the expert group)."""
        t = t.detach().contiguous()
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        return torch.cat(parts)

    def local_rows(self, t: torch.Tensor, name: str) -> torch.Tensor:
        """This rank's rows of an unsharded (E, ...) tensor ``name``."""
        if t.dim() == 0 or t.shape[0] != self.num_experts:
            raise ZooError(
                f"{name} has shape {tuple(t.shape)}: an expert-parallel MoE loads the unsharded layout, all "
                f"{self.num_experts} experts in the first dimension (what state_dict() writes at any degree)"
            )
        return t[self.first : self.first + self.num_local]

    def state_dict_hook(self) -> Callable[..., None]:
        """A ``register_state_dict_post_hook`` hook for an expert linear layer: its rows gathered from the group."""

        def gather(module: nn.Module, state_dict: dict, prefix: str, local_metadata: Any) -> None:
            for leaf in _EXPERT_LEAVES:
                if prefix + leaf in state_dict:
                    state_dict[prefix + leaf] = self.gather_rows(state_dict[prefix + leaf])

        return gather

    def load_state_dict_hook(self) -> Callable[..., None]:
        """A ``register_load_state_dict_pre_hook`` hook for an expert linear layer: this rank's rows of the
        unsharded tensors."""

        def keep_local_rows(module: nn.Module, state_dict: dict, prefix: str, *args: Any) -> None:
            for leaf in _EXPERT_LEAVES:
                key = prefix + leaf
                if key in state_dict and getattr(module, leaf, None) is not None:
                    state_dict[key] = self.local_rows(state_dict[key], key)

        return keep_local_rows


def expert_parallel_mesh(expert_parallel_size: int | None = None, device_type: str | None = None) -> DeviceMesh:
    """The (data, expert) mesh over the initialised world: shape (W / P, P), dimension names ``("data", "expert")``.

    Args:
        expert_parallel_size: P, the ranks that share the experts of a layer (default: all W ranks); must divide W.
        device_type: the mesh's device type (default ``"cuda"`` when CUDA is available, else ``"cpu"``).
    """
    if not dist.is_available() or not dist.is_initialized():
        raise ZooError(
            "expert parallelism needs an initialised process group: call torch.distributed.init_process_group "
            "(torchrun does the rendezvous) or train with zoo.nn.ExpertParallelStrategy under Lightning"
        )
    world = dist.get_world_size()
    size = world if expert_parallel_size is None else expert_parallel_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or world % size:
        raise ZooError(
            f"expert_parallel_size must be a positive integer dividing the world size {world}, got "
            f"{expert_parallel_size!r} (the data-parallel degree is world / expert_parallel_size)"
        )
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (world // size, size), mesh_dim_names=MESH_DIMS)


def _moe_layers(module: nn.Module) -> Iterator[tuple[str, MoE]]:
    for name, sub in module.named_modules():
        if isinstance(sub, MoE):
            yield name, sub


def is_expert_parallel(module: nn.Module) -> bool:
    """Whether some :class:`zoo.nn.MoE` of ``module`` has its experts sharded."""
    return any(getattr(moe, "expert_shard", None) is not None for _, moe in _moe_layers(module))


def expert_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter, ExpertShard]]:
    """(name, parameter, shard) of every sharded expert parameter of ``module`` (names relative to ``module``)."""
    for name, moe in _moe_layers(module):
        if getattr(moe, "expert_shard", None) is None:
            continue
        prefix = f"{name}." if name else ""
        for leaf_name, param in moe.experts.named_parameters():
            yield f"{prefix}experts.{leaf_name}", param, moe.expert_shard


def shard_experts(module: nn.Module, mesh: DeviceMesh) -> nn.Module:
    """Shard the experts of every :class:`zoo.nn.MoE` in ``module`` over ``mesh``'s ``"expert"`` dimension, in place.

    Each rank keeps experts [p * E/P, (p + 1) * E/P) (p its coordinate on the expert dimension, P its size), taken
    from global rank 0's copy (broadcast first, as DDP broadcasts rank 0's other parameters), so that the sharded
    model is rank 0's model whatever each rank initialised. The layers then exchange tokens with all-to-all in
    forward and backward; ``state_dict()`` gathers the unsharded layout and ``load_state_dict`` slices it. The
    expert parameters are added to ``module._ddp_params_and_buffers_to_ignore``: wrap ``module`` itself in DDP and
    call :func:`reduce_expert_gradients` after each backward (or train with :class:`ExpertParallelStrategy`). With
    P = 1 nothing is sharded (DDP then handles the experts like any parameter).

    Args:
        module: a model holding :class:`zoo.nn.MoE` layers (the module you wrap in DDP), on the device the process
            group's backend communicates from (the GPU for NCCL).
        mesh: a DeviceMesh over all the ranks, with an ``"expert"`` dimension and optionally a ``"data"`` one
            (:func:`expert_parallel_mesh`).

    Returns:
        ``module``.
    """
    names = tuple(mesh.mesh_dim_names or ())
    if "expert" not in names or not set(names) <= set(MESH_DIMS):
        raise ZooError(
            f"shard_experts needs a DeviceMesh with dimension names ('data', 'expert') or ('expert',), got "
            f"{names or 'unnamed dimensions'}: build it with zoo.nn.expert_parallel_mesh(expert_parallel_size)"
        )
    if mesh.size() != dist.get_world_size():
        raise ZooError(
            f"the expert-parallel mesh covers {mesh.size()} of the {dist.get_world_size()} ranks: it must cover "
            "them all (the replicated parameters are reduced over the whole world, as DDP does)"
        )
    layers = list(_moe_layers(module))
    if not layers:
        raise ZooError(
            f"shard_experts found no zoo.nn.MoE layer in {type(module).__name__}: expert parallelism shards the "
            "experts of an MoE model (e.g. zoo.vmoe_tiny_patch32_224); for a dense model use --trainer.strategy ddp "
            "(or fsdp2)"
        )
    size = mesh["expert"].size()
    for name, moe in layers:
        if getattr(moe, "expert_shard", None) is not None:
            raise ZooError(f"the experts of {name or type(module).__name__} are already sharded ({moe.expert_shard})")
        if moe.num_experts % size:
            raise ZooError(
                f"{name or 'MoE'} has {moe.num_experts} experts, not divisible by expert_parallel_size={size}: "
                "choose an expert-parallel degree that divides the number of experts"
            )
    if size == 1:
        return module
    ignored = set(getattr(module, "_ddp_params_and_buffers_to_ignore", ()))
    for _, moe in layers:
        shard = ExpertShard(moe.num_experts, mesh)
        for lin in (moe.experts.fc1, moe.experts.fc2):
            for leaf in _EXPERT_LEAVES:
                param = getattr(lin, leaf)
                if param is None:
                    continue
                full = param.detach().clone()
                dist.broadcast(full, src=0)
                local = full[shard.first : shard.first + shard.num_local].clone()
                setattr(lin, leaf, nn.Parameter(local, requires_grad=param.requires_grad))
            lin.register_state_dict_post_hook(shard.state_dict_hook())
            lin.register_load_state_dict_pre_hook(shard.load_state_dict_hook())
        moe.expert_shard = shard
    ignored.update(name for name, _, _ in expert_parameters(module))
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, sorted(ignored))
    return module


@torch.no_grad()
def reduce_expert_gradients(module: nn.Module) -> None:
    """Expert gradients as DDP would make them on the global batch: summed over the data dimension of the mesh and
    divided by the world size W (each owner already holds the sum over its expert group, through the backward
    all-to-all). Call it once per optimiser step, after the backward(s) and before clipping / ``step``.
    ``module``: the model whose MoE layers :func:`shard_experts` sharded."""
    pending = []
    for _, param, shard in expert_parameters(module):
        if param.grad is None:
            continue
        if shard.data_group is not None:
            pending.append((dist.all_reduce(param.grad, group=shard.data_group, async_op=True), param, shard))
        else:
            param.grad.div_(shard.world)
    for work, param, shard in pending:
        work.wait()
        param.grad.div_(shard.world)


def clip_grad_norm_(
    parameters: Iterable[torch.Tensor], max_norm: float, module: nn.Module, norm_type: float = 2.0
) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for an expert-parallel model: the norm of the whole model's gradient,
    the experts held by the other ranks of the expert group included, so that every rank scales by the same factor
    (the replicated parameters stay equal). Collective over the expert group: every rank calls it.

    Args:
        parameters: the parameters to clip (e.g. an optimiser's), replicated and expert ones.
        max_norm: the largest norm kept.
        module: the sharded model (which tells the expert parameters apart).
        norm_type: 2 or ``inf``.

    Returns:
        The total norm before clipping.
    """
    norm_type = float(norm_type)
    if norm_type not in (2.0, math.inf):
        raise ZooError(f"expert-parallel gradient clipping supports the 2-norm and the inf-norm, got {norm_type}")
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    shards = {id(p): shard for _, p, shard in expert_parameters(module)}

    def norm(grads: list[torch.Tensor]) -> torch.Tensor:
        if not grads:
            return params[0].grad.new_zeros((), dtype=torch.float32)
        return torch.nn.utils.get_total_norm(grads, norm_type).float()

    replicated = norm([p.grad for p in params if id(p) not in shards])
    experts = norm([p.grad for p in params if id(p) in shards])
    if shards:
        group = next(iter(shards.values())).group
        if norm_type == math.inf:
            dist.all_reduce(experts, op=dist.ReduceOp.MAX, group=group)
            total = torch.maximum(replicated, experts)
        else:
            squares = experts.square()
            dist.all_reduce(squares, group=group)
            total = (replicated.square() + squares).sqrt()
    else:
        total = torch.maximum(replicated, experts) if norm_type == math.inf else replicated.hypot(experts)
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


# ---------------------------------------------------------------------------------------------- optimiser state


def _expert_states(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> Iterator[tuple[int, str, ExpertShard]]:
    """(index in the optimiser state dict, parameter name, shard) of the expert parameters the optimiser holds."""
    by_id = {id(param): (name, shard) for name, param, shard in expert_parameters(module)}
    params = [p for group in optimizer.param_groups for p in group["params"]]
    for index, param in enumerate(params):
        if id(param) in by_id and index in state.get("state", {}):
            yield index, *by_id[id(param)]


def gather_expert_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> dict[str, Any]:
    """``optimizer.state_dict()`` ``state`` with the expert parameters' per-element tensors (those shaped like the
    local parameter, e.g. Adam's moments) gathered into the unsharded (E, ...) layout. Collective over the expert
    groups: every rank calls it. The optimiser's own state is not modified.

    Args:
        module: the sharded model; optimizer: its optimiser; state: ``optimizer.state_dict()``.
    """
    out = {**state, "state": dict(state.get("state", {}))}
    local_shapes = {name: param.shape for name, param, _ in expert_parameters(module)}
    for index, name, shard in _expert_states(module, optimizer, state):
        entry = out["state"][index]
        out["state"][index] = {
            key: shard.gather_rows(v) if isinstance(v, torch.Tensor) and v.shape == local_shapes[name] else v
            for key, v in entry.items()
        }
    return out


def shard_expert_optimizer_state(
    module: nn.Module, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]
) -> dict[str, Any]:
    """The inverse of :func:`gather_expert_optimizer_state`: this rank's rows of the expert parameters' unsharded
    per-element optimiser tensors, ready for ``optimizer.load_state_dict``.

    Args:
        module: the sharded model; optimizer: its optimiser; state: an unsharded optimiser state dict.
    """
    out = {**state, "state": dict(state.get("state", {}))}
    trailing = {name: param.shape[1:] for name, param, _ in expert_parameters(module)}
    for index, name, shard in _expert_states(module, optimizer, state):
        entry = out["state"][index]
        out["state"][index] = {
            key: shard.local_rows(v, f"optimizer state {key!r} of {name}")
            if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[1:] == trailing[name]
            else v
            for key, v in entry.items()
        }
    return out


# ---------------------------------------------------------------------------------------------- Lightning


class ExpertParallelStrategy(DDPStrategy):
    """Lightning DDP with the MoE experts sharded over an expert-parallel group (``--trainer.strategy``).

    On set-up (after the process group exists, before DDP wraps the model and the optimisers are built) it builds
    the (data, expert) mesh :func:`expert_parallel_mesh` and calls :func:`shard_experts` on the LightningModule;
    DDP then averages the replicated parameters over all ranks and ignores the expert parameters, whose gradients
    :func:`reduce_expert_gradients` reduces over the data dimension once per optimiser step, right after the
    backward (before gradient clipping and ``on_before_optimizer_step``); clipping by norm uses the norm of the
    whole model (:func:`clip_grad_norm_`). Checkpoints hold the unsharded layout, the optimiser state included, so
    they resume at any expert-parallel degree and load in a single process. Registered as ``"ddp_expert_parallel"``
    (the expert group = all ranks).

    Args:
        expert_parallel_size: P, ranks per expert group (default: all ranks); must divide the world size and every
            MoE layer's number of experts. The data-parallel degree is world / P.
        **kwargs: :class:`lightning.pytorch.strategies.DDPStrategy`'s (``start_method``, ``timeout``, ...).
    """

    strategy_name = "ddp_expert_parallel"

    def __init__(self, expert_parallel_size: int | None = None, **kwargs: Any) -> None:
        if expert_parallel_size is not None and (
            isinstance(expert_parallel_size, bool) or not isinstance(expert_parallel_size, int)
        ):
            raise ZooError(f"expert_parallel_size must be a positive integer, got {expert_parallel_size!r}")
        if expert_parallel_size is not None and expert_parallel_size < 1:
            raise ZooError(f"expert_parallel_size must be a positive integer, got {expert_parallel_size!r}")
        super().__init__(**kwargs)
        self.expert_parallel_size = expert_parallel_size
        self.mesh: DeviceMesh | None = None

    def setup(self, trainer: Any) -> None:
        module = self.model
        if module is not None and not is_expert_parallel(module):
            self.model_to_device()  # the broadcast and the gathers run on the backend's device (NCCL: the GPU)
            self.mesh = expert_parallel_mesh(self.expert_parallel_size, self.root_device.type)
            shard_experts(module, self.mesh)
        super().setup(trainer)
        # gradient_clip_val with the norm: the norm of the whole model, every rank's experts included (a local norm
        # would scale the replicated parameters differently on each rank)
        self.precision_plugin.clip_grad_by_norm = self._clip_grad_by_norm

    def _clip_grad_by_norm(self, optimizer: Any, clip_val: float) -> None:
        clip_grad_norm_(self.precision_plugin.main_params(optimizer), clip_val, self.lightning_module)

    def optimizer_step(self, optimizer: Any, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        def closure_then_reduce() -> Any:
            result = closure()
            reduce_expert_gradients(self.lightning_module)
            return result

        return super().optimizer_step(optimizer, closure_then_reduce, model, **kwargs)

    def optimizer_state(self, optimizer: Any) -> dict[str, Any]:
        state = super().optimizer_state(optimizer)
        inner = getattr(optimizer, "_optimizer", optimizer)
        return gather_expert_optimizer_state(self.lightning_module, inner, state)

    def load_optimizer_state_dict(self, checkpoint: Mapping[str, Any]) -> None:
        states = [
            shard_expert_optimizer_state(self.lightning_module, optimizer, state)
            for optimizer, state in zip(self.optimizers, checkpoint["optimizer_states"])
        ]
        super().load_optimizer_state_dict({**checkpoint, "optimizer_states": states})


if ExpertParallelStrategy.strategy_name not in StrategyRegistry:
    StrategyRegistry.register(
        ExpertParallelStrategy.strategy_name,
        ExpertParallelStrategy,
        description="DDP with the MoE experts sharded over all ranks (zoo.nn.ExpertParallelStrategy)",
    )
