"""Neural ODEs with explicit width and switches: a one-hidden-layer vector field whose controls are piecewise
constant in time.

The state x(t) in R^d follows

    x'(t) = sum_{i=1..p} w_i(t) sigma(a_i(t) . x + b_i(t)),     t in (0, T),                    (N1)

with the controls (w_i, a_i, b_i) in R^d x R^d x R constant on each of L + 1 time intervals
0 = tau_0 < tau_1 < ... < tau_{L+1} = T: the width is p, the depth is the number L of switches. Each interval is
integrated with ``steps`` = k steps of its own size h_j = (tau_{j+1} - tau_j) / k by a rule of the residual-stack
engine (:class:`zoo.nn.ResidualStack`: ``"euler"`` x <- x + h F_j(x), ``"heun"``), so the network is a residual
network of (L + 1) k blocks whose weights are tied inside each interval, and every memory strategy of the engine
applies (``"full"``: autograd; ``"adjoint"``: each interval keeps only its end state and rebuilds the rest backward).
The switch times are uniform, given, or learned (``switch_times="learned"``: the interval lengths are
T softmax(logits), so the times stay ordered in (0, T); the step of interval j is then a function of the logits).
The semi-autonomous variant keeps w_i and a_i constant in time and switches only the biases b_i.

For classification the image is flattened, embedded linearly into R^d (``embed``), carried by the flow to time T,
and read by a linear head: logits = head(Phi_T(embed(x))). timm's model protocol applies with the state as the
feature vector (``forward_intermediates`` gives the state at the end of each interval).

Interpolation (:func:`interpolating_controls`): with ReLU, N distinct points x_n of R^d (d >= 2) can be sent
exactly onto N distinct targets y_n with L = 2 ceil(N / p) - 1 switches (2 ceil(N / p) - 2 when d > N). The
construction uses fields whose activations are frozen along the flow (every w_i orthogonal to every a_k of the
interval), whose flow is x(t) = x(0) + t F(x(0)) in closed form; the module docstring of that function explains it.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights
from zoo.models.arguments import check_model_kwargs, take_indices
from zoo.nn import ResidualStack
from zoo.nn.rules import RULES
from zoo.pretrained import PretrainedCfg, build_model
from zoo.registry import register_model
from zoo.tasks import ImageClassifier
from zoo.validation import (
    boolean,
    choice,
    finite_float,
    image_size,
    non_negative_int,
    optional,
    positive_int,
    probability,
)

__all__ = [
    "ACTIVATIONS",
    "IntervalField",
    "NeuralODE",
    "closed_form_flow",
    "interpolating_controls",
    "interpolation_switches",
    "neural_ode_classifier",
    "neural_ode_digits",
]

ACTIVATIONS: Mapping[str, Any] = {
    "relu": F.relu,
    "leaky_relu": F.leaky_relu,
    "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
    "softplus": F.softplus,
    "gelu": F.gelu,
    "silu": F.silu,
}
MEMORY_MODES = ("full", "adjoint")
OUTPUT_FORMATS = ("NC", "NCHW")
_MEAN = _STD = 0.5


def _node_cfg() -> PretrainedCfg:
    """The data config of the family: the image as it is (bilinear, no crop), mean = std = 0.5 per channel."""
    return PretrainedCfg(
        first_conv="embed",
        classifier="head",
        interpolation="bilinear",
        crop_pct=1.0,
        mean=(_MEAN,) * 3,
        std=(_STD,) * 3,
    )


def _ode_rules() -> tuple[str, ...]:
    """The registered forward rules that integrate a first-order ODE (no velocity: not the momentum rule)."""
    return tuple(name for name, cls in RULES.items() if not cls.has_velocity)


class IntervalField(nn.Module):
    """The vector field of one interval, times the step: ``f(x, h) = h F(x)``, F(x) = sum_i w_i sigma(a_i . x + b_i).

    ``a`` is (p, d) (row i is a_i), ``b`` is (p,), ``w`` is (d, p) (column i is w_i): F(x) = w sigma(a x + b).
    The step h is an argument (a number, or a tensor when the switch times are learned), so the residual stack
    runs with step 1 and the same block serves forward (h > 0) and backward (h < 0) integration.

    Args:
        dim: d, the dimension of the state.
        width: p, the number of neurons.
        activation: a name in :data:`ACTIVATIONS`.
        a, w: parameters to share (the semi-autonomous variant shares them across intervals); None: new ones.
    """

    def __init__(
        self,
        dim: int,
        width: int,
        activation: str = "relu",
        a: nn.Parameter | None = None,
        w: nn.Parameter | None = None,
    ) -> None:
        super().__init__()
        self.activation = activation
        self.sigma = ACTIVATIONS[activation]
        self.a = a if a is not None else nn.Parameter(torch.empty(width, dim))
        self.b = nn.Parameter(torch.empty(width))
        self.w = w if w is not None else nn.Parameter(torch.empty(dim, width))

    def field(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) = sum_i w_i sigma(a_i . x + b_i) for x of shape (..., d)."""
        return F.linear(self.sigma(F.linear(x, self.a, self.b)), self.w)

    def forward(self, x: torch.Tensor, step: float | torch.Tensor) -> torch.Tensor:
        """h F(x): the increment of one Euler step of size ``step``."""
        return step * self.field(x)

    def extra_repr(self) -> str:
        width, dim = self.a.shape
        return f"dim={dim}, width={width}, activation={self.activation!r}"


