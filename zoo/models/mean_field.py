"""Mean-field ResNets trained by conditional optimal transport.

Each residual function is a single hidden layer of width M written as an average over its neurons
theta_i = (u_i, w_i, b_i) in R^d x R^d x R:

    F_theta(x) = (1/M) sum_{i=1..M} u_i sigma(w_i . x + b_i)

and S of them are stacked with the step 1/S (the explicit Euler scheme of an ODE on the depth interval [0, 1]):

    x_{s+1} = x_s + (1/S) F_{theta_s}(x_s),        s = 0 .. S-1.

As M and S grow, the network becomes a neural ODE whose parameter is a probability measure on (depth, neuron) with
uniform marginal in depth; each neuron is a particle of mass 1/(M S). Training on the risk

    L = (1/2N) sum_{n=1..N} |f(x_n) - y_n|^2

by the gradient flow of the conditional optimal-transport metric (the Wasserstein-2 distance between the neuron
distributions of each depth, integrated over depth) is, for the particles, gradient descent on every neuron with the
step multiplied by M * S: the gradient of one particle is O(1/(M S)), and the scaled step moves it by O(1), so the
training curve does not depend on M and S in the limit. :class:`MeanFieldResNet` applies that scaling for the user:
its optimiser receives the neurons in parameter groups whose learning rate is multiplied by M * S
(``mean_field_scaling=True``, the default; the groups carry the factor as ``"mean_field_scale"``) and whose weight
decay, if any, is divided by it (the penalty (wd/2) (1/(M S)) sum_i |theta_i|^2 on the neurons' measure: a decay
of lr * wd per step, as for the other parameters, at every M and S).

Initialisation as published: u = 0 (so the network starts as the identity), b uniform on [0, pi], and w either
Gaussian, density proportional to exp(-rho |w|^2) (standard deviation 1/sqrt(2 rho) per coordinate), or heavy
tailed, density proportional to (1 + |w|^2)^-(d/2 + beta) (:func:`sample_heavy_tailed`); sigma = cos by default.

Convergence diagnostic (:meth:`MeanFieldResNet.kernel_conditioning`): with the kernel of the neurons of layer s
evaluated on the N training points as they arrive at layer s,

    K_s(x_i, x_j) = (1/M) sum_m sigma(w_m . x_i(s) + b_m) sigma(w_m . x_j(s) + b_m),

lambda_0 = int_0^1 lambda_min(K_s) ds (here the average over the S layers). When lambda_0 > 0 and the initial risk
is small enough, the risk decays exponentially along training, L(t) <= exp(-C (lambda_0 / N) t) L(0), with t the
gradient-flow time (number of steps times the learning rate under the mean-field scaling). At u = 0 the risk's
initial decay rate is at least 2 lambda_0 / N: the gradient of the u's alone gives
-dL/dt >= (1/S) sum_s p^T K_s p >= lambda_0 |p|^2 = (2 lambda_0 / N) L, p_n = (f(x_n) - y_n) / N.

timm's model protocol where it applies to vector inputs: ``num_classes`` (0: ``forward`` returns the final state
x_S, the paper's model; > 0: a linear readout ``head``), ``num_features`` = ``head_hidden_size`` = d,
``forward_features`` (x_S), ``forward_head(x, pre_logits)``, ``reset_classifier``, ``get_classifier`` and
``pretrained_cfg`` without timm's image keys (an input vector is not an image). ``global_pool``,
``forward_intermediates`` and ``features_only`` do not apply (no spatial map; :meth:`MeanFieldResNet.trajectory`
gives the states x_0 .. x_S).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights
from zoo.models.arguments import check_model_kwargs
from zoo.nn import ResidualStack
from zoo.pretrained import IMAGE_KEYS, PretrainedCfg, build_model
from zoo.registry import register_model
from zoo.tasks.classification import record_num_classes
from zoo.tasks.optim import (
    LRSchedulerCallable,
    OptimizerCallable,
    build_optimization,
    check_factory,
    parameter_groups,
)
from zoo.validation import boolean, choice, finite_float, non_negative_int, optional, positive_int

__all__ = [
    "ACTIVATIONS",
    "INITS",
    "TASKS",
    "MeanFieldLayer",
    "MeanFieldResNet",
    "mean_field_resnet",
    "mean_field_resnet_teacher",
    "sample_gaussian",
    "sample_heavy_tailed",
]

ACTIVATIONS: Mapping[str, Any] = {"cos": torch.cos, "relu": F.relu, "tanh": torch.tanh}
INITS = ("gaussian", "heavy_tailed")
TASKS = ("regression", "classification")
RULES = ("euler", "heun")  # the momentum rule is not a discretisation of this ODE with step 1/S


def sample_gaussian(num: int, dim: int, rho: float = 1.0, **factory: Any) -> torch.Tensor:
    """``num`` vectors of R^dim with density proportional to exp(-rho |w|^2): N(0, I / (2 rho)).

    Args:
        num: number of vectors.
        dim: their dimension d.
        rho: the density's rate (> 0); the standard deviation per coordinate is 1 / sqrt(2 rho).
        **factory: ``dtype`` / ``device`` of the result. Draws from torch's global generator (as ``nn.init``).
    """
    positive_int("num", num)
    positive_int("dim", dim)
    finite_float("rho", rho, 0.0, low_open=True)
    return torch.randn(num, dim, **factory) / math.sqrt(2.0 * rho)


def sample_heavy_tailed(num: int, dim: int, beta: float = 1.0, **factory: Any) -> torch.Tensor:
    """``num`` vectors of R^dim with density proportional to (1 + |w|^2)^-(dim/2 + beta), sampled exactly.

    The law is radial: a uniform direction times a radius r whose square has density proportional to
    t^(d/2 - 1) (1 + t)^-(d/2 + beta) (change of variables t = r^2 in r^(d-1) (1 + r^2)^-(d/2 + beta)), the
    beta-prime law with parameters (d/2, beta): t = G_1 / G_2 with independent G_1 ~ Gamma(d/2), G_2 ~ Gamma(beta).
    The density is integrable for every beta > 0; |w| has finite moments of order < 2 beta only (coordinates
    beyond the range of ``dtype``, possible in float32 for beta much below 1, are clamped to its largest value).

    Args:
        num: number of vectors.
        dim: their dimension d.
        beta: the tail exponent (> 0).
        **factory: ``dtype`` / ``device`` of the result. Draws from torch's global generator (as ``nn.init``).
    """
    positive_int("num", num)
    positive_int("dim", dim)
    finite_float("beta", beta, 0.0, low_open=True)
    dtype = factory.get("dtype") or torch.get_default_dtype()
    device = factory.get("device")
    # in float64 whatever the target dtype: G_2 can be tiny for small beta
    one = torch.ones((), dtype=torch.float64, device=device)
    # the parameters are checked above: no validation, whose host read fails on the meta device (a model built
    # there to receive weights) and syncs on a GPU
    g1 = torch.distributions.Gamma(one * (dim / 2.0), one, validate_args=False).sample((num,))
    g2 = torch.distributions.Gamma(one * float(beta), one, validate_args=False).sample((num,))
    radius = torch.sqrt(g1 / g2)
    direction = torch.randn(num, dim, dtype=torch.float64, device=device)
    direction = direction / direction.norm(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    # a radius beyond the target dtype's range (possible for beta << 1 in float32) is clamped to its largest value
    limit = torch.finfo(dtype).max
    return (direction * radius[:, None]).clamp(-limit, limit).to(dtype)


class MeanFieldLayer(nn.Module):
    """One residual function F(x) = (1/M) sum_i u_i sigma(w_i . x + b_i) of width M on R^d.

    Parameters ``u`` (M, d), ``w`` (M, d), ``b`` (M,): row i is neuron i.

    Args:
        dim: the state dimension d.
        width: the number of neurons M.
        activation: sigma, a name in :data:`ACTIVATIONS` (``"cos"``, ``"relu"``, ``"tanh"``).
        init: the law of w, ``"gaussian"`` (density ~ exp(-rho |w|^2)) or ``"heavy_tailed"``
            (density ~ (1 + |w|^2)^-(d/2 + beta)); u = 0 and b ~ U([0, pi]) in both.
        rho: rate of the Gaussian law.
        beta: tail exponent of the heavy-tailed law.
    """

    def __init__(
        self,
        dim: int,
        width: int,
        activation: str = "cos",
        init: str = "gaussian",
        rho: float = 1.0,
        beta: float = 1.0,
    ) -> None:
        super().__init__()
        self.dim = positive_int("dim", dim)
        self.width = positive_int("width", width)
        self.activation = choice("activation", activation, ACTIVATIONS)
        self.init = choice("init", init, INITS)
        self.rho = finite_float("rho", rho, 0.0, low_open=True)
        self.beta = finite_float("beta", beta, 0.0, low_open=True)
        self.u = nn.Parameter(torch.empty(width, dim))
        self.w = nn.Parameter(torch.empty(width, dim))
        self.b = nn.Parameter(torch.empty(width))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The published initialisation: u = 0, w from the layer's law, b ~ U([0, pi])."""
        with torch.no_grad():
            self.u.zero_()
            sample = sample_gaussian if self.init == "gaussian" else sample_heavy_tailed
            scale = {"rho": self.rho} if self.init == "gaussian" else {"beta": self.beta}
            self.w.copy_(sample(self.width, self.dim, **scale, dtype=self.w.dtype, device=self.w.device))
            self.b.uniform_(0.0, math.pi)

    def extra_repr(self) -> str:
        law = f"rho={self.rho:g}" if self.init == "gaussian" else f"beta={self.beta:g}"
        return f"dim={self.dim}, width={self.width}, activation={self.activation!r}, init={self.init!r}, {law}"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """sigma(w_i . x + b_i) for every neuron: (..., M)."""
        return ACTIVATIONS[self.activation](F.linear(x, self.w, self.b))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """F(x) = (1/M) sum_i u_i sigma(w_i . x + b_i), shaped like x (..., d)."""
        return self.features(x) @ self.u / self.width


