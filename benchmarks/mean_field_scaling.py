"""Mean-field ResNets: training curves across widths and depths, with and without the mean-field step scaling, and
the exponential decay of the risk against lambda_0 / N.

1. **Scaling.** One regression problem (N = 8 points of R^2, y = x + sin(2 x reversed) / 2) trained by full-batch
   gradient descent at one learning rate (0.5) for mean-field ResNets of width M and depth S growing together.
   With ``mean_field_scaling`` the neurons' step is lr * M * S; without it every parameter gets the rate the scaled
   smallest network gives its neurons (so the smallest network's curve is the same in both). The table gives the
   risk at a few times and the largest gap between the curves of (M, S) and of the previous, half as wide and deep
   network, relative to the initial risk: with the scaling the curves converge to one curve as M and S grow;
   without it each doubling of M and S makes training about four times slower.
2. **Decay.** From a small initial risk (targets x + 0.05 noise, the network starting at the identity), N = 6
   points spread more or less (so lambda_0 varies), M = 128, S = 8, 200 gradient steps of lr 1: the decay rate of
   log L fitted on the second half of training (gradient-flow time t = lr x steps), its R^2, and the rate the
   Polyak-Lojasiewicz bound guarantees, 2 lambda_0 / N (at u = 0 the u's alone decrease the risk at least that fast).

Everything runs in float64 on the CPU (one torch thread by default); seeds are fixed, so the numbers are the same on
every run of one machine. Writes ``mean_field_scaling.csv`` (curves), ``mean_field_decay.csv`` (rates) and
``mean_field_scaling.png`` (both panels) under ``--out`` (default ``docs/figures``) and prints markdown tables.

    python benchmarks/mean_field_scaling.py            # M x S = 32x4 .. 256x32, 6 problems
    python benchmarks/mean_field_scaling.py --small    # a few seconds: 2 sizes, 3 problems, fewer steps
"""

from __future__ import annotations

import argparse
import csv
import functools
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from zoo.hub import atomic_write
from zoo.models.mean_field import MeanFieldResNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import figure_dir, machine_line, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def train(model: MeanFieldResNet, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    """Full-batch gradient descent with the model's own optimiser; the risk before each step and after the last."""
    opt = model.configure_optimizers()
    risks = []
    for _ in range(steps):
        opt.zero_grad()
        risk = model.risk(model(x), y)
        risks.append(risk.item())
        risk.backward()
        opt.step()
    with torch.no_grad():
        risks.append(model.risk(model(x), y).item())
    return risks


def build(width: int, depth: int, lr: float, scaling: bool, seed: int = 0) -> MeanFieldResNet:
    torch.manual_seed(seed)
    optimizer = functools.partial(torch.optim.SGD, lr=lr)
    return MeanFieldResNet(dim=2, width=width, depth=depth, mean_field_scaling=scaling, optimizer=optimizer).double()


def scaling_experiment(sizes: list[tuple[int, int]], steps: int, lr: float = 0.5) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 2, dtype=torch.float64, generator=g)
    y = x + 0.5 * torch.sin(2 * x.flip(1))
    m0, s0 = sizes[0]
    rows = []
    for scaling in (True, False):
        for width, depth in sizes:
            rate = lr if scaling else lr * m0 * s0
            risks = train(build(width, depth, rate, scaling), x, y, steps)
            rows += [
                {"scaling": scaling, "M": width, "S": depth, "step": t, "time": lr * t, "risk": r}
                for t, r in enumerate(risks)
            ]
    return rows


def fit_rate(times: list[float], risks: list[float]) -> tuple[float, float]:
    """Least-squares line through (t, log L): (decay rate, R^2)."""
    t = torch.tensor(times, dtype=torch.float64)
    log = torch.tensor(risks, dtype=torch.float64).log()
    design = torch.stack([t, torch.ones_like(t)], 1)
    coef = torch.linalg.lstsq(design, log[:, None]).solution[:, 0]
    residual = log - design @ coef
    return -coef[0].item(), 1.0 - (residual.pow(2).sum() / (log - log.mean()).pow(2).sum()).item()


