"""Two-layer ReLU networks in the mean-field scaling, trained by proximal-point steps with the Frobenius or the
Wasserstein-2 distance between their neurons (:class:`zoo.optim.ProximalPoint`).

The network of width M on inputs x in R^d, augmented with a constant 1 for the bias (x~ = (x, 1) in R^{d+1}):

    f(x) = (1/M) sum_{i=1..M} u_i relu(<w_i, x~>)          w_i in R^{d+1} (its last entry is the bias)

with output weights u_i learned, or fixed signs u_i in {-1, +1} (``signs="fixed"``: the first ceil(M/2) neurons
+1, the others -1). It is the integral of relu(<w, x~>) u against the empirical measure of its neurons
(1/M) sum_i delta_{(w_i, u_i)}. The regression objective on n points (x_j, y_j) is the mean squared error

    F(W) = (1/n) sum_j (f(x_j) - y_j)^2,    dF/dw_i = (2 u_i / (n M)) sum_j e_j s_ij x~_j

(e_j = f(x_j) - y_j, s_ij = 1[<w_i, x~_j> > 0], relu'(0) = 0): a neuron that activates no data point gets no
gradient. The model is a LightningModule with that objective; its default optimiser is the Wasserstein proximal
point method, whose particles are the neurons (:meth:`TwoLayerReLU.particle_groups`).
"""

from __future__ import annotations

import functools
import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.hub import HubMixin, load_weights
from zoo.models.arguments import check_model_kwargs
from zoo.optim.proximal import ProximalPoint
from zoo.tasks.optim import (
    LRSchedulerCallable,
    OptimizerCallable,
    build_optimization,
    check_factory,
)
from zoo.validation import boolean, choice, finite_float, positive_int

__all__ = ["SIGNS", "TwoLayerReLU"]

SIGNS = ("fixed", "learned")


