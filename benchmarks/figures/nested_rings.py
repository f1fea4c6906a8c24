"""Decision regions of a ResNet and a Momentum ResNet trained to separate four nested rings in the plane.

Data: four concentric rings of radii 0.25, 0.5, 0.75, 1 (+-0.06, uniform), labels alternating 0, 1, 0, 1; 200
points per ring for training, another 200 per ring (another seed) for the test accuracy. Model: a residual stack
of depth 15 in R^2 whose residual function f(x) = W2^T tanh(W1 x + b) (16 hidden units) is shared by all 15 steps
(tied weights: one autonomous vector field, the setting of the expressivity argument), then a linear classifier
R^2 -> 2 classes. The two networks have the same parameters; only the rule of ``zoo.nn.ResidualStack`` differs:

* ResNet, ``rule="euler"``, h = 1:  x_{n+1} = x_n + f(x_n);
* Momentum ResNet, ``rule="momentum"``, gamma = 0.9, h = 1, v_0 = 0:
  v_{n+1} = gamma v_n + (1 - gamma) f(x_n),  x_{n+1} = x_n + v_{n+1}.

Each is trained from the same initialisation (per seed) by full-batch Adam (lr 1e-2, 1500 steps, cross-entropy).
A first-order flow moves the plane without folding it, so the rings stay nested and a linear classifier cannot
separate them; the second-order dynamics (a velocity carried from step to step) can. The figure shows the decision
regions of seed 0 of each (the CSV holds every seed's accuracies: the script does not pick the best seed).

    python benchmarks/figures/nested_rings.py          # 3 seeds of each, about 3 minutes on 2 busy cores
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # figure_common beside this script, the benchmarks above it
import figure_common as fc  # noqa: E402

from zoo.nn import ResidualStack  # noqa: E402

NAME = "nested_rings"
DEPTH = 15
HIDDEN = 16
GAMMA = 0.9
RINGS = 4
LR = 1e-2
RULES = {"euler": "ResNet (euler)", "momentum": f"Momentum ResNet (gamma = {GAMMA})"}


def rings(points_per_ring: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Points on four nested rings (radii 0.25 .. 1, width 0.12) and alternating labels 0, 1, 0, 1.

    Args:
        points_per_ring: points drawn on each ring (angles uniform).
        seed: the generator's seed.
    """
    gen = torch.Generator().manual_seed(seed)
    xs, ys = [], []
    for i in range(RINGS):
        radius = (i + 1) / RINGS + 0.06 * (2 * torch.rand(points_per_ring, generator=gen) - 1)
        angle = 2 * math.pi * torch.rand(points_per_ring, generator=gen)
        xs.append(torch.stack([radius * angle.cos(), radius * angle.sin()], -1))
        ys.append(torch.full((points_per_ring,), i % 2))
    return torch.cat(xs), torch.cat(ys)


def build(rule: str, seed: int) -> nn.Sequential:
    """The tied residual stack of depth 15 (f(x) = W2^T tanh(W1 x + b)) and the linear classifier.

    Args:
        rule: ``"euler"`` or ``"momentum"``.
        seed: the initialisation's seed (the same weights for both rules).
    """
    torch.manual_seed(seed)
    f = nn.Sequential(nn.Linear(2, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 2, bias=False))
    options = {"gamma": GAMMA} if rule == "momentum" else {}
    return nn.Sequential(ResidualStack([f] * DEPTH, rule=rule, scale=1.0, **options), nn.Linear(2, 2))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(-1) == y).double().mean().item()


def train(rule: str, seed: int, steps: int, data: tuple) -> tuple[nn.Module, dict]:
    """Full-batch Adam on the training rings; the model and its final loss and accuracies.

    Args:
        rule: ``"euler"`` or ``"momentum"``.
        seed: the initialisation's seed.
        steps: Adam steps.
        data: (x_train, y_train, x_test, y_test).
    """
    x, y, x_test, y_test = data
    model = build(rule, seed)
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for _ in range(steps):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    with torch.no_grad():
        final = F.cross_entropy(model(x), y).item()
    return model, {
        "rule": rule,
        "seed": seed,
        "steps": steps,
        "train_loss": final,
        "train_acc": accuracy(model, x, y),
        "test_acc": accuracy(model, x_test, y_test),
    }


