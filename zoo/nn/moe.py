"""Sparse mixture of experts: a drop-in for a Transformer MLP (timm's ``Mlp``).

E expert MLPs (fc1 -> GELU -> drop -> fc2 -> drop, timm's layout) and a linear router with gates computed in
float32,

    S = softmax(W_r x)  over the E experts,          MoE(x) = sum_{(e, w) routed from x} w * MLP_e(x)       (E1)

Two routers pick the (token, expert, weight) triples:

* ``token_choice`` (Switch / GShard): each token takes its top-k experts of S. Expert e holds at most
  C = ceil(capacity_factor * k * T_valid / E) tokens (T_valid: the unpadded tokens of the call;
  ``capacity_factor=None``: no limit). Slots are given by a running count in token order, all first choices
  before all second choices (GShard priority); assignments past C are dropped (that token gets nothing from
  that expert: the residual of the block carries it) and counted in ``stats``. Combine weight w = S_te, or
  S_te / sum_{j in top-k(t)} S_tj with ``normalize_gates`` (default: on when k > 1; with k = 1 it would make
  every weight 1 and cut the router out of the loss). Load-balancing loss (Switch), over the valid tokens:

      aux = E * sum_e f_e P_e,   f_e = #(assignments to e, before capacity) / (k T_valid),   P_e = mean_t S_te  (E2)

* ``expert_choice`` (Zhou et al. 2022): in every group of n tokens (default: each sequence; ``group_size``
  regroups the flattened tokens) each expert takes the k tokens with the highest S_te, with
  k = clamp(round(capacity_factor * n_valid / E), 1, n_valid) (or ``k`` given), weight w = S_te. Load is
  balanced by construction: ``aux_loss`` is exactly zero.

``topk="soft"`` replaces the hard top-k by the relaxed top-k operator
(:func:`zoo.ops.topk.soft_topk_mask`: sparse, sums to k, the hard mask as lam -> 0, differentiable):

    m = soft_topk_mask(S, k, p, lam),   w = m * S,   dispatched: the k largest w, weight w (or normalised)  (E3)

over the experts of each token (token choice) or over the tokens of a group for each expert (expert choice;
the published setting: p = 2, Dykstra, 10 iterations). m is monotone in S, so the dispatched set is the hard
one; the gradient reaches the router through m as well as S. Relaxed weight outside the dispatched k is
dropped and reported in ``stats["dropped_soft_weight"]``.

Compute: the routed tokens are gathered into a static (E, C, dim) buffer, the experts run as two batched
matmuls on it, and the weighted outputs are scatter-added back, so the FLOPs scale with k * capacity (about
capacity_factor * k * T tokens per call), not with E (the parameters, E MLPs, and their memory traffic do grow
with E). Shapes are static and nothing syncs with the host (the hard routers trace with ``fullgraph=True``; with
padding, soft expert choice hands soft_topk_mask a per-group k, which it checks with a sync on the CPU and an async
assert on accelerators), so the module runs under ``torch.compile``, autocast and DDP (every expert parameter takes
part in every step: an empty slot is a zero row that still goes through the matmuls). Padded tokens
(``padding_mask`` True) are replaced by zeros before the router's matmul (so that inf / NaN there change nothing,
gradients included), never routed, never counted (capacity, aux loss, stats), their output rows are exactly zero
and the gradient of x there is exactly zero.

``capacity_factor=None`` (no limit) makes every buffer as long as the call has tokens (token choice C = T;
expert choice k = n), i.e. E times the dense MLP's compute: meant for exactness checks and upcycling, not speed.

After each forward the module holds ``aux_loss`` (0-d tensor, graph attached; add ``weight * moe.aux_loss`` to
the loss, e.g. 0.01 as in Switch) and ``stats``, detached tensors: ``tokens_per_expert`` (E,) (tokens each expert
processed), ``dropped_fraction`` (token choice: the share of the k * T_valid assignments dropped by capacity;
expert choice: the share of valid tokens no expert took; 0 for a call without valid tokens), ``router_entropy``
(mean entropy of S over the valid tokens) and, with ``topk="soft"``, ``dropped_soft_weight`` (share of the relaxed
weight sum_te m S outside the dispatched pairs). :meth:`MoE.route` returns the dispatch itself (:class:`Routing`).

Expert parallelism (:func:`zoo.nn.expert_parallel.shard_experts`): the experts are split over the ranks of an
expert-parallel group (E / P per rank, ``expert_shard`` records which); routing stays on the token's rank, and the
(E, C, dim) buffer goes to the experts' ranks and back by all-to-all (the same static shapes), so each rank computes
what the layer computes on that rank's tokens. ``stats`` are then the rank's own.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import statically_known_true

from zoo._deprecation import renamed_argument, renamed_attribute
from zoo.errors import ZooError
from zoo.ops.topk import check_relaxed, soft_topk_mask

__all__ = ["MoE", "Routing", "BatchedLinear", "routing_statistics"]

ROUTERS = ("token_choice", "expert_choice")
TOPKS = ("hard", "soft")
_AUTO = "auto"
# below every gate probability (S in [0, 1]) by far more than the relaxation width: padded tokens stay out of
# the relaxed mask's pooled blocks (and are masked out again afterwards)
_PAD_SCORE = -1.0e4


class Routing(NamedTuple):
    """A dispatch: buffer slot (e, c) holds flattened token ``index[e, c]`` with combine weight ``weight[e, c]``.

    ``index`` (E, C) int64 indexes the flattened tokens (B * T); the value B * T marks an empty slot (weight 0).
    ``weight`` (E, C) float32. ``capacity`` is C (for expert choice, groups * k).
    """

    index: torch.Tensor
    weight: torch.Tensor
    capacity: int
    aux_loss: torch.Tensor
    stats: dict[str, torch.Tensor]


class BatchedLinear(nn.Module):
    """E independent linear maps, ``weight`` (E, out, in), ``bias`` (E, out): y[e] = x[e] W_e^T + b_e on (E, C, in).

    Each expert is initialised as ``nn.Linear`` would be: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias.

    Args:
        num_experts: E, the number of maps.
        in_features: the input width of each map.
        out_features: the output width of each map.
        bias: whether each map has a bias.
        device: where the parameters are created.
        dtype: the parameters' dtype.
    """

    def __init__(
        self,
        num_experts: int,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(num_experts, out_features, in_features, **dd))
        self.bias = nn.Parameter(torch.empty(num_experts, out_features, **dd)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.weight.shape[0]}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.transpose(1, 2)
        if self.bias is None:
            return torch.bmm(x, w)
        return torch.baddbmm(self.bias.unsqueeze(1), x, w)


class Experts(nn.Module):
    """E timm-style MLPs on a (E, C, dim) buffer: fc2(drop(GELU(fc1(x)))), then drop."""

    def __init__(
        self,
        num_experts: int,
        dim: int,
        hidden_dim: int,
        bias: tuple[bool, bool] = (True, True),
        drop: tuple[float, float] = (0.0, 0.0),
        device: Any = None,
        dtype: Any = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = BatchedLinear(num_experts, dim, hidden_dim, bias=bias[0], **dd)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop[0])
        self.fc2 = BatchedLinear(num_experts, hidden_dim, dim, bias=bias[1], **dd)
        self.drop2 = nn.Dropout(drop[1])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


def _pair(value: Any) -> tuple[Any, Any]:
    return (value[0], value[1]) if isinstance(value, (tuple, list)) else (value, value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _capacity(n_tokens: int, capacity_factor: float, k: int, num_experts: int) -> int:
    """Token choice's capacity C = max(1, ceil(capacity_factor * k * n_tokens / num_experts)), as the float
    expression computes it.

    A capacity factor with a short binary expansion (1.25, 1.5, 2 ...: a denominator of at most 2^16, every usual
    choice) makes that float expression exact for any realistic call, so C is computed in integers,
    ceil(n a / b) = (n a + b - 1) // b with a / b = capacity_factor * k / num_experts: the same integer, and under
    ``torch.export`` with a dynamic batch (``n_tokens`` symbolic) an expression the exported program can save (a
    ``math.ceil`` of a symbolic float cannot be serialised) and whose range the shape solver can bound (shapes of
    size C need C > 1 proven over the whole batch range). Any other factor keeps the float ceil.

    Args:
        n_tokens: the tokens of the call (an int, or a symbolic int under tracing).
        capacity_factor: the capacity factor (> 0).
        k: experts per token.
        num_experts: E.
    """
    p, q = capacity_factor.as_integer_ratio()
    if q > 2**16:
        return torch.sym_max(1, math.ceil(n_tokens * capacity_factor * k / num_experts))
    a, b = p * k, q * num_experts
    g = math.gcd(a, b)
    a, b = a // g, b // g
    return torch.sym_max(1, (n_tokens * a + b - 1) // b)


class MoE(nn.Module):
    """Mixture of ``num_experts`` MLPs ``dim -> hidden_dim -> dim`` with a top-k router, (E1)-(E3) above.

    Args:
        dim, hidden_dim: the MLP widths (timm ``Mlp(dim, hidden_dim)``); ``hidden_dim`` defaults to ``dim``.
        num_experts: E >= 1.
        router: ``"token_choice"`` or ``"expert_choice"``.
        k: experts per token (token choice, 1 <= k <= E, default 1) or tokens per expert per group (expert
            choice; default from ``capacity_factor``; clamped to the valid tokens of the group).
        capacity_factor: token choice: C = ceil(capacity_factor * k * T_valid / E), default 1.25, None = no
            limit (C = T: nothing dropped). Expert choice: k = round(capacity_factor * n_valid / E), default 2.0
            (Zhou et al.), None = every expert takes every token (k = n). Give ``k`` or this, not both, for
            expert choice.
        topk: ``"hard"`` or ``"soft"`` (relaxed top-k of :func:`zoo.ops.topk.soft_topk_mask`).
        normalize_gates: token choice only: weights S_te / sum over the token's top-k; default ``k > 1``.
        group_size: expert choice only: groups of this many flattened tokens instead of one group per sequence.
        p, lam, solver, dykstra_iters: the relaxed top-k (``topk="soft"`` only): defaults p = 2, Dykstra,
            ``dykstra_iters`` = 10 iterations (the published MoE setting) and lam = 0.1 / E (gate probabilities
            are ~1/E apart, so this relaxes the few entries nearest the k-th; lam -> 0 is the hard router).
        bias: biases of fc1 / fc2 (bool or a pair, as timm). ``router_bias``: bias of the router (default off).
        drop: dropout after GELU and after fc2 (float or pair, as timm).
        n_iter: deprecated name of ``dykstra_iters`` (FutureWarning; giving both is an error).
        device, dtype: where and in which dtype the parameters are created (as ``nn.Linear``'s).
    """

    n_iter = renamed_attribute("n_iter", "dykstra_iters")

    def __init__(
        self,
        dim: int,
        hidden_dim: int | None = None,
        num_experts: int = 8,
        router: str = "token_choice",
        k: int | None = None,
        capacity_factor: float | None | str = _AUTO,
        topk: str = "hard",
        normalize_gates: bool | None = None,
        group_size: int | None = None,
        p: float | None = None,
        lam: float | None = None,
        solver: str | None = None,
        dykstra_iters: int | None = None,
        bias: bool | tuple[bool, bool] = True,
        router_bias: bool = False,
        drop: float | tuple[float, float] = 0.0,
        device: Any = None,
        dtype: Any = None,
        *,
        n_iter: int | None = None,
    ) -> None:
        super().__init__()
        dykstra_iters = renamed_argument("MoE", "dykstra_iters", dykstra_iters, "n_iter", n_iter)
        dd = {"device": device, "dtype": dtype}
        if not _is_int(dim) or dim < 1:
            raise ZooError(f"dim must be a positive integer, got {dim!r}")
        hidden_dim = dim if hidden_dim is None else hidden_dim
        if not _is_int(hidden_dim) or hidden_dim < 1:
            raise ZooError(f"hidden_dim must be a positive integer, got {hidden_dim!r}")
        if not _is_int(num_experts) or num_experts < 1:
            raise ZooError(f"num_experts must be an integer >= 1, got {num_experts!r}")
        if router not in ROUTERS:
            raise ZooError(f"unknown router {router!r}: use one of {', '.join(ROUTERS)}")
        if topk not in TOPKS:
            raise ZooError(f"unknown topk {topk!r}: use 'hard' (torch.topk) or 'soft' (relaxed top-k)")
        E = num_experts
        token_choice = router == "token_choice"
        if k is not None and (not _is_int(k) or k < 1):
            raise ZooError(f"k must be an integer >= 1, got {k!r}")
        if capacity_factor is not None and capacity_factor != _AUTO:
            if (
                isinstance(capacity_factor, bool)
                or not isinstance(capacity_factor, (int, float))
                or not capacity_factor > 0
                or not math.isfinite(capacity_factor)
            ):
                raise ZooError(
                    f"capacity_factor must be a finite number > 0 (or None: no capacity limit), got {capacity_factor!r}"
                )
        if token_choice:
            k = 1 if k is None else k
            if k > E:
                raise ZooError(f"token choice: k={k} experts per token exceeds num_experts={E}")
            if capacity_factor == _AUTO:
                capacity_factor = 1.25
            if group_size is not None:
                raise ZooError(
                    "group_size applies to expert choice only (token choice capacity is over all the "
                    "tokens of the call)"
                )
            normalize_gates = k > 1 if normalize_gates is None else bool(normalize_gates)
        else:
            if k is not None and capacity_factor != _AUTO:
                raise ZooError(
                    "expert choice: give k (tokens per expert) or capacity_factor "
                    "(k = round(capacity_factor * n / E)), not both"
                )
            if capacity_factor == _AUTO:
                capacity_factor = 2.0 if k is None else None
            if normalize_gates:
                raise ZooError("normalize_gates applies to token choice only (expert choice weights are S_te)")
            normalize_gates = False
            if group_size is not None and (not _is_int(group_size) or group_size < 1):
                raise ZooError(f"group_size must be an integer >= 1, got {group_size!r}")
        soft_options = {"p": p, "lam": lam, "solver": solver, "dykstra_iters": dykstra_iters}
        if topk == "hard":
            given = [name for name, value in soft_options.items() if value is not None]
            if given:
                raise ZooError(f"{', '.join(given)} only apply with topk='soft' (the relaxed top-k)")
        else:
            p = 2.0 if p is None else p
            lam = 0.1 / E if lam is None else lam
            solver = "dykstra" if solver is None else solver
            dykstra_iters = 10 if dykstra_iters is None else dykstra_iters
            check_relaxed("MoE", p, lam, solver, dykstra_iters)
            if token_choice and k == E:
                raise ZooError(
                    f"topk='soft' with k == num_experts == {E} selects every expert: nothing to relax; use topk='hard'"
                )
            if token_choice and k == 1 and normalize_gates:
                raise ZooError(
                    "topk='soft' with k=1 and normalize_gates=True makes every weight 1: the relaxed "
                    "mask would get no gradient; leave normalize_gates off"
                )
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, E
        self.router_type, self.topk, self.k = router, topk, k
        self.capacity_factor = None if capacity_factor is None else float(capacity_factor)
        self.normalize_gates, self.group_size = normalize_gates, group_size
        self.p, self.lam, self.solver, self.dykstra_iters = p, lam, solver, dykstra_iters
        self.router = nn.Linear(dim, E, bias=router_bias, **dd)
        self.experts = Experts(E, dim, hidden_dim, bias=_pair(bias), drop=_pair(drop), **dd)
        self.aux_loss: torch.Tensor = torch.zeros(())
        self.stats: dict[str, torch.Tensor] = {}
        # None: every expert here; else the expert-parallel placement (zoo.nn.expert_parallel.shard_experts)
        self.expert_shard: Any = None

    def __getstate__(self) -> dict[str, Any]:
        """The module's state for ``copy.deepcopy`` / pickling, with the last forward's ``aux_loss`` detached: its
        graph is the training step's (a non-leaf tensor cannot be deep-copied), so a model is copyable after a
        forward (``AveragedModel`` / EMA, converters that copy their source); the module itself keeps the graph."""
        state = super().__getstate__()
        aux = state.get("aux_loss")
        if isinstance(aux, torch.Tensor) and aux.grad_fn is not None:
            state["aux_loss"] = aux.detach()
        return state

    # -------------------------------------------------------------------------------------------- upcycling

    @classmethod
    def from_mlp(cls, mlp: nn.Module, num_experts: int, **options: Any) -> MoE:
        """ "Upcycling": a MoE whose every expert is a copy of ``mlp`` (timm ``Mlp``, or any module with
        ``nn.Linear`` ``fc1`` / ``fc2``, exact GELU ``act`` and no hidden norm), router weight zero.

        At init (S = 1/E for every token) it computes ``mlp`` exactly (up to float rounding) with
        ``router="token_choice", normalize_gates=True, capacity_factor=None`` (any k: the k weights are 1/k),
        or ``router="expert_choice", capacity_factor=num_experts`` (or None): k = n, every expert takes every
        token with weight 1/E. Other settings scale or drop tokens (e.g. token choice k=1 without
        normalisation gives mlp(x) / E). With the zero router the gates tie and torch.topk breaks ties in a
        fixed order: token choice sends every token to the same k experts (most are dropped under a finite
        capacity) and with expert choice every expert picks the same tokens, until the router learns; perturb
        ``router.weight`` slightly to start from distinct choices. Dropout probabilities are copied; the copies
        are independent parameters (the source module is not shared).
        """
        fc1, fc2 = getattr(mlp, "fc1", None), getattr(mlp, "fc2", None)
        if not isinstance(fc1, nn.Linear) or not isinstance(fc2, nn.Linear):
            raise ZooError(
                f"from_mlp needs a module with nn.Linear fc1 and fc2 (timm Mlp), got "
                f"{type(mlp).__name__} with fc1={type(fc1).__name__}, fc2={type(fc2).__name__}"
            )
        act = getattr(mlp, "act", None)
        if not isinstance(act, nn.GELU) or act.approximate != "none":
            raise ZooError(
                f"from_mlp needs the exact GELU activation (nn.GELU(approximate='none')) as "
                f"{type(mlp).__name__}.act, got {act!r}: the experts compute exact GELU"
            )
        norm = getattr(mlp, "norm", None)
        if norm is not None and not isinstance(norm, nn.Identity):
            raise ZooError(
                f"from_mlp: {type(mlp).__name__} has a hidden norm layer ({type(norm).__name__}); the experts have none"
            )
        if fc2.out_features != fc1.in_features or fc2.in_features != fc1.out_features:
            raise ZooError(
                f"from_mlp needs fc1: dim -> hidden and fc2: hidden -> dim, got fc1 "
                f"{fc1.in_features}->{fc1.out_features}, fc2 {fc2.in_features}->{fc2.out_features}"
            )
        drops = tuple(float(getattr(getattr(mlp, name, None), "p", 0.0)) for name in ("drop1", "drop2"))
        for name in ("dim", "hidden_dim", "bias", "drop", "device", "dtype"):
            if name in options:
                raise ZooError(f"from_mlp takes {name} from the MLP; do not pass it")
        new = cls(
            fc1.in_features,
            fc1.out_features,
            num_experts,
            bias=(fc1.bias is not None, fc2.bias is not None),
            drop=drops,
            device=fc1.weight.device,
            dtype=fc1.weight.dtype,
            **options,
        )
        dense = {
            f"{name}.{leaf}": t
            for name, lin in (("fc1", fc1), ("fc2", fc2))
            for leaf, t in (("weight", lin.weight), ("bias", lin.bias))
            if t is not None
        }
        new.load_state_dict(new.upcycled_state_dict(dense))
        new.train(mlp.training)
        return new

    def upcycled_state_dict(self, dense: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This module's state dict from a dense MLP's ``fc1.weight``, ``fc1.bias``, ``fc2.weight``, ``fc2.bias``
        (timm ``Mlp`` names): every expert a copy, the router (weight, bias) zero. The one upcycling rule, used by
        :meth:`from_mlp` and by the V-MoE weight loader; a dense MLP of another shape or bias layout is refused."""
        out: dict[str, torch.Tensor] = {}
        for layer in ("fc1", "fc2"):
            for leaf in ("weight", "bias"):
                key, mine = f"{layer}.{leaf}", getattr(getattr(self.experts, layer), leaf)
                t = dense.get(key)
                if (t is None) != (mine is None):
                    raise ZooError(
                        f"the dense MLP {'has no' if t is None else 'has a'} {key} but the experts "
                        f"{'have one' if t is None else 'have none'}: build the MoE with bias matching"
                    )
                if t is None:
                    continue
                if tuple(t.shape) != tuple(mine.shape[1:]):
                    raise ZooError(
                        f"dense MLP {key} has shape {tuple(t.shape)}, the experts need "
                        f"{tuple(mine.shape[1:])} (dim {self.dim}, hidden_dim {self.hidden_dim})"
                    )
                out[f"experts.{key}"] = t.detach().unsqueeze(0).expand(self.num_experts, *t.shape).clone()
        out["router.weight"] = torch.zeros_like(self.router.weight)
        if self.router.bias is not None:
            out["router.bias"] = torch.zeros_like(self.router.bias)
        return out

    def extra_repr(self) -> str:
        parts = [
            f"dim={self.dim}",
            f"hidden_dim={self.hidden_dim}",
            f"num_experts={self.num_experts}",
            f"router={self.router_type}",
            f"k={self.k}",
            f"capacity_factor={self.capacity_factor}",
            f"topk={self.topk}",
        ]
        if self.router_type == "token_choice":
            parts.append(f"normalize_gates={self.normalize_gates}")
        if self.group_size is not None:
            parts.append(f"group_size={self.group_size}")
        if self.topk == "soft":
            parts.append(f"p={self.p}, lam={self.lam}, solver={self.solver}, dykstra_iters={self.dykstra_iters}")
        if getattr(self, "expert_shard", None) is not None:
            parts.append(f"expert_shard={self.expert_shard}")
        return ", ".join(parts)

    # -------------------------------------------------------------------------------------------- checks

    def _check(self, x: torch.Tensor, padding_mask: torch.Tensor | None) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() not in (2, 3):
            raise ZooError(
                f"MoE takes x of shape (B, T, dim) or (T, dim), got "
                f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}"
            )
        if x.shape[-1] != self.dim:
            raise ZooError(f"x has last dimension {x.shape[-1]}, the MoE was built for dim={self.dim}")
        if padding_mask is not None:
            if not isinstance(padding_mask, torch.Tensor) or padding_mask.dtype != torch.bool:
                raise ZooError(
                    f"padding_mask must be a bool tensor (True = padded token), got "
                    f"{getattr(padding_mask, 'dtype', type(padding_mask).__name__)}"
                )
            if padding_mask.shape != x.shape[:-1]:
                raise ZooError(
                    f"padding_mask has shape {tuple(padding_mask.shape)}, expected "
                    f"{tuple(x.shape[:-1])} (x without its last dimension)"
                )

    # -------------------------------------------------------------------------------------------- routing

    def _logits(self, flat: torch.Tensor) -> torch.Tensor:
        """Router scores W_r x in float32 (float64 for float64 inputs), autocast off."""
        dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=flat.device.type, enabled=False):
            bias = self.router.bias.to(dtype) if self.router.bias is not None else None
            return F.linear(flat.to(dtype), self.router.weight.to(dtype), bias)

    def _flat_tokens(
        self, x: torch.Tensor, padding_mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (N, dim) tokens with the padded ones replaced by zeros, and the valid ones (N,) bool (None: all).

        Padded tokens never reach the router's matmul nor the experts: their values, inf or NaN included, change
        nothing (not even the gradients: a NaN row would make d W_r = sum_t dlogits_t x_t^T NaN even where
        dlogits_t = 0, since 0 * NaN = NaN), and the gradient of x there is exactly 0. ``torch.where``, not a
        product with the mask, for the same reason.
        """
        flat = x.reshape(-1, self.dim)
        if padding_mask is None:
            return flat, None
        valid = ~padding_mask.reshape(-1)
        return torch.where(valid.unsqueeze(-1), flat, flat.new_zeros(())), valid

    def _soft_mask(self, scores: torch.Tensor, k: int | torch.Tensor) -> torch.Tensor:
        return soft_topk_mask(
            scores, k, dim=-1, p=self.p, lam=self.lam, solver=self.solver, dykstra_iters=self.dykstra_iters
        )

    def route(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Routing:
        """The dispatch of ``x`` (B, T, dim) or (T, dim): buffer slots, combine weights, aux loss and stats."""
        self._check(x, padding_mask)
        flat, valid = self._flat_tokens(x, padding_mask)
        logits = self._logits(flat)
        if self.router_type == "token_choice":
            return self._token_choice(logits, valid)
        groups, n = (1, flat.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1])
        if self.group_size is not None:
            n = self.group_size
            groups = (flat.shape[0] + n - 1) // n  # not -(-N // n): export's shape solver cannot bound that
        return self._expert_choice(logits, valid, groups, n)

    def _common_stats(
        self, logits: torch.Tensor, valid: torch.Tensor | None, n_valid: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        logits = logits.detach()
        entropy = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
        if valid is not None:
            entropy = entropy * valid
        return {"router_entropy": entropy.sum() / n_valid.clamp(min=1)}

    def _token_choice(self, logits: torch.Tensor, valid: torch.Tensor | None) -> Routing:
        N, E, k = logits.shape[0], self.num_experts, self.k
        gates = logits.softmax(-1)  # S (N, E)
        weights = gates * self._soft_mask(gates, k) if self.topk == "soft" else gates
        sel_w, sel_e = torch.topk(weights, k, dim=-1)  # (N, k), best first
        comb = (
            sel_w / sel_w.sum(-1, keepdim=True).clamp(min=torch.finfo(sel_w.dtype).tiny)
            if self.normalize_gates
            else sel_w
        )
        # assignments in GShard priority: all first choices (token order), then all second choices, ...
        expert = sel_e.t().reshape(-1)
        token = torch.arange(N, device=logits.device).repeat(k)
        comb_flat = comb.t().reshape(-1)
        if valid is None:
            n_valid = torch.full((), N, device=logits.device)
            key = expert
        else:
            n_valid = valid.sum()
            key = torch.where(valid.repeat(k), expert, E)  # padded tokens' assignments to an extra bin E
        # slot of each assignment: its rank among the assignments to the same expert, in priority order. The sort
        # key (expert, assignment number) is unique, so any sort gives the stable order; not a stable sort, which
        # ONNX cannot express (torch.onnx.export has no aten.sort.stable)
        counts = torch.zeros(E + 1, dtype=torch.long, device=logits.device).scatter_add_(0, key, torch.ones_like(key))
        order = torch.argsort(key * key.shape[0] + torch.arange(key.shape[0], device=logits.device))
        starts = counts.cumsum(0) - counts
        rank = torch.arange(key.shape[0], device=logits.device) - starts[key[order]]
        position = torch.empty_like(rank).scatter_(0, order, rank)
        if self.capacity_factor is None:
            C = N
            keep = key < E
        else:
            C = _capacity(N, self.capacity_factor, k, E)
            if valid is None:
                keep = position < C
            else:  # capacity from the valid tokens: ceil(capacity_factor * k * T_valid / E) <= C (same float ops)
                c_eff = torch.ceil(n_valid.double() * self.capacity_factor * k / E).clamp(max=C)
                keep = (key < E) & (position < c_eff)
        slot = torch.where(keep, key * C + position, E * C)  # E * C: a discarded extra slot
        index = torch.full((E * C + 1,), N, dtype=torch.long, device=logits.device).scatter(0, slot, token)
        weight = torch.zeros(E * C + 1, dtype=comb.dtype, device=logits.device).scatter(0, slot, comb_flat * keep)
        index, weight = index[:-1].view(E, C), weight[:-1].view(E, C)

        # load-balancing loss (E2) and stats, over the valid tokens
        denom = n_valid.clamp(min=1)
        f = counts[:E].to(gates.dtype) / (k * denom)
        gates_valid = gates if valid is None else gates * valid.unsqueeze(-1)
        prob = gates_valid.sum(0) / denom
        aux_loss = E * (f * prob).sum()
        stats = self._common_stats(logits, valid, n_valid)
        kept = (index < N).sum(1)
        stats["tokens_per_expert"] = kept.detach()
        # dropped / assigned, 0 (not 1) when no token was routed: an empty or all-padded call drops nothing
        stats["dropped_fraction"] = ((k * n_valid - kept.sum()) / (k * denom)).detach().float()
        if self.topk == "soft":
            total = weights if valid is None else weights * valid.unsqueeze(-1)
            kept_w = sel_w if valid is None else sel_w * valid.unsqueeze(-1)
            stats["dropped_soft_weight"] = ((total.sum() - kept_w.sum()) / total.sum().clamp(min=1e-30)).detach()
        return Routing(index, weight, C, aux_loss, stats)

    def _expert_k(self, n: int, n_valid: torch.Tensor) -> tuple[int, torch.Tensor]:
        """Static buffer size k_max and per-group k (G,) <= n_valid."""
        E = self.num_experts
        if self.k is not None:
            k_max = min(self.k, n)
            return k_max, n_valid.clamp(max=k_max)
        if self.capacity_factor is None:
            return n, n_valid
        k_max = min(max(1, round(n * self.capacity_factor / E)), n)
        k_row = torch.round(n_valid.double() * self.capacity_factor / E).long().clamp(min=1, max=k_max)
        return k_max, torch.minimum(k_row, n_valid)

    def _expert_choice(self, logits: torch.Tensor, valid: torch.Tensor | None, groups: int, n: int) -> Routing:
        N, E = logits.shape
        pad = groups * n - N
        dev = logits.device
        # no padding: known statically (a symbolic batch under torch.export or torch.compile takes the general path
        # below, which computes the same routing whatever pad turns out to be, rather than a guard on pad == 0)
        if valid is None and statically_known_true(pad == 0):
            valid_g = None
            n_valid = torch.full((groups,), n, dtype=torch.long, device=dev)
        else:
            v = valid if valid is not None else torch.ones(N, dtype=torch.bool, device=dev)
            valid_g = F.pad(v, (0, pad), value=False).view(groups, n)
            n_valid = valid_g.sum(-1)
        k_max, k_row = self._expert_k(n, n_valid)
        gates = F.pad(logits, (0, 0, 0, pad)).view(groups, n, E).softmax(-1)
        scores = gates.transpose(1, 2)  # S^T (G, E, n)
        pad_mask = None if valid_g is None else ~valid_g.unsqueeze(1)  # (G, 1, n)
        if self.topk == "soft" and k_max > 0:  # k_max = 0: groups of no token (T = 0), nothing to relax
            masked = scores if pad_mask is None else scores.masked_fill(pad_mask, _PAD_SCORE)
            # a tensor k (per group) only with padding; an int k costs no check (host sync on the CPU)
            k_soft = k_max if valid_g is None else k_row.clamp(min=1).unsqueeze(1).expand(groups, E)
            mask = self._soft_mask(masked, k_soft)
            weights = mask * scores if pad_mask is None else (mask * scores).masked_fill(pad_mask, 0.0)
            key = weights if pad_mask is None else weights.masked_fill(pad_mask, -1.0)
        else:
            weights = scores
            key = scores if pad_mask is None else scores.masked_fill(pad_mask, float("-inf"))
        token = torch.topk(key, k_max, dim=-1).indices  # (G, E, k_max)
        sel_w = weights.gather(-1, token)
        used = torch.arange(k_max, device=dev) < k_row.view(groups, 1, 1)  # slots beyond the group's k are empty
        offset = (torch.arange(groups, device=dev) * n).view(groups, 1, 1)
        # slot (e, g * k_max + j) of the (E, C) dispatch holds group g's j-th pick of expert e: gathered at those
        # positions rather than reshaped from (G, E, k_max), since merging the group dim under torch.export with a
        # dynamic batch (G a ceil of the batch size with group_size) adds a guard the shape solver cannot discharge
        slot = torch.arange(groups * k_max, device=dev)
        g, j = slot // max(k_max, 1), slot % max(k_max, 1)
        e = torch.arange(E, device=dev).unsqueeze(1)
        index = torch.where(used, token + offset, N)[g, e, j]
        weight = (sel_w * used)[g, e, j]

        total_valid = n_valid.sum()
        stats = self._common_stats(logits, valid, total_valid)
        stats["tokens_per_expert"] = (index < N).sum(1).detach()
        hit = torch.zeros(N + 1, dtype=logits.dtype, device=dev).index_put_((index,), logits.new_ones(()))[:N]
        if valid is not None:
            hit = hit * valid
        stats["dropped_fraction"] = ((total_valid - hit.sum()) / total_valid.clamp(min=1)).detach()
        if self.topk == "soft":
            stats["dropped_soft_weight"] = ((weights.sum() - weight.sum()) / weights.sum().clamp(min=1e-30)).detach()
        return Routing(index, weight, groups * k_max, logits.new_zeros(()), stats)

    # -------------------------------------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """MoE(x) (E1), shaped like x; sets ``self.aux_loss`` and ``self.stats`` (not under ``torch.export``)."""
        routing = self.route(x, padding_mask)
        flat, _ = self._flat_tokens(x, padding_mask)  # padded tokens are never dispatched, and are zeros anyway
        N = flat.shape[0]
        # gather into a static (E, C, dim) buffer; empty slots read the appended zero row N. The buffer and the
        # experts' output stay (E, C, dim), indexed by the (E, C) index itself: under torch.export with a dynamic
        # batch, C is a function of the batch size, and a view between (E * C, dim) and (E, C, dim) adds a guard
        # (C != 1) that the shape solver cannot always prove over the batch range
        buffer = torch.cat([flat, flat.new_zeros(1, self.dim)])[routing.index]
        # expert parallel: the slots travel to the experts' ranks and back (all-to-all); None (modules pickled
        # before the attribute existed too): every expert here
        shard = getattr(self, "expert_shard", None)
        y = self.experts(buffer) if shard is None else shard(self.experts, buffer)
        y = y * routing.weight.unsqueeze(-1).to(y.dtype)
        out = y.new_zeros(N + 1, self.dim).index_put_((routing.index,), y, accumulate=True)
        if not torch.compiler.is_exporting():
            # a training loop's record: torch.export would only warn that tensor attributes were assigned during
            # export (and restore them afterwards), so the exported program leaves them out
            self.aux_loss = routing.aux_loss
            self.stats = routing.stats
        return out[:N].view(x.shape)


def routing_statistics(layers: Sequence[MoE]) -> dict[str, torch.Tensor]:
    """The routing statistics of the last forward of MoE ``layers``, over the layers (what a training loop logs):

    * ``aux_loss``: sum of the layers' ``aux_loss`` (unweighted, detached);
    * ``dropped_fraction``, ``router_entropy``: means over the layers of their ``stats``;
    * ``expert_load_max`` / ``expert_load_min``: mean over the layers of max_e n_e / mean_e n_e (min_e likewise),
      n_e the tokens expert e processed: 1 / 1 is perfect balance, a minimum of 0 an idle expert.

    Empty when there is no layer or a layer has not run yet. Detached 0-d float tensors; no host sync.
    """
    if not layers or any(not m.stats for m in layers):
        return {}
    loads = [m.stats["tokens_per_expert"].float() for m in layers]  # layers may have different numbers of experts
    return {
        "aux_loss": torch.stack([m.aux_loss.detach().float() for m in layers]).sum(),
        "dropped_fraction": torch.stack([m.stats["dropped_fraction"].float() for m in layers]).mean(),
        "router_entropy": torch.stack([m.stats["router_entropy"].float() for m in layers]).mean(),
        "expert_load_max": torch.stack([n.amax() / n.mean().clamp_min(1e-12) for n in loads]).mean(),
        "expert_load_min": torch.stack([n.amin() / n.mean().clamp_min(1e-12) for n in loads]).mean(),
    }