class TwoLayerReLU(HubMixin, pl.LightningModule):
    """f(x) = (1/M) sum_i u_i relu(<w_i, (x, 1)>), a regression model trained on the mean squared error (see the
    module docstring).

    ``forward(x)``: x (B, in_features) -> f(x) (B,). Parameters: ``weight`` (M, in_features + 1) = the w_i (last
    column: the bias, when ``bias``), and ``output`` (M,) = the u_i when ``signs="learned"``; with fixed signs the
    u_i are the buffer ``signs`` (M,) of +-1.

    Args:
        in_features: input dimension d.
        width: number of neurons M.
        signs: "fixed" (u_i = +1 for the first ceil(M/2) neurons, -1 for the others, not trained) or "learned".
        bias: augment the inputs with a constant 1 (w_i gets a last, bias, entry).
        init_scale: initial size of the neurons: w_i ~ N(0, init_scale^2 I / D), D = d + 1 entries with a bias
            (d without), so |w_i| is about init_scale, and learned u_i ~ N(0, init_scale^2). Small values start
            with an alignment phase.
        symmetric_init: with fixed signs and an even width, neuron i + M/2 starts as a copy of neuron i, so that
            f = 0 at initialisation (the +1 and -1 halves cancel).
        weights: a file (state dict, ``.ckpt``, ``.safetensors``, ``save_pretrained`` folder) to load.
        optimizer: builds the optimiser from :meth:`particle_groups` (LightningCLI's ``OptimizerCallable``);
            None: :attr:`default_optimizer`, the Wasserstein proximal-point method.
        lr_scheduler: builds a schedule from the optimiser (for optimisers with a learning rate, e.g. SGD); None:
            constant. :class:`zoo.optim.ProximalPoint` has a fixed step gamma and takes none.
    """

    init_only_args = frozenset({"init_scale"})

    # the Wasserstein proximal-point method (gamma: step; the inner problem solved by 20 gradient steps)
    default_optimizer: OptimizerCallable = functools.partial(
        ProximalPoint, gamma=0.05, inner_steps=20, distance="wasserstein"
    )

    def __init__(
        self,
        in_features: int = 2,
        width: int = 100,
        signs: str = "fixed",
        bias: bool = True,
        init_scale: float = 1.0,
        symmetric_init: bool = False,
        weights: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        **kwargs: Any,
    ) -> None:
        check_model_kwargs(type(self), kwargs)
        positive_int("in_features", in_features)
        positive_int("width", width)
        choice("signs", signs, SIGNS)
        boolean("bias", bias)
        finite_float("init_scale", init_scale, 0.0, low_open=True, hint="give the initial neuron size > 0")
        boolean("symmetric_init", symmetric_init)
        if symmetric_init and (signs != "fixed" or width % 2):
            raise ZooError(
                f"symmetric_init pairs each +1 neuron with a -1 copy: it needs signs='fixed' and an even width, got "
                f"signs={signs!r}, width={width}"
            )
        super().__init__()
        self.optimizer_factory = check_factory("optimizer", optimizer)
        self.lr_scheduler_factory = check_factory("lr_scheduler", lr_scheduler)
        self.save_hyperparameters(ignore=["weights", "optimizer", "lr_scheduler"])
        self.in_features = in_features
        self.width = width
        self.has_bias = bias
        self.init_scale = float(init_scale)
        self.symmetric_init = symmetric_init
        self.weight = nn.Parameter(torch.empty(width, in_features + int(bias)))
        if signs == "learned":
            self.output = nn.Parameter(torch.empty(width))
        else:
            self.register_parameter("output", None)
            plus = math.ceil(width / 2)
            self.register_buffer("signs", torch.cat([torch.ones(plus), -torch.ones(width - plus)]))
        self.reset_parameters()
        if weights is not None:
            load_weights(self, weights)

    def reset_parameters(self) -> None:
        """Draw the neurons again (torch's global generator): w_i ~ N(0, init_scale^2 I / D) (D entries), learned
        u_i ~ N(0, init_scale^2); with ``symmetric_init`` the -1 half copies the +1 half."""
        with torch.no_grad():
            std = self.init_scale / math.sqrt(self.weight.shape[1])
            self.weight.normal_(0.0, std)
            if self.symmetric_init:
                half = self.width // 2
                self.weight[half:] = self.weight[:half]
            if self.output is not None:
                self.output.normal_(0.0, self.init_scale)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, width={self.width}, signs={self.hparams['signs']!r}, bias={self.has_bias}"
        )

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint whose weights do not fit with one clear error (before Lightning loads them), then
        :class:`zoo.hub.HubMixin`'s hook (the checkpoint's ``pretrained_cfg``).

        Args:
            checkpoint: the checkpoint Lightning is reading.
        """
        from zoo.hub import check_checkpoint

        check_checkpoint(self, checkpoint)
        super().on_load_checkpoint(checkpoint)

    @property
    def output_weights(self) -> torch.Tensor:
        """u (M,): the learned output weights, or the fixed signs."""
        return self.output if self.output is not None else self.signs

    def _check_inputs(self, x: torch.Tensor) -> None:
        d = self.in_features
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = f"a {x.dtype} tensor" if isinstance(x, torch.Tensor) else f"a {type(x).__name__}"
            raise ZooError(
                f"TwoLayerReLU expects a floating-point tensor of shape (batch, in_features) = (B, {d}), got {got}; "
                f"convert it first, e.g. torch.as_tensor(x, dtype={self.weight.dtype})"
            )
        if x.dim() == 2 and x.shape[1] == d:
            return
        want = (
            f"TwoLayerReLU expects inputs of shape (batch, in_features) = (B, {d}) (in_features={d}), "
            f"got {tuple(x.shape)}"
        )
        if x.dim() == 1 and d == 1:
            fix = "give one row per input: x.unsqueeze(-1) makes a batch of scalars (B,) into (B, 1)"
        elif x.dim() == 1 and x.shape[0] == d:
            fix = "a single input needs a batch dimension: x.unsqueeze(0)"
        elif x.dim() < 2:
            fix = f"give a 2-D batch (batch, {d}), one row per input"
        elif x.dim() > 2 and x.shape[-1] == d:
            fix = f"flatten the leading dimensions: x.reshape(-1, {d})"
        else:
            fix = f"give (batch, {d}) inputs, or build the model with in_features={x.shape[-1]}"
        raise ZooError(f"{want}: {fix}")

    def preactivations(self, x: torch.Tensor) -> torch.Tensor:
        """<w_i, (x_j, 1)> for every input j and neuron i: (B, M)."""
        self._check_inputs(x)
        w = self.weight
        if self.has_bias:
            return torch.addmm(w[:, -1], x, w[:, :-1].t())
        return x @ w.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """f(x) = (1/M) sum_i u_i relu(<w_i, (x, 1)>): (B, in_features) -> (B,)."""
        return F.relu(self.preactivations(x)) @ self.output_weights / self.width

    @torch.no_grad()
    def active_neurons(self, x: torch.Tensor) -> torch.Tensor:
        """(M,) bool: whether neuron i activates at least one of the inputs x (B, in_features) (<w_i, x~_j> > 0);
        inactive neurons get no gradient from these inputs."""
        return (self.preactivations(x) > 0).any(dim=0)

    # ---------------------------------------------------------------- training
    def objective(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """F = (1/n) sum_j (f(x_j) - y_j)^2 over a batch; ``y`` of shape (B,) or (B, 1)."""
        pred = self(x)
        if y.dim() == 2 and y.shape[1] == 1:
            y = y.squeeze(1)
        if y.shape != pred.shape:
            raise ZooError(
                f"TwoLayerReLU regresses one value per input: targets must have shape ({pred.shape[0]},) or "
                f"({pred.shape[0]}, 1), got {tuple(y.shape)}"
            )
        dtype = torch.promote_types(pred.dtype, torch.float32)  # float32 at least (autocast), float64 kept
        return F.mse_loss(pred.to(dtype), y.to(dtype))

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = self.objective(x, y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", self.objective(x, y), prog_bar=True, sync_dist=True)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test_loss", self.objective(x, y), sync_dist=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        return self(x)

    def particle_groups(self) -> list[dict[str, Any]]:
        """The parameter groups whose rows are the neurons, for :class:`zoo.optim.ProximalPoint`: one group, the
        particle (w_i, u_i) with learned output weights, or w_i with label u_i with fixed signs (a neuron is only
        matched with neurons of its own sign)."""
        if self.output is not None:
            return [{"params": [self.weight, self.output]}]
        return [{"params": [self.weight], "labels": self.signs.long()}]

    def configure_optimizers(self, total_steps: int | None = None, steps_per_epoch: float | None = None) -> Any:
        """The optimiser over :meth:`particle_groups` (and the schedule, if any, in Lightning's format).

        A plain PyTorch loop calls ``model.configure_optimizers()`` and steps with a closure::

            opt = model.configure_optimizers()
            def closure():
                opt.zero_grad()
                loss = model.objective(x, y)
                loss.backward()
                return loss
            for _ in range(steps):
                opt.step(closure)

        ``total_steps`` / ``steps_per_epoch``: the run length for a schedule that needs it, outside a Trainer.
        """
        factory = self.optimizer_factory or type(self).default_optimizer
        groups = self.particle_groups()
        if self.lr_scheduler_factory is None:
            return self._build_optimizer(factory, groups, self._trainer)
        trainer = self._trainer if total_steps is None else None

        def build(_default_groups: Any) -> torch.optim.Optimizer:
            opt = self._build_optimizer(factory, groups, self._trainer)
            if any("lr" not in g for g in opt.param_groups):
                raise ZooError(
                    f"{type(opt).__name__} has no learning rate for a schedule to change (ProximalPoint's step is "
                    "gamma, fixed): give lr_scheduler=None (YAML: lr_scheduler: null)"
                )
            return opt

        return build_optimization(self, build, self.lr_scheduler_factory, trainer, total_steps, steps_per_epoch)

    @staticmethod
    def _build_optimizer(
        factory: OptimizerCallable, groups: list[dict[str, Any]], trainer: Any = None
    ) -> torch.optim.Optimizer:
        opt = factory(groups)
        if not isinstance(opt, torch.optim.Optimizer):
            raise ZooError(f"optimizer must build a torch.optim.Optimizer from the parameter groups, got {opt!r}")
        accumulate = getattr(trainer, "accumulate_grad_batches", 1)
        if isinstance(opt, ProximalPoint) and accumulate != 1:
            # Lightning would divide the closure's loss by the accumulation count (a proximal step on F / k) and
            # the closure re-evaluates the current batch only, so the earlier batches' gradients would be dropped
            raise ZooError(
                f"ProximalPoint cannot accumulate gradients (Trainer accumulate_grad_batches={accumulate}): each "
                "proximal step re-evaluates its batch's objective inner_steps times, so Lightning's accumulation "
                "would drop the earlier batches and scale the objective by 1/accumulate_grad_batches; give "
                "accumulate_grad_batches=1 (--trainer.accumulate_grad_batches=1) and a larger batch (the whole "
                "training set: the proximal method is defined full-batch)"
            )
        return opt