def decay_experiment(spreads: list[float], steps: int, n: int = 6, lr: float = 1.0) -> list[dict]:
    rows = []
    for spread in spreads:
        g = torch.Generator().manual_seed(0)
        x = spread * torch.randn(n, 2, dtype=torch.float64, generator=g)
        y = x + 0.05 * torch.randn(n, 2, dtype=torch.float64, generator=g)
        model = build(128, 8, lr, True)
        lam = model.kernel_conditioning(x).item()
        risks = train(model, x, y, steps)
        half = steps // 2
        rate, r2 = fit_rate([lr * t for t in range(half, steps + 1)], risks[half:])
        rows.append(
            {
                "spread": spread,
                "N": n,
                "lambda_0": lam,
                "bound_rate": 2 * lam / n,
                "fitted_rate": rate,
                "r2": r2,
                "initial_risk": risks[0],
                "final_risk": risks[-1],
            }
        )
    return rows


# ------------------------------------------------------------------------------------------------ figure (PIL)

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


class Panel:
    """A plotting area mapping data coordinates (x, y; y on a log10 scale when ``log_y``) to pixels."""

    def __init__(self, draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], xlim, ylim, log_y: bool) -> None:
        self.draw, self.box, self.xlim, self.log_y = draw, box, xlim, log_y
        self.ylim = tuple(math.log10(v) for v in ylim) if log_y else ylim

    def px(self, x: float, y: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        y = math.log10(max(y, 1e-300)) if self.log_y else y
        fx = (x - self.xlim[0]) / (self.xlim[1] - self.xlim[0])
        fy = (y - self.ylim[0]) / (self.ylim[1] - self.ylim[0])
        return left + fx * (right - left), bottom - fy * (bottom - top)

    def axes(self, xlabel: str, ylabel: str, title: str, xticks: list[float], yticks: list[float]) -> None:
        left, top, right, bottom = self.box
        self.draw.rectangle(self.box, outline=(0, 0, 0))
        for t in xticks:
            px, _ = self.px(t, 10 ** self.ylim[0] if self.log_y else self.ylim[0])
            self.draw.line([(px, bottom), (px, bottom + 4)], fill=(0, 0, 0))
            self.draw.text((px - 8, bottom + 6), f"{t:g}", fill=(0, 0, 0))
        for t in yticks:
            _, py = self.px(self.xlim[0], t)
            self.draw.line([(left - 4, py), (left, py)], fill=(0, 0, 0))
            self.draw.line([(left, py), (right, py)], fill=(225, 225, 225))
            self.draw.text((left - 44, py - 5), f"{t:.0e}" if self.log_y else f"{t:g}", fill=(0, 0, 0))
        self.draw.text(((left + right) / 2 - 3 * len(xlabel), bottom + 20), xlabel, fill=(0, 0, 0))
        self.draw.text((left - 44, top - 28), ylabel, fill=(0, 0, 0))
        self.draw.text(((left + right) / 2 - 3 * len(title), top - 16), title, fill=(0, 0, 0))

    def line(self, xs: list[float], ys: list[float], color, dashed: bool = False) -> None:
        points = [self.px(x, y) for x, y in zip(xs, ys)]
        if not dashed:
            self.draw.line(points, fill=color, width=2)
            return
        # dashes of about 8 pixels, drawn every other one along the polyline
        dense = [points[0]]
        for (x0, y0), (x1, y1) in zip(points, points[1:]):
            pieces = max(1, round(math.hypot(x1 - x0, y1 - y0) / 8))
            dense += [(x0 + (x1 - x0) * k / pieces, y0 + (y1 - y0) * k / pieces) for k in range(1, pieces + 1)]
        for i in range(0, len(dense) - 1, 2):
            self.draw.line(dense[i : i + 2], fill=color, width=2)

    def dot(self, x: float, y: float, color) -> None:
        px, py = self.px(x, y)
        self.draw.ellipse([px - 4, py - 4, px + 4, py + 4], fill=color)


def figure(curves: list[dict], decay: list[dict], path: Path) -> None:
    image = Image.new("RGB", (1100, 460), "white")
    draw = ImageDraw.Draw(image)
    sizes = sorted({(r["M"], r["S"]) for r in curves})
    t_max = max(r["time"] for r in curves)
    low = min(r["risk"] for r in curves)
    high = max(r["risk"] for r in curves)
    ylim = (10 ** math.floor(math.log10(low)), 10 ** math.ceil(math.log10(high)))
    left = Panel(draw, (80, 50, 520, 390), (0.0, t_max), ylim, log_y=True)
    ticks = [10.0**k for k in range(round(math.log10(ylim[0])), round(math.log10(ylim[1])) + 1)]
    left.axes("time t = lr x steps", "risk", "risk vs time: solid with M*S scaling, dashed without", [0, t_max], ticks)
    for i, (m, s) in enumerate(sizes):
        color = COLORS[i % len(COLORS)]
        for scaling in (True, False):
            rows = [r for r in curves if r["M"] == m and r["S"] == s and r["scaling"] == scaling]
            left.line([r["time"] for r in rows], [r["risk"] for r in rows], color, dashed=not scaling)
        draw.text((400, 300 + 14 * i), f"M={m}, S={s}", fill=color)
    top = max(max(r["fitted_rate"], r["bound_rate"]) for r in decay) * 1.1
    right = Panel(draw, (640, 50, 1070, 390), (0.0, top), (0.0, top), log_y=False)
    step = 10 ** math.floor(math.log10(top / 2))
    ticks = [k * step for k in range(int(top / step) + 1)]
    right.axes(
        "2 lambda_0 / N (the PL bound)", "fitted decay rate of log L", "decay rate vs lambda_0 / N", ticks, ticks
    )
    right.line([0.0, top], [0.0, top], (150, 150, 150), dashed=True)
    for i, r in enumerate(decay):
        right.dot(r["bound_rate"], r["fitted_rate"], COLORS[i % len(COLORS)])
    draw.text((660, 60), "dashed: rate = 2 lambda_0 / N", fill=(100, 100, 100))
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--small", action="store_true", help="a few seconds: 2 sizes, 3 problems, fewer steps")
    parser.add_argument(
        "--out", type=Path, help="folder of the CSV and PNG (default: docs/figures; with --small a temporary folder)"
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    args.out = figure_dir(args.out, args.small)
    torch.set_num_threads(args.threads)
    if args.small:
        sizes, steps, spreads, decay_steps = [(16, 2), (32, 4)], 20, [1.0, 2.0, 3.0], 60
    else:
        sizes, steps, spreads, decay_steps = [(32, 4), (64, 8), (128, 16), (256, 32)], 60, [0.75, 1, 1.5, 2, 3, 4], 200
    print(machine_line(torch.device("cpu"), args.threads))
    curves = scaling_experiment(sizes, steps)
    decay = decay_experiment(spreads, decay_steps)

    print(f"\n### Risk vs time, N = 8, lr 0.5, float64 ({steps} full-batch steps)\n")
    checkpoints = [steps // 4, steps // 2, steps]
    head = " | ".join(f"t={0.5 * c:g}" for c in checkpoints)
    print(f"| M | S | scaling | risk t=0 | {head} | max gap to the previous (M, S) / risk(0) |")
    print("|---|---|---|---|" + "---|" * len(checkpoints) + "---|")
    for scaling in (True, False):
        previous = None
        for m, s in sizes:
            risks = [r["risk"] for r in curves if r["scaling"] == scaling and (r["M"], r["S"]) == (m, s)]
            gap = "" if previous is None else f"{max(abs(a - b) for a, b in zip(risks, previous)) / risks[0]:.3f}"
            cells = " | ".join(f"{risks[c]:.3e}" for c in checkpoints)
            print(f"| {m} | {s} | {'M*S' if scaling else 'none'} | {risks[0]:.3e} | {cells} | {gap} |")
            previous = risks

    print(f"\n### Exponential decay vs lambda_0 / N (N = 6, M = 128, S = 8, lr 1, {decay_steps} steps)\n")
    print("| spread | lambda_0 | 2 lambda_0 / N | fitted rate | rate / (2 lambda_0 / N) | R^2 | L(0) | L(end) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in decay:
        ratio = r["fitted_rate"] / r["bound_rate"] if r["bound_rate"] > 0 else math.inf
        print(
            f"| {r['spread']:g} | {r['lambda_0']:.4f} | {r['bound_rate']:.4f} | {r['fitted_rate']:.4f} | "
            f"{ratio:.2f} | {r['r2']:.5f} | {r['initial_risk']:.2e} | {r['final_risk']:.2e} |"
        )

    write_csv(args.out / "mean_field_scaling.csv", curves)
    write_csv(args.out / "mean_field_decay.csv", decay)
    figure(curves, decay, args.out / "mean_field_scaling.png")
    print(
        f"\nwrote {args.out / 'mean_field_scaling.csv'}, {args.out / 'mean_field_decay.csv'}, "
        f"{args.out / 'mean_field_scaling.png'}"
    )


if __name__ == "__main__":
    main()