class MeanFieldResNet(HubMixin, pl.LightningModule):
    """Mean-field ResNet x_{s+1} = x_s + (1/S) F_{theta_s}(x_s) of S layers of width M, with the mean-field step
    scaling applied to its optimiser (see the module docstring).

    ``forward(x)``: x (B, in_features) -> (B, d) (the final state x_S, ``num_classes=0``) or (B, num_classes).
    The task is regression on the risk (1/2N) sum |f(x_n) - y_n|^2 (targets shaped like the output) or
    classification by cross-entropy (``task="classification"``, logits from the linear readout).

    Args:
        dim: the state dimension d (the ODE's space).
        width: neurons per layer M.
        depth: layers S (the step is 1/S).
        activation: sigma: ``"cos"`` (published), ``"relu"`` or ``"tanh"``.
        init: the law of the w's: ``"gaussian"`` (density ~ exp(-rho |w|^2)) or ``"heavy_tailed"``
            (density ~ (1 + |w|^2)^-(d/2 + beta)); u = 0 and b ~ U([0, pi]) in both.
        rho: rate of the Gaussian law (> 0; the standard deviation of w per coordinate is 1/sqrt(2 rho)).
        beta: tail exponent of the heavy-tailed law (> 0).
        in_features: input size; None: d. When it differs from d, a linear input map ``stem`` (trained at the
            optimiser's own learning rate) takes inputs to R^d.
        num_classes: outputs of a linear readout ``head`` (trained at the optimiser's own learning rate); 0: no
            readout, the output is x_S (the paper's model; targets then live in R^d).
        task: ``"regression"`` (the risk above) or ``"classification"`` (cross-entropy, needs num_classes >= 2).
        rule: the residual-stack rule, ``"euler"`` (the scheme above) or ``"heun"`` (second order).
        memory: the residual-stack memory mode, ``"full"`` or ``"adjoint"`` (activations rebuilt in backward).
        mean_field_scaling: multiply the neurons' learning rate by M * S (the mean-field parametrisation, whose
            training curves do not depend on M and S), and divide their weight decay by M * S (a decay of lr * wd
            per step at every size); False: the optimiser's rate and decay for every parameter. Meant for
            gradient descent (SGD, the default): adaptive optimisers (Adam) normalise the gradient's scale
            themselves, so with them the factor only enlarges the step.
        weights: a file (state dict, ``.ckpt``, ``.safetensors``, ``save_pretrained`` folder) or
            ``"hf-hub:org/name"``.
        optimizer: builds the optimiser from the parameter groups (LightningCLI's ``OptimizerCallable``); None:
            :attr:`default_optimizer`, plain gradient descent (SGD, lr 0.1).
        lr_scheduler: builds the schedule from the optimiser; None (default): a constant step, the time
            discretisation of the gradient flow.
    """

    same_function_args = frozenset({"num_classes", "memory"})
    init_only_args = frozenset({"init", "rho", "beta"})

    default_optimizer: OptimizerCallable = functools.partial(torch.optim.SGD, lr=0.1)

    def __init__(
        self,
        dim: int = 2,
        width: int = 256,
        depth: int = 16,
        activation: str = "cos",
        init: str = "gaussian",
        rho: float = 1.0,
        beta: float = 1.0,
        in_features: int | None = None,
        num_classes: int = 0,
        task: str = "regression",
        rule: str = "euler",
        memory: str = "full",
        mean_field_scaling: bool = True,
        weights: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_kwargs(type(self), kwargs)
        positive_int("dim", dim)
        positive_int("width", width)
        positive_int("depth", depth)
        choice("activation", activation, ACTIVATIONS)
        choice("init", init, INITS)
        finite_float("rho", rho, 0.0, low_open=True)
        finite_float("beta", beta, 0.0, low_open=True)
        optional(positive_int, "in_features", in_features)
        non_negative_int(
            "num_classes", num_classes, hint="give the number of outputs of a linear readout, or 0 to output x_S"
        )
        choice("task", task, TASKS)
        if task == "classification" and num_classes < 2:
            raise ZooError(
                f"task='classification' needs a readout of num_classes >= 2 outputs, got num_classes={num_classes}; "
                "give num_classes, or use task='regression'"
            )
        choice("rule", rule, RULES, hint="the mean-field ResNet is the Euler scheme (or Heun's) with step 1/S")
        choice(
            "memory",
            memory,
            ("full", "adjoint"),
            hint="'full' keeps the activations, 'adjoint' rebuilds them in backward ('reversible' needs the momentum "
            "rule, which this model does not use)",
        )
        boolean("mean_field_scaling", mean_field_scaling)
        super().__init__()
        self.optimizer_factory = check_factory("optimizer", optimizer)
        self.lr_scheduler_factory = check_factory("lr_scheduler", lr_scheduler)
        self.save_hyperparameters(ignore=["weights", "optimizer", "lr_scheduler"])
        self.dim = self.num_features = self.head_hidden_size = dim
        self.width, self.depth = width, depth
        self.in_features = dim if in_features is None else in_features
        self.num_classes = num_classes
        self.task = task
        self.mean_field_scaling = mean_field_scaling
        self.stem = nn.Linear(self.in_features, dim) if self.in_features != dim else nn.Identity()
        layers = [MeanFieldLayer(dim, width, activation, init, rho, beta) for _ in range(depth)]
        self.stack = ResidualStack(layers, rule=rule, scale="depth", memory=memory)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self._make_metrics()
        self.pretrained_cfg = self.pretrained_cfg_as_built(PretrainedCfg(input_size=None, classifier="head").to_dict())
        self.default_cfg = self.pretrained_cfg
        if weights is not None:
            load_weights(self, weights)

    # ---------------------------------------------------------------- protocol
    def pretrained_cfg_as_built(self, cfg: Mapping[str, Any]) -> dict[str, Any]:
        """``cfg`` for this model as built: timm's image keys dropped, the readout's ``num_classes`` and the
        input size ``in_features``."""
        out = {k: v for k, v in cfg.items() if k not in IMAGE_KEYS}
        out["num_classes"] = self.num_classes
        out["in_features"] = self.in_features
        out.setdefault("classifier", "head")
        return out

    def _make_metrics(self) -> None:
        for name in ("train_acc", "val_acc", "test_acc"):
            if hasattr(self, name):
                delattr(self, name)
        if self.task == "classification" and self.num_classes >= 2:
            for name in ("train_acc", "val_acc", "test_acc"):
                setattr(self, name, MulticlassAccuracy(num_classes=self.num_classes, average="micro"))

    def get_classifier(self) -> nn.Module:
        """The linear readout (``head``; ``nn.Identity`` without one)."""
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new readout of ``num_classes`` outputs (0: none, ``forward`` returns x_S); ``hparams`` follow.
        ``global_pool`` does not apply (None only)."""
        non_negative_int("num_classes", num_classes)
        if global_pool is not None:
            raise ZooError(
                f"MeanFieldResNet has no global_pool to change (got {global_pool!r}): its features are one vector "
                "per input; call reset_classifier(num_classes) without global_pool"
            )
        if self.task == "classification" and num_classes < 2:
            raise ZooError(
                f"a classification MeanFieldResNet needs num_classes >= 2, got {num_classes}; build it with "
                "task='regression' for a model without a readout"
            )
        ref = self.stack.blocks[0].u
        self.head = (
            nn.Linear(self.dim, num_classes, device=ref.device, dtype=ref.dtype) if num_classes > 0 else nn.Identity()
        )
        self.head.train(self.training)
        self.num_classes = int(num_classes)
        self.hparams["num_classes"] = int(num_classes)
        self._make_metrics()
        record_num_classes(self, num_classes)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose keys do not fit with one clear error (before Lightning loads it), then
        :class:`zoo.hub.HubMixin`'s hook: the ``pretrained_cfg`` the checkpoint records becomes the model's.

        Args:
            checkpoint: the checkpoint Lightning is reading.
        """
        from zoo.hub import check_checkpoint

        check_checkpoint(self, checkpoint)
        super().on_load_checkpoint(checkpoint)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm's activation checkpointing: the stack keeps only each step's input and recomputes it in backward
        (same values and gradients; ``memory="adjoint"`` stores no per-step activations anyway)."""
        self.stack.grad_checkpointing = boolean("enable", enable)

    @property
    def layers(self) -> list[MeanFieldLayer]:
        """The S residual functions, in depth order."""
        return list(self.stack.blocks)

    @property
    def mean_field_scale(self) -> int:
        """M * S: the factor of the neurons' learning rate under the mean-field scaling (each neuron carries the
        mass 1/(M S))."""
        return self.width * self.depth

    # ---------------------------------------------------------------- forward
    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ZooError(
                f"MeanFieldResNet expects inputs of shape (B, {self.in_features}) (in_features={self.in_features}), "
                f"got {shape}; flatten each sample to a vector, or build the model with in_features="
                f"{x.shape[-1] if isinstance(x, torch.Tensor) and x.dim() >= 1 else 'F'}"
            )
        if not x.is_floating_point():
            raise ZooError(f"MeanFieldResNet expects a floating-point input, got {x.dtype}")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The final state x_S (B, d) of the input (B, in_features)."""
        self._check_input(x)
        return self.stack(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """The readout of x_S (``pre_logits``: x_S itself)."""
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, in_features) -> x_S (B, d) without a readout, else the readout (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def trajectory(self, x: torch.Tensor) -> torch.Tensor:
        """The states x_0 .. x_S (S + 1, B, d) by the stack's rule (x_0 = the input map of x), with ordinary
        autograd under the current grad mode. x_s is the input of layer s."""
        self._check_input(x)
        state = (self.stem(x),)
        states = [state[0]]
        h = self.stack.step

        def f(m: int, z: torch.Tensor, k: int) -> torch.Tensor:
            return self.stack.residual(m, z, (), {})

        for n in range(self.depth):
            state = self.stack.forward_rule.step(f, n, state, h)
            states.append(state[0])
        return torch.stack(states)

    # ---------------------------------------------------------------- the convergence diagnostic
    def kernel_matrices(self, x: torch.Tensor) -> torch.Tensor:
        """K_s(x_i, x_j) = (1/M) sum_m sigma(w_m . x_i(s) + b_m) sigma(w_m . x_j(s) + b_m) for every layer s,
        (S, N, N), with x_i(s) the state of point i at the input of layer s. Computed without gradients."""
        with torch.no_grad():
            states = self.trajectory(x)
            feats = torch.stack([layer.features(states[s]) for s, layer in enumerate(self.layers)])  # (S, N, M)
            return feats @ feats.transpose(1, 2) / self.width

    def kernel_conditioning(self, x: torch.Tensor) -> torch.Tensor:
        """lambda_0 = int_0^1 lambda_min(K_s) ds over the N points ``x`` (N, in_features), as the Riemann sum
        (1/S) sum_s lambda_min(K_s) over the layers (a 0-d float64 tensor).

        lambda_0 > 0 gives the local Polyak-Lojasiewicz inequality behind the exponential decay of the risk at a
        rate proportional to lambda_0 / N. K_s has rank at most M, so lambda_0 = 0 when N > M; its eigenvalues are
        computed in float64.
        """
        self._check_input(x)
        if x.shape[0] == 0:
            raise ZooError(
                "kernel_conditioning needs at least one point: got an empty batch (0, "
                f"{self.in_features}); give the N training inputs (N, {self.in_features})"
            )
        kernels = self.kernel_matrices(x).to(torch.float64)
        return torch.linalg.eigvalsh(kernels)[:, 0].mean()

    # ---------------------------------------------------------------- task
    def risk(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """(1/2N) sum_n |output_n - target_n|^2 over the batch, in float32 at least (safe under autocast)."""
        if output.shape != target.shape:
            raise ZooError(
                f"regression targets must have the output's shape {tuple(output.shape)}, got {tuple(target.shape)}; "
                f"the output is {'x_S' if self.num_classes == 0 else 'the readout'} of width {output.shape[-1]}"
            )
        diff = output.float() - target.float() if output.dtype != torch.float64 else output - target.to(output)
        return 0.5 * diff.pow(2).flatten(1).sum(1).mean()

    def loss(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The task's loss: :meth:`risk` (regression) or cross-entropy (classification)."""
        if self.task == "classification":
            return F.cross_entropy(output.float(), target)
        return self.risk(output, target)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = self.loss(out, y)
        self.log("train_loss", loss, prog_bar=True)
        if self.task == "classification":
            self.train_acc(out.detach(), y)
            self.log("train_acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _eval_step(self, batch: Any, stage: str) -> None:
        x, y = batch
        out = self(x)
        self.log(f"{stage}_loss", self.loss(out, y), prog_bar=True, sync_dist=True)
        if self.task == "classification":
            acc = self.val_acc if stage == "val" else self.test_acc
            acc(out, y)
            self.log(f"{stage}_acc", acc, prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        out = self(x)
        return out.softmax(dim=-1) if self.task == "classification" else out

    # ---------------------------------------------------------------- optimisation
    def parameter_groups(self) -> list[dict[str, Any]]:
        """:func:`zoo.tasks.optim.parameter_groups` (weights with the optimiser's weight decay; biases and 1-d
        parameters without), each split into the neurons of the residual layers and the rest (input map,
        readout). With ``mean_field_scaling`` the neuron groups carry ``"mean_field_scale": M * S``, the factor
        :meth:`configure_optimizers` multiplies their learning rate by (and divides their weight decay by)."""
        neurons = {id(p) for p in self.stack.parameters()}
        groups: list[dict[str, Any]] = []
        for group in parameter_groups(self):
            options = {k: v for k, v in group.items() if k != "params"}
            inner = [p for p in group["params"] if id(p) in neurons]
            outer = [p for p in group["params"] if id(p) not in neurons]
            if inner:
                scale = {"mean_field_scale": self.mean_field_scale} if self.mean_field_scaling else {}
                groups.append({"params": inner, **options, **scale})
            if outer:
                groups.append({"params": outer, **options})
        return groups

    def _scaled_optimizer(self, factory: OptimizerCallable) -> OptimizerCallable:
        """``factory`` over :meth:`parameter_groups`, with each neuron group's learning rate multiplied by its
        ``mean_field_scale`` M * S and its weight decay divided by it (before any schedule reads the rates).

        The weight decay wd of the optimiser is the gradient of (wd / 2) |theta_i|^2 per parameter; for the
        neurons it becomes the mean-field penalty (wd / 2) (1/(M S)) sum_i |theta_i|^2, the second moment of the
        neurons' measure, whose gradient is O(1/(M S)) like the risk's: the decay per step is lr * wd, as for the
        other parameters, at every M and S (unscaled, it was lr * M * S * wd, and diverged once above 2)."""

        def build(_groups: Any) -> torch.optim.Optimizer:
            opt = factory(self.parameter_groups())
            for group in getattr(opt, "param_groups", ()):
                if "mean_field_scale" in group:
                    group["lr"] = group["lr"] * group["mean_field_scale"]
                    if group.get("weight_decay"):
                        group["weight_decay"] = group["weight_decay"] / group["mean_field_scale"]
            return opt

        return build

    def configure_optimizers(self, total_steps: int | None = None, steps_per_epoch: float | None = None) -> Any:
        """The optimiser over :meth:`parameter_groups` (the neurons' learning rate times M * S under the
        mean-field scaling) and its schedule, in Lightning's format; without a Trainer give ``total_steps`` for a
        schedule that needs the run length."""
        trainer = self._trainer if total_steps is None else None
        return build_optimization(
            self,
            self._scaled_optimizer(self.optimizer_factory or type(self).default_optimizer),
            self.lr_scheduler_factory,
            trainer=trainer,
            total_steps=total_steps,
            steps_per_epoch=steps_per_epoch,
        )


# ------------------------------------------------------------------------------------------------
# Builders

_BASE_CFG = PretrainedCfg(
    input_size=None,
    num_classes=0,
    classifier="head",
    description="mean-field ResNet (single-hidden-layer residual functions, step 1/S) trained with the mean-field "
    "step scaling",
)


@register_model
def mean_field_resnet(pretrained: bool = False, *, weights: str | None = None, **kwargs: Any) -> MeanFieldResNet:
    """A mean-field ResNet on R^d (defaults: d = 2, M = 256 neurons per layer, S = 16 layers, cos, Gaussian w with
    rho = 1, u = 0, b ~ U([0, pi])).

    Args:
        pretrained: no published weights exist, so True is one error naming the alternatives.
        weights: a file, a ``save_pretrained`` folder or ``"hf-hub:org/name"`` to load.
        **kwargs: the arguments of :class:`MeanFieldResNet` (``dim``, ``width``, ``depth`` ...).
    """
    return build_model(
        MeanFieldResNet, "mean_field_resnet", {}, kwargs, pretrained=pretrained, weights=weights, base_cfg=_BASE_CFG
    )


@register_model
def mean_field_resnet_teacher(
    pretrained: bool = False, *, weights: str | None = None, **kwargs: Any
) -> MeanFieldResNet:
    """The mean-field ResNet of the teacher recipe (``teacher_mean_field_resnet``): d = 4, M = 128, S = 8, cos,
    Gaussian w (rho = 1), regression of x_S on the targets of :class:`zoo.data.teacher.TeacherDataModule`'s teacher.

    Args:
        pretrained: no published weights exist, so True is one error naming the alternatives.
        weights: a file, a ``save_pretrained`` folder or ``"hf-hub:org/name"`` to load.
        **kwargs: the arguments of :class:`MeanFieldResNet`, over the defaults above.
    """
    defaults = {"dim": 4, "width": 128, "depth": 8}
    return build_model(
        MeanFieldResNet,
        "mean_field_resnet_teacher",
        defaults,
        kwargs,
        pretrained=pretrained,
        weights=weights,
        base_cfg=_BASE_CFG,
    )