def plot(models: dict[str, nn.Module], rows: list[dict], data: tuple, footnote: str, cells: int = 161) -> fc.plt.Figure:
    """Two panels: each rule's decision regions (seed 0) with the training points.

    Args:
        models: rule -> the seed-0 model.
        rows: the accuracy rows of every run.
        data: (x_train, y_train, x_test, y_test).
        footnote: the machine line.
        cells: grid points per side of the decision regions.
    """
    x, y = data[0], data[1]
    lim = 1.25
    grid = torch.linspace(-lim, lim, cells)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    points = torch.stack([gx.flatten(), gy.flatten()], -1)
    fig, axes = fc.plt.subplots(1, 2, figsize=(8.0, 4.6))
    cmap = fc.matplotlib.colors.ListedColormap(["#c6dbef", "#fdd0a2"])
    for ax, (rule, model) in zip(axes, models.items(), strict=True):
        with torch.no_grad():
            region = model(points).argmax(-1).reshape(gx.shape)
        ax.pcolormesh(gx.numpy(), gy.numpy(), region.numpy(), cmap=cmap, shading="auto", rasterized=True)
        for label, colour in ((0, "tab:blue"), (1, "tab:orange")):
            sel = y == label
            ax.scatter(x[sel, 0].numpy(), x[sel, 1].numpy(), s=2, color=colour, lw=0)
        runs = [r for r in rows if r["rule"] == rule]
        seed0 = next(r for r in runs if r["seed"] == 0)
        test = statistics.median(r["test_acc"] for r in runs)
        ax.set_title(
            f"{RULES[rule]}\nseed 0: train {seed0['train_acc']:.0%}, test {seed0['test_acc']:.0%}\n"
            f"median test accuracy over {len(runs)} seed(s): {test:.0%}",
            fontsize=9,
        )
        ax.set_aspect("equal")
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_xlabel("x$_1$ (input units)")
        ax.set_ylabel("x$_2$ (input units)")
    fig.suptitle(
        f"Four nested rings, tied f(x) = W2^T tanh(W1 x + b), {HIDDEN} hidden, depth {DEPTH}, h = 1", fontsize=10
    )
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def main(argv: list[str] | None = None) -> list:
    p = fc.parser(__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="initialisations per rule (default 3)")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (default 1500)")
    args = p.parse_args(argv)
    seeds = range(args.seeds or (1 if args.small else 3))
    steps = args.steps or (10 if args.small else 1500)
    per_ring = 25 if args.small else 200
    data = (*rings(per_ring, seed=0), *rings(per_ring, seed=1))
    t0 = time.perf_counter()
    rows, models = [], {}
    for rule in RULES:
        for seed in seeds:
            with fc.torch_threads(args.threads):
                model, row = train(rule, seed, steps, data)
            rows.append(row)
            if seed == 0:
                models[rule] = model
            print(f"  {rule} seed {seed}: train {row['train_acc']:.3f} test {row['test_acc']:.3f}", file=sys.stderr)
    footnote = f"full-batch Adam lr {LR}, {steps} steps, {RINGS * per_ring} training points; {fc.machine(args.threads)}"
    csv_path = fc.write_csv(
        args.out / f"{NAME}.csv",
        rows,
        f"nested rings, tied depth-{DEPTH} stacks, accuracies per rule and seed\n"
        f"{fc.command('nested_rings.py', args.small)}\n{footnote}",
    )
    png_path = fc.save_png(
        plot(models, rows, data, footnote, cells=41 if args.small else 161), args.out / f"{NAME}.png", footnote
    )
    fc.report([csv_path, png_path])
    print(f"({time.perf_counter() - t0:.0f} s)")
    return [csv_path, png_path]


if __name__ == "__main__":
    main()