def _fixed_lengths(times: str | tuple[float, ...], switches: int, horizon: float) -> tuple[float, ...]:
    """The L + 1 interval lengths of fixed switch times: tau_{j+1} - tau_j, or T / (L + 1) each (``"uniform"``)."""
    if isinstance(times, tuple):
        ends = (0.0, *times, horizon)
        return tuple(b - a for a, b in zip(ends[:-1], ends[1:]))
    return (horizon / (switches + 1),) * (switches + 1)


def _numbers(value: Any) -> list[Any] | None:
    """The entries of a list, tuple, 1-D numpy array or 1-D tensor (a tensor is read on the host: arguments and
    ``t_span`` only, never in forward); None for anything else (a string, a number, a 2-D array ...). A 0-d tensor
    entry becomes its number."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist() if value.ndim == 1 else None
    if isinstance(value, np.ndarray):
        return value.tolist() if value.ndim == 1 else None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        return None
    return [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v for v in value]


def _check_switch_times(switch_times: Any, switches: int, horizon: float) -> str | tuple[float, ...]:
    if isinstance(switch_times, str):
        return choice(
            "switch_times",
            switch_times,
            ("uniform", "learned"),
            hint="choose 'uniform', 'learned', or give the L switch times as an increasing list in (0, horizon)",
        )
    entries = _numbers(switch_times)
    if entries is None or len(entries) != switches:
        raise ZooError(
            f"switch_times must be 'uniform', 'learned' or a list of the {switches} switch times, got "
            f"{switch_times!r}: give exactly `switches` times, increasing, in (0, horizon)"
        )
    times = tuple(finite_float(f"switch_times[{i}]", t) for i, t in enumerate(entries))
    bounds = (0.0, *times, horizon)
    if any(b <= a for a, b in zip(bounds[:-1], bounds[1:])):
        raise ZooError(
            f"switch_times {list(times)} must increase strictly inside (0, horizon={horizon}): give ordered times "
            "strictly between 0 and the horizon"
        )
    return times


def _check_dtype(what: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """One ZooError where torch would fail on mixed dtypes: ``x`` and the first weight it meets differ, outside
    autocast (which casts float32 / bfloat16 / float16 operands to its own dtype) or with float64 on either side
    (which autocast never casts). Compares dtypes only: no host read."""
    if x.dtype == weight.dtype:
        return
    if torch.is_autocast_enabled(x.device.type) and torch.float64 not in (x.dtype, weight.dtype):
        return
    autocast = "" if torch.float64 in (x.dtype, weight.dtype) else ", or run under torch.autocast"
    raise ZooError(
        f"{what} is {x.dtype} but the model's weights are {weight.dtype}: cast one to the other (x.to({weight.dtype})"
        f" or model.to({x.dtype})){autocast}"
    )


class NeuralODE(HubMixin, ImageClassifier):
    """A neural ODE of width p with L switches (N1), as a classifier: flatten, embed, flow to T, linear head.

    Args:
        dim: d, the dimension of the state (the embedding's output).
        width: p, neurons of the field.
        switches: L, the number of switches (the controls take L + 1 values in time).
        horizon: T, the final time.
        steps: k, integration steps per interval (tied weights inside an interval).
        rule: the engine's forward rule, ``"euler"`` or ``"heun"`` (any registered rule without velocity).
        memory: ``"full"`` (autograd) or ``"adjoint"`` (each interval keeps only its end state; backward rebuilds
            the states by stepping in reverse: approximate gradients, exact where the rule inverts exactly).
        activation: sigma, a name in :data:`ACTIVATIONS` (``"relu"``, ``"tanh"`` ...).
        switch_times: ``"uniform"`` (tau_j = j T / (L + 1)), ``"learned"`` (interval lengths T softmax(logits),
            the logits ``time_logits`` starting at 0, i.e. uniform) or the L times as a list, increasing in (0, T).
        semi_autonomous: only the biases b_i switch; w_i and a_i are shared by every interval.
        img_size, in_chans: the image input (flattened to in_chans * H * W numbers), unless ``in_features`` is given.
        in_features: the input is a vector of this size (no image; ``pretrained_cfg`` then has no image keys).
        embed: a linear embedding of the input into R^d; False: the input is the state (in_features must be d).
        num_classes: classifier outputs; 0: no head (``forward`` returns the state at time T).
        drop_rate: dropout before the head.
        weights: a file or ``save_pretrained`` folder to load.
        **kwargs: the training settings of :class:`zoo.tasks.ImageClassifier` (``optimizer``, ``lr_scheduler``,
            ``label_smoothing``); without ``optimizer``, :attr:`default_optimizer` (Adam, lr 1e-3).
    """

    same_function_args = frozenset({"num_classes", "memory", "label_smoothing", "drop_rate"})

    #: Adam, lr 1e-3 (the usual optimiser of neural ODEs)
    default_optimizer = functools.partial(torch.optim.Adam, lr=1e-3)

    def __init__(
        self,
        dim: int = 64,
        width: int = 64,
        switches: int = 3,
        horizon: float = 1.0,
        steps: int = 2,
        rule: str = "euler",
        memory: str = "full",
        activation: str = "relu",
        switch_times: str | Sequence[float] = "uniform",
        semi_autonomous: bool = False,
        img_size: int | tuple[int, int] = 32,
        in_chans: int = 3,
        in_features: int | None = None,
        embed: bool = True,
        num_classes: int = 10,
        drop_rate: float = 0.0,
        weights: str | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_kwargs(type(self), kwargs, ImageClassifier)
        positive_int("dim", dim)
        positive_int("width", width)
        non_negative_int("switches", switches)
        horizon = finite_float("horizon", horizon, 0.0, low_open=True)
        positive_int("steps", steps)
        choice("rule", rule, _ode_rules(), hint=f"choose one of {', '.join(map(repr, _ode_rules()))}")
        choice("memory", memory, MEMORY_MODES, hint="choose 'full' or 'adjoint' (the flow is not exactly invertible)")
        choice("activation", activation, tuple(ACTIVATIONS))
        times = _check_switch_times(switch_times, switches, horizon)
        boolean("semi_autonomous", semi_autonomous)
        boolean("embed", embed)
        size = image_size("img_size", img_size)
        positive_int("in_chans", in_chans)
        optional(positive_int, "in_features", in_features)
        probability("drop_rate", drop_rate)
        non_negative_int("num_classes", num_classes)
        features = in_features if in_features is not None else in_chans * size[0] * size[1]
        if not embed and features != dim:
            raise ZooError(
                f"embed=False makes the input the state, so the input size ({features}) must equal dim ({dim}): "
                "give embed=True, or dim equal to the input size"
            )
        if not isinstance(switch_times, str):  # a list of floats in hparams (a tuple, an array or a tensor given)
            switch_times = list(times)
        super().__init__(num_classes=num_classes, **kwargs)
        self.num_classes = num_classes
        self.dim = self.num_features = self.head_hidden_size = dim
        self.in_features = features
        self.image_shape = None if in_features is not None else (in_chans, *size)
        self.horizon = horizon
        self.steps = steps
        self.learned_times = switch_times == "learned"

        self.embed = nn.Linear(features, dim) if embed else nn.Identity()
        shared_a = nn.Parameter(torch.empty(width, dim)) if semi_autonomous else None
        shared_w = nn.Parameter(torch.empty(dim, width)) if semi_autonomous else None
        fields = [IntervalField(dim, width, activation, shared_a, shared_w) for _ in range(switches + 1)]
        self.intervals = nn.ModuleList(
            ResidualStack([field] * steps, rule=rule, scale=1.0, memory=memory) for field in fields
        )
        if self.learned_times:
            self.time_logits = nn.Parameter(torch.zeros(switches + 1))
        else:
            self._fixed_lengths = _fixed_lengths(times, switches, horizon)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        reduction = size[0] if self.image_shape is not None else 1
        self.feature_info = [
            dict(module=f"intervals.{j}", num_chs=dim, reduction=reduction) for j in range(switches + 1)
        ]
        self.reset_parameters()
        self.pretrained_cfg = self.pretrained_cfg_as_built(_node_cfg().to_dict())
        self.default_cfg = self.pretrained_cfg
        if weights is not None:
            load_weights(self, weights)

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation: a_i, b_i uniform in +-1/sqrt(d), w_i in +-1/sqrt(p); the time logits at 0."""
        for field in self.fields:
            width, dim = field.a.shape
            nn.init.uniform_(field.a, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            nn.init.uniform_(field.b, -1 / math.sqrt(dim), 1 / math.sqrt(dim))
            nn.init.uniform_(field.w, -1 / math.sqrt(width), 1 / math.sqrt(width))
        if self.learned_times:
            nn.init.zeros_(self.time_logits)

    # ---------------------------------------------------------------- structure
    @property
    def fields(self) -> list[IntervalField]:
        """The field of each interval, in time order."""
        return [stack.blocks[0] for stack in self.intervals]

    @property
    def switches(self) -> int:
        """L, the number of switches."""
        return len(self.intervals) - 1

    def interval_lengths(self) -> torch.Tensor:
        """(L + 1,) lengths tau_{j+1} - tau_j (a function of ``time_logits`` when the times are learned)."""
        ref = self.fields[0].b
        if self.learned_times:
            return torch.softmax(self.time_logits, dim=0) * self.horizon
        return torch.tensor(self._fixed_lengths, dtype=ref.dtype, device=ref.device)

    def interval_ends(self) -> torch.Tensor:
        """(L + 2,) times 0 = tau_0 < tau_1 < ... < tau_{L+1} = T."""
        lengths = self.interval_lengths()
        return torch.cat([lengths.new_zeros(1), torch.cumsum(lengths, dim=0)])

    def switch_times(self) -> torch.Tensor:
        """(L,) the switch times tau_1 .. tau_L."""
        return self.interval_ends()[1:-1]

    def _steps(self) -> list[float | torch.Tensor]:
        """The step h_j of each interval: a number for fixed times (no tensor work), a 0-d tensor when learned."""
        if self.learned_times:
            return list(torch.softmax(self.time_logits, dim=0) * (self.horizon / self.steps))
        return [length / self.steps for length in self._fixed_lengths]

    # ---------------------------------------------------------------- integration (torchdiffeq-style)
    def _ends_on_host(self) -> list[float]:
        if self.learned_times:  # a host read, outside forward: integrate / flow between arbitrary times only
            return [float(t) for t in self.interval_ends().detach().cpu().tolist()]
        ends = [0.0]
        for length in self._fixed_lengths:
            ends.append(ends[-1] + length)
        ends[-1] = self.horizon
        return ends

    def _check_state(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim < 1 or z.shape[-1] != self.dim:
            got = f"shape {tuple(z.shape)} ({z.dtype})" if isinstance(z, torch.Tensor) else type(z).__name__
            raise ZooError(
                f"the state must be a floating-point tensor (..., {self.dim}), got {got}: flow, integrate and "
                "flow_map act on the state after the embedding; give model.embed(x.flatten(1)) for an input x"
            )
        _check_dtype("the state", z, self.fields[0].a)

    def _run(self, j: int, z: torch.Tensor, step: float | torch.Tensor, n: int) -> torch.Tensor:
        stack = self.intervals[j]
        if n != stack.depth:  # part of an interval: the same field, n steps, the same rule and memory
            part = ResidualStack([stack.blocks[0]] * n, rule=stack.rule, scale=1.0, memory=stack.memory)
            part.grad_checkpointing = stack.grad_checkpointing
            stack = part
        return stack(z, step)

    def integrate(self, z: torch.Tensor, t0: float = 0.0, t1: float | None = None) -> torch.Tensor:
        """z(t1) from z(t0) = ``z`` (the state, (..., d)) by the model's discretisation; t1 < t0 integrates
        backward in time (negative steps), which inverts the flow up to the rule's error (order 1 for Euler, 2
        for Heun). A whole interval takes ``steps`` steps; a part of one takes ceil(steps * part / interval)
        equal steps. ``t1`` None is the horizon. Times between the switch times are located on the host (a device
        read when the times are learned); ``forward`` itself never reads the device."""
        self._check_state(z)
        t0 = finite_float("t0", t0, 0.0, self.horizon)
        t1 = self.horizon if t1 is None else finite_float("t1", t1, 0.0, self.horizon)
        if t0 == t1:
            return z
        ends = self._ends_on_host()
        # learned times: the ends as tensors too, so that a part of an interval steps by a function of the logits
        # (its gradient flows); the host values only locate the pieces and count their steps (piecewise constant)
        ends_t = self.interval_ends() if self.learned_times else ends
        tol = 1e-12 * self.horizon
        lo, hi = min(t0, t1), max(t0, t1)
        sign = 1.0 if t1 > t0 else -1.0
        steps = self._steps()
        pieces = []
        for j in range(len(self.intervals)):
            start, stop = max(lo, ends[j]), min(hi, ends[j + 1])
            if stop - start > tol:
                pieces.append((j, start, stop))
        for j, start, stop in pieces if sign > 0 else reversed(pieces):
            if start <= ends[j] + tol and stop >= ends[j + 1] - tol:
                z = self._run(j, z, sign * steps[j], self.steps)
            else:
                n = max(1, math.ceil(self.steps * (stop - start) / (ends[j + 1] - ends[j]) - 1e-9))
                start_t = ends_t[j] if start <= ends[j] + tol else start  # the interval's own end, or t0 / t1
                stop_t = ends_t[j + 1] if stop >= ends[j + 1] - tol else stop
                z = self._run(j, z, sign * (stop_t - start_t) / n, n)
        return z

    def flow_map(self, z: torch.Tensor) -> torch.Tensor:
        """Phi_T(z): the state at time T from the state ``z`` at time 0 (no host read)."""
        self._check_state(z)
        for j, step in enumerate(self._steps()):
            z = self._run(j, z, step, self.steps)
        return z

    def flow(self, z: torch.Tensor, t_span: Sequence[float] | torch.Tensor | None = None) -> torch.Tensor:
        """The trajectory at the times ``t_span`` (torchdiffeq's ``odeint(func, z, t_span)`` convention: a
        monotone sequence in [0, T], the first entry the time of ``z``), stacked: ``(len(t_span), *z.shape)``.
        None: the interval ends 0, tau_1, ..., T."""
        self._check_state(z)
        if t_span is None:
            out = [z]
            for j, step in enumerate(self._steps()):
                out.append(self._run(j, out[-1], step, self.steps))
            return torch.stack(out)
        entries = _numbers(t_span)
        if entries is None:
            shown = f"a {t_span.ndim}-d tensor" if isinstance(t_span, (torch.Tensor, np.ndarray)) else repr(t_span)
            raise ZooError(
                f"t_span must be a 1-D sequence of times in [0, {self.horizon}] (a list, 1-D array or 1-D tensor), "
                f"got {shown}: give e.g. [0.0, {self.horizon}]"
            )
        if not entries:
            raise ZooError("t_span is empty: give at least the initial time")
        times = [finite_float(f"t_span[{i}]", t, 0.0, self.horizon) for i, t in enumerate(entries)]
        diffs = [b - a for a, b in zip(times[:-1], times[1:])]
        if not (all(d > 0 for d in diffs) or all(d < 0 for d in diffs)):
            raise ZooError(f"t_span {times} must be strictly increasing or strictly decreasing")
        out = [z]
        for a, b in zip(times[:-1], times[1:]):
            out.append(self.integrate(out[-1], a, b))
        return torch.stack(out)

    # ---------------------------------------------------------------- timm's model protocol
    def pretrained_cfg_as_built(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``cfg`` for this model as built: ``input_size`` (in_chans, H, W) of the flattened image (fixed), one
        mean / std per channel, ``first_conv`` the embedding, ``classifier`` the head; a vector model has no image
        keys."""
        out = dict(cfg)
        if self.image_shape is None:
            for key in ("input_size", "test_input_size", "min_input_size", "interpolation", "crop_pct", "crop_mode"):
                out.pop(key, None)
            out.pop("mean", None)
            out.pop("std", None)
            out["in_features"] = self.in_features
        else:
            chans = self.image_shape[0]
            out["input_size"] = tuple(self.image_shape)
            out["fixed_input_size"] = True
            for key in ("test_input_size", "min_input_size"):
                if key in out and tuple(out[key]) != out["input_size"]:
                    del out[key]
            for key, default in (("mean", _MEAN), ("std", _STD)):
                values = tuple(out.get(key) or (default,) * chans)
                out[key] = values if len(values) == chans else (sum(values) / len(values),) * chans
        out["num_classes"] = self.num_classes
        if isinstance(self.embed, nn.Linear):
            out["first_conv"] = "embed"
        else:
            out.pop("first_conv", None)
        out["classifier"] = "head"
        return out

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute every step in backward (memory="full"; "adjoint" keeps no step's activations anyway)."""
        enable = boolean("enable", enable)
        for stack in self.intervals:
            stack.grad_checkpointing = enable

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter groups (layer-wise learning-rate decay ...): the stem (the embedding, the switch-time
        logits, and the semi-autonomous variant's shared a and w: they act in every interval), then one group per
        interval in time order; the head is the last group. (timm's fallback without this method lumps the first
        intervals with the embedding.)

        Args:
            coarse: timm's coarse grouping; the same groups here (an interval is one block of tied steps).
        """
        shared = r"|^intervals\.0\.0\.[aw]$" if self.fields[1:] and self.fields[1].a is self.fields[0].a else ""
        return {"stem": r"^embed|^time_logits" + shared, "blocks": r"^intervals\.(\d+)"}

    def get_classifier(self) -> nn.Module:
        """The classifier (``head``; ``nn.Identity`` without one)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new head of ``num_classes`` outputs (0: none, ``forward`` returns the state at T), initialised as
        ``nn.Linear``; ``hparams`` follow. ``global_pool``: None only (the state is a vector, nothing to pool)."""
        non_negative_int("num_classes", num_classes)
        if global_pool is not None:
            raise ZooError(
                f"a NeuralODE has no global_pool (got {global_pool!r}): its features are the state vector; call "
                "reset_classifier(num_classes) without global_pool"
            )
        ref = self.fields[0].b
        self.head = (
            nn.Linear(self.dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes else nn.Identity()
        )
        self.head.train(self.training)
        self.num_classes = num_classes
        self.set_num_classes(num_classes)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """The input flattened to (B, in_features), shape and dtype checked (no host read)."""
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise ZooError(
                f"NeuralODE expects a floating-point tensor, got {getattr(x, 'dtype', type(x).__name__)}: give "
                "float images or vectors (e.g. x.float() / 255 for 8-bit images)"
            )
        _check_dtype("the input", x, self.embed.weight if isinstance(self.embed, nn.Linear) else self.fields[0].a)
        if self.image_shape is not None:
            if x.ndim != 4 or tuple(x.shape[1:]) != self.image_shape:
                raise ZooError(
                    f"this NeuralODE takes images (B, {', '.join(map(str, self.image_shape))}), got shape "
                    f"{tuple(x.shape)}: resize the input or build the model with that img_size / in_chans"
                )
            return x.flatten(1)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ZooError(f"this NeuralODE takes vectors (B, {self.in_features}), got shape {tuple(x.shape)}")
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The state at time T, (B, d): Phi_T(embed(flatten(x)))."""
        return self.flow_map(self.embed(self._input(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Dropout and (unless ``pre_logits``) the linear head."""
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (the state at T with ``num_classes=0``)."""
        return self.forward_head(self.forward_features(x))

    def _take_indices(self, indices: int | Sequence[int] | None) -> tuple[list[int], int]:
        return take_indices(len(self.intervals), indices, "intervals")

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NC",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """timm's ``forward_intermediates`` over the intervals: the state at the end of the intervals ``indices``
        (None: all L + 1, an int n: the last n, a list: those, negative from the end), as ``(B, d)`` (``"NC"``) or
        ``(B, d, 1, 1)`` (``"NCHW"``, for timm's feature extractors); and, unless ``intermediates_only``, the final
        state (``forward_features``). ``stop_early``: no interval past the last one taken. ``norm`` is accepted
        for timm's signature (the model has no final norm)."""
        choice("output_fmt", output_fmt, OUTPUT_FORMATS)
        take, max_index = self._take_indices(indices)
        z = self.embed(self._input(x))
        intermediates = []
        steps = self._steps()
        last = max_index if stop_early else len(self.intervals) - 1
        for j in range(last + 1):
            z = self._run(j, z, steps[j], self.steps)
            if j in take:
                intermediates.append(z[:, :, None, None] if output_fmt == "NCHW" else z)
        return intermediates if intermediates_only else (z, intermediates)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the intervals after the last of ``indices`` (and the head with ``prune_head``) for feature
        extraction; returns the interval indices kept (timm). The model then flows to the end tau_{m+1} of the
        last interval kept, m, and its ``hparams`` say so (``switches`` = m, ``horizon`` = tau_{m+1}, the first m
        switch times), so that a checkpoint or ``save_pretrained`` rebuilds the pruned model; learned times keep the
        logits of the intervals kept, with the horizon T (sum_{j<=m} e^{l_j} / sum_j e^{l_j}) that leaves every
        interval's length as it was."""
        take, max_index = self._take_indices(indices)
        kept = max_index + 1
        if kept < len(self.intervals):
            hp = self.hparams
            times = hp.get("switch_times", "uniform")
            if self.learned_times:
                with torch.no_grad():
                    share = torch.softmax(self.time_logits.double(), dim=0)[:kept].sum()
                self.horizon = self.horizon * float(share)
                self.time_logits = nn.Parameter(self.time_logits.detach()[:kept].clone())
            elif isinstance(times, str):  # uniform: the same lengths, T / (L + 1), over a shorter horizon
                self.horizon = self.horizon * kept / len(self.intervals)
            else:
                times = tuple(float(t) for t in times)[:max_index]
                self.horizon = float(hp["switch_times"][max_index])
            if not self.learned_times:  # as the constructor computes them, so that a rebuild is bit for bit
                self._fixed_lengths = _fixed_lengths(times, max_index, self.horizon)
            self.intervals = self.intervals[:kept]
            self.feature_info = self.feature_info[:kept]
            hp["switches"], hp["horizon"] = max_index, self.horizon
            if not isinstance(times, str):
                hp["switch_times"] = list(times)
        if prune_head:
            self.reset_classifier(0)
        return take


# ------------------------------------------------------------------------------------------------
# Interpolation with explicit controls


def interpolation_switches(num_points: int, width: int, dim: int) -> int:
    """The theorem's number of switches to interpolate ``num_points`` pairs in R^dim with width p:
    2 ceil(N / p) - 1, or 2 ceil(N / p) - 2 when dim > N."""
    positive_int("num_points", num_points)
    positive_int("width", width)
    positive_int("dim", dim)
    groups = math.ceil(num_points / width)
    return 2 * groups - 2 if dim > num_points else 2 * groups - 1


def _as_points(name: str, value: Any) -> torch.Tensor:
    t = torch.as_tensor(value)
    if not (t.is_floating_point() or t.dtype in (torch.int32, torch.int64)):
        raise ZooError(f"{name} must hold real numbers, got {t.dtype}")
    t = t.detach().to("cpu", torch.float64)
    if t.ndim != 2 or t.shape[0] < 1:
        raise ZooError(f"{name} must be an (N, d) array of N >= 1 points, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise ZooError(f"{name} holds NaN or infinite values: give finite points")
    return t


def _refuse_duplicates(name: str, points: torch.Tensor, why: str) -> None:
    _, inverse, counts = torch.unique(points, dim=0, return_inverse=True, return_counts=True)
    repeated = torch.nonzero(counts[inverse] > 1).flatten()
    if len(repeated):
        first = int(repeated[0])
        second = int(next(i for i in repeated.tolist() if i != first and torch.equal(points[i], points[first])))
        raise ZooError(f"{name} {first} and {second} are the same point: {why}")


def _min_gaps(points: torch.Tensor, directions: torch.Tensor) -> torch.Tensor:
    """For each column u of ``directions``, the smallest distance between two of the u . x_n (inf for one point)."""
    if points.shape[0] < 2:
        return torch.full((directions.shape[1],), math.inf, dtype=points.dtype)
    return torch.diff(torch.sort(points @ directions, dim=0).values, dim=0).min(dim=0).values


def _candidates(basis: torch.Tensor, count: int, generator: torch.Generator) -> torch.Tensor:
    """Unit vectors of the span of ``basis``'s columns: the columns themselves and ``count`` random ones."""
    random = basis @ torch.randn(basis.shape[1], count, dtype=basis.dtype, generator=generator)
    out = torch.cat([basis, random], dim=1)
    return out / out.norm(dim=0, keepdim=True)


def _orthonormal_complement(v: torch.Tensor) -> torch.Tensor:
    """(d, d - 1) orthonormal basis of the hyperplane orthogonal to the unit vector ``v``."""
    q, _ = torch.linalg.qr(torch.cat([v[:, None], torch.eye(len(v), dtype=v.dtype)], dim=1))
    return q[:, 1:]


def _steer(
    points: torch.Tensor, targets: torch.Tensor, pivot: torch.Tensor, moves: torch.Tensor, width: int, length: float
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Controls of the intervals that move every point's component in ``moves``'s span (a (d, m) orthonormal basis,
    orthogonal to the ``pivot`` direction) onto its target's, ``width`` points per interval, pivoting on the
    coordinate s = pivot . x (distinct over the points, frozen by these fields).

    Neuron i of an interval is w_i relu(b_i - s): it moves the points below its threshold b_i, each by
    length * w_i (b_i - s), along w_i in the span of ``moves``. The points are taken by decreasing s, ``width`` at
    a time; the thresholds of a group lie between its consecutive points (the first between the group and the
    points already placed, which stay frozen), so the group's j-th point is moved by the first j neurons only and
    the w_i follow by forward substitution. Points below the group move too; they are placed later. ``points``
    is updated in place. Returns the (a, b, w) of each interval."""
    dim = points.shape[1]
    s = points @ pivot
    order = torch.argsort(s, descending=True)
    spread = float(s.max() - s.min()) or 1.0
    intervals = []
    previous = float(s[order[0]]) + spread  # above every point: nothing placed yet
    for start in range(0, len(order), width):
        group = order[start : start + width]
        a = -pivot.expand(width, dim).clone()
        b = torch.zeros(width, dtype=points.dtype)
        w = torch.zeros(dim, width, dtype=points.dtype)
        # knots: the first halfway between the group and the points above it, then three quarters of the way up
        # from each point to the one above. The displacement s -> sum_i w_i (b_i - s)_+ is piecewise linear with
        # these knots; its slope below the j-th knot is (slope of the moves) / theta - (previous slope) (1 - theta)
        # / theta with theta = 3/4, so slopes do not build up from one neuron to the next (theta = 1/2, midpoints,
        # would carry them on undamped), and no point sits on a kink (theta = 1 would: gradients there are
        # ill-defined, and rounding decides whether the neuron is on)
        group_s = s[group]
        b[: len(group)] = group_s + 0.75 * (group_s.roll(1) - group_s)
        b[0] = 0.5 * (previous + float(group_s[0]))
        for i, n in enumerate(group.tolist()):
            needed = moves @ (moves.T @ (targets[n] - points[n])) / length
            done = w[:, :i] @ (b[:i] - s[n]) if i else torch.zeros(dim, dtype=points.dtype)
            column = (needed - done) / (b[i] - s[n])
            w[:, i] = moves @ (moves.T @ column)  # in the span of moves exactly (orthogonal to the pivot)
        points += length * torch.relu(b - s[:, None]) @ w.T
        intervals.append((a, b, w))
        previous = float(s[group[-1]])
    return intervals


def interpolating_controls(
    x: Any,
    y: Any,
    width: int,
    horizon: float = 1.0,
    *,
    steps: int = 1,
    rule: str = "euler",
    memory: str = "full",
    seed: int = 0,
) -> NeuralODE:
    """A ReLU :class:`NeuralODE` (float64, no embedding, no head: ``model(x)`` is Phi_T(x)) whose flow maps every
    x_n exactly onto y_n, with the theorem's number of switches (:func:`interpolation_switches`):
    L = 2 ceil(N / p) - 1, or 2 ceil(N / p) - 2 when d > N; uniform switch times.

    The construction. A field F(x) = sum_i w_i relu(a_i . x + b_i) whose every w_i is orthogonal to every a_k
    leaves each a_k . x constant along its trajectories, so F is constant along them and the flow over a time t is
    x(t) = x(0) + t F(x(0)) exactly (and so is any Euler or Heun step: the discretisation is exact). A pivot
    direction v is chosen with the v . x_n distinct and the components of the y_n orthogonal to v distinct (a
    generic direction; several are tried and the best separated kept).

    1. ceil(N / p) intervals steer the component orthogonal to v of every point onto its target's: a_i = -v (the
       field freezes v . x), w_i orthogonal to v, p points per interval in decreasing order of v . x, each neuron
       switched on below a threshold between two consecutive points (:func:`_steer`).
    2. ceil(N / p) intervals steer the component along v: a_i = -u for a direction u orthogonal to v along which
       the (now final) orthogonal components are distinct, w_i along v, p points per interval.

    That is 2 ceil(N / p) intervals, L = 2 ceil(N / p) - 1. When d > N a direction v with v . x_n = v . y_n for
    every n exists (N linear equations in d > N unknowns), step 2 is not needed and ceil(N / p) intervals suffice;
    the model still has the theorem's 2 ceil(N / p) - 2 switches, the intervals after the construction's being
    zero fields (w = 0). Coefficients grow as the separation of the points along v and u shrinks; inputs must be
    distinct (the flow is injective) and so must targets.

    Args:
        x, y: (N, d) inputs and targets (tensors or arrays; computed in float64), d >= 2.
        width: p, neurons per interval.
        horizon: T.
        steps, rule, memory: the model's discretisation (any: the fields are integrated exactly).
        seed: seed of the random candidate directions (the result is deterministic for a seed).
    """
    x, y = _as_points("x", x), _as_points("y", y)
    positive_int("width", width)
    horizon = finite_float("horizon", horizon, 0.0, low_open=True)
    if x.shape != y.shape:
        raise ZooError(f"x and y must have the same shape (N, d), got {tuple(x.shape)} and {tuple(y.shape)}")
    n_points, dim = x.shape
    if dim < 2:
        raise ZooError(
            "interpolation needs d >= 2: on the line a flow keeps the order of the points, so most targets are out "
            "of reach; embed the points in R^2 (append a zero coordinate)"
        )
    _refuse_duplicates("inputs", x, "a flow is injective, so distinct targets cannot be reached; remove duplicates")
    _refuse_duplicates("targets", y, "a flow is injective, so two points cannot be sent to one; remove duplicates")
    switches = interpolation_switches(n_points, width, dim)
    generator = torch.Generator().manual_seed(seed)
    scale = float(torch.cat([x, y]).abs().max()) or 1.0
    eye = torch.eye(dim, dtype=torch.float64)

    if dim > n_points:  # v . x_n = v . y_n for every n: v in the null space of the displacements
        _, singular, vh = torch.linalg.svd(y - x, full_matrices=True)
        rank = int((singular > 1e-12 * scale).sum())
        candidates = _candidates(vh[rank:].T, 64, generator)
        gaps = _min_gaps(x, candidates)
        best = int(torch.argmax(gaps))
        if not gaps[best] > 1e-9 * scale:
            raise ZooError(
                "the points are not in general position for the d > N construction: no direction keeping every "
                "displacement's coordinate separates the inputs; perturb the data slightly"
            )
        pivot = candidates[:, best]
        moves = _orthonormal_complement(pivot)
        points = x.clone()
        intervals = _steer(points, y, pivot, moves, width, horizon / (switches + 1))
    else:
        best_score, best_pair = -1.0, None
        pivots = _candidates(eye, 32, generator)
        gaps_v = _min_gaps(x, pivots)
        for i, v in enumerate(pivots.T):
            complement = _orthonormal_complement(v)
            directions = complement @ _candidates(torch.eye(dim - 1, dtype=torch.float64), 32, generator)
            gap_u = _min_gaps(y, directions)
            k = int(torch.argmax(gap_u))
            score = min(float(gaps_v[i]), float(gap_u[k]))
            if score > best_score:
                best_score, best_pair = score, (v, complement, directions[:, k])
        if not best_score > 1e-9 * scale:
            raise ZooError(
                "the points are too close to a degenerate configuration (no direction separates them): perturb the "
                "data slightly"
            )
        pivot, complement, second = best_pair
        points = x.clone()
        length = horizon / (switches + 1)
        intervals = _steer(points, y, pivot, complement, width, length)
        intervals += _steer(points, y, second, pivot[:, None], width, length)

    model = NeuralODE(
        dim=dim,
        width=width,
        switches=switches,
        horizon=horizon,
        steps=steps,
        rule=rule,
        memory=memory,
        activation="relu",
        in_features=dim,
        embed=False,
        num_classes=0,
    ).double()
    with torch.no_grad():
        for j, field in enumerate(model.fields):
            if j < len(intervals):
                a, b, w = intervals[j]
            else:  # the theorem's count exceeds the construction's (d > N): zero fields
                a, b, w = -eye[:1].expand(width, dim), torch.zeros(width), torch.zeros(dim, width)
            field.a.copy_(a)
            field.b.copy_(b)
            field.w.copy_(w)
    return model.eval()


def closed_form_flow(model: NeuralODE, z: torch.Tensor) -> torch.Tensor:
    """Phi_T(z) in closed form for a model whose every interval's field is constant along its trajectories: when
    every w_i is orthogonal to every a_k of the interval (a_k . x is then constant, and so is F), the state moves
    by (tau_{j+1} - tau_j) F_j(z) over interval j. Refuses other models (their flow has no closed form)."""
    lengths = model.interval_lengths()
    for j, field in enumerate(model.fields):
        overlap = (field.a @ field.w).detach().abs().max()
        size = (field.a.norm(dim=1).max() * field.w.norm(dim=0).max()).detach()
        if overlap > 1e-10 * max(float(size), 1.0):
            raise ZooError(
                f"interval {j}: some w_i is not orthogonal to some a_k (max |a_k . w_i| = {float(overlap):.3g}), so "
                "the field is not constant along its flow and there is no closed form; integrate with the model"
            )
        z = z + lengths[j] * field.field(z)
    return z


# ------------------------------------------------------------------------------------------------
# Builders


def _build(
    arch: str, defaults: dict[str, Any], kwargs: dict[str, Any], pretrained: bool, weights: str | None
) -> NeuralODE:
    return build_model(NeuralODE, arch, defaults, kwargs, pretrained=pretrained, weights=weights, base_cfg=_node_cfg())


@register_model
def neural_ode_classifier(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> NeuralODE:
    """A neural ODE classifier with the class defaults (32x32x3 images flattened and embedded in R^64, width 64,
    3 switches, T = 1, 2 Euler steps per interval, ReLU); every :class:`NeuralODE` argument may be given as a
    keyword. ``pretrained``: no weights are published for this family (True is one error saying so); ``weights``:
    a file or ``save_pretrained`` folder to load."""
    return _build("neural_ode_classifier", {}, kwargs, pretrained, weights)


@register_model
def neural_ode_digits(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> NeuralODE:
    """The digits recipe's model (``recipes/digits_neural_ode.yaml``): scikit-learn's 8x8 grey digits flattened and
    embedded in R^32, width 64, 3 switches, T = 1, 2 Heun steps per interval, ReLU, 10 classes (any
    :class:`NeuralODE` keyword overrides these). ``pretrained``: no weights are published (True is one error);
    ``weights``: a file or ``save_pretrained`` folder to load."""
    defaults = {
        "img_size": 8,
        "in_chans": 1,
        "num_classes": 10,
        "dim": 32,
        "width": 64,
        "switches": 3,
        "steps": 2,
        "rule": "heun",
    }
    return _build("neural_ode_digits", defaults, kwargs, pretrained, weights)
