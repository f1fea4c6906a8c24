"""Proximal-point training of two-layer ReLU networks with the Frobenius versus the Wasserstein-2 distance between
neurons: do the objective curves coincide?

The network is :class:`zoo.models.TwoLayerReLU` (mean-field scaling, inputs augmented with a 1, fixed output signs:
half the neurons +1, half -1), trained full batch on the squared loss by :class:`zoo.optim.ProximalPoint` with
``distance="frobenius"`` and ``distance="wasserstein"`` from the same initialisation, in float64. The problems are
the small examples on which this comparison is made (:func:`zoo.data.planar.planar_problem`):

* ``sine``: 20 points of [-1, 1], y = sin(4x - pi/2); 1-d inputs, so every neuron (slope, bias) is a point of the
  plane;
* ``linear``: 5 points of [-1, 1], y = 0.5x + 0.6 (1-d inputs);
* ``disc``: 64 uniform points of [-1, 1]^2 labelled +1 inside a disc and -1 outside (a 2-d classification
  regressed on the labels).

Each problem is run at two initial neuron sizes (``init_scale`` 1, and 0.1: small neurons, crowded near the origin,
where the optimal matching of the Wasserstein step leaves the identity most often) and two step sizes gamma. The
table gives the objective F at checkpoints for both distances, the largest relative gap
|F_W2 - F_Frobenius| / F_Frobenius over the run, the number of steps whose Wasserstein matching was not the identity,
the median over the steps of the inner solver's stationarity measure (``ProximalPoint``'s
``state["stationarity"]``: 0 when the inner gradient steps reached the proximal point, of order 1 when they did
not), and the time of a Wasserstein step relative to a Frobenius step (same run, same machine). A CSV of the full curves
and a PNG figure are written to ``--out`` (default docs/figures).

    python benchmarks/proximal_distances.py            # width 100, 200 steps, 12 settings (about a minute or two)
    python benchmarks/proximal_distances.py --small    # width 20, 20 steps, 3 settings (seconds)
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from zoo.data.planar import planar_problem
from zoo.hub import atomic_write
from zoo.models import TwoLayerReLU
from zoo.optim import ProximalPoint

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # the shared helpers beside this script
from common import figure_dir, machine_line, summary  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PROBLEMS = ("sine", "linear", "disc")
DISTANCES = ("frobenius", "wasserstein")


def train(
    problem: str, distance: str, gamma: float, init_scale: float, width: int, steps: int, inner_steps: int, seed: int
) -> dict[str, Any]:
    """Objective after 0..steps proximal steps, the steps whose matching left the identity, and the time."""
    x, y = planar_problem(problem)
    x, y = x.double(), y.double()
    torch.manual_seed(seed)
    net = TwoLayerReLU(in_features=x.shape[1], width=width, signs="fixed", init_scale=init_scale).double()
    opt = ProximalPoint(net.particle_groups(), gamma=gamma, inner_steps=inner_steps, distance=distance)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = net.objective(x, y)
        loss.backward()
        return loss

    curve, changed, stationarity = [], [], []
    identity = torch.arange(width)
    start = time.perf_counter()
    for _ in range(steps):
        curve.append(float(opt.step(closure)))
        state = opt.state[net.weight]
        changed.append(bool((state["assignment"] != identity).any()))
        stationarity.append(float(state["stationarity"]))
    seconds = time.perf_counter() - start
    with torch.no_grad():
        curve.append(float(net.objective(x, y)))
    return {"curve": curve, "changed": changed, "stationarity": stationarity, "seconds": seconds}


def settings(small: bool) -> dict[str, Any]:
    if small:
        return {"width": 20, "steps": 20, "inner_steps": 10, "inits": (1.0,), "gammas": (0.5,), "checks": (5, 10, 20)}
    return {
        "width": 100,
        "steps": 200,
        "inner_steps": 20,
        "inits": (1.0, 0.1),
        "gammas": (0.2, 1.0),
        "checks": (10, 50, 100, 200),
    }


def relative_gap(a: float, b: float) -> float:
    return abs(b - a) / max(abs(a), 1e-300)


def run(small: bool, seed: int) -> list[dict[str, Any]]:
    cfg = settings(small)
    rows = []
    for init_scale in cfg["inits"]:
        for problem in PROBLEMS:
            for gamma in cfg["gammas"]:
                out = {
                    d: train(problem, d, gamma, init_scale, cfg["width"], cfg["steps"], cfg["inner_steps"], seed)
                    for d in DISTANCES
                }
                rows.append(
                    {
                        "problem": problem,
                        "init_scale": init_scale,
                        "gamma": gamma,
                        "frobenius": out["frobenius"]["curve"],
                        "wasserstein": out["wasserstein"]["curve"],
                        "changed": out["wasserstein"]["changed"],
                        "stationarity": {d: statistics.median(out[d]["stationarity"]) for d in DISTANCES},
                        "time_ratio": out["wasserstein"]["seconds"] / out["frobenius"]["seconds"],
                    }
                )
    return rows


def table(rows: list[dict[str, Any]], checks: tuple[int, ...]) -> str:
    head = (
        "| problem | init | gamma | "
        + " | ".join(f"F at t={t} (Frob. / W2)" for t in checks)
        + " | max relative gap | steps with a non-identity matching | median stationarity (Frob. / W2)"
        + " | W2 / Frob. step time |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        f, w = r["frobenius"], r["wasserstein"]
        gap = max(relative_gap(a, b) for a, b in zip(f, w))
        cells = " | ".join(f"{f[t]:.4g} / {w[t]:.4g}" for t in checks)
        changed = sum(r["changed"])
        lines.append(
            f"| {r['problem']} | {r['init_scale']:g} | {r['gamma']:g} | {cells} | {gap:.2%} | "
            f"{changed} / {len(r['changed'])} | {r['stationarity']['frobenius']:.1e} / "
            f"{r['stationarity']['wasserstein']:.1e} | {r['time_ratio']:.2f} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(
                [
                    "problem",
                    "init_scale",
                    "gamma",
                    "step",
                    "frobenius",
                    "wasserstein",
                    "relative_gap",
                    "matching_changed",
                ]
            )
            for r in rows:
                for t, (a, b) in enumerate(zip(r["frobenius"], r["wasserstein"])):
                    changed = int(r["changed"][t - 1]) if t > 0 else 0
                    out.writerow(
                        [r["problem"], r["init_scale"], r["gamma"], t, repr(a), repr(b), f"{relative_gap(a, b):.6g}"]
                        + [changed]
                    )

    atomic_write(path, write)


# ------------------------------------------------------------------------------------------------ the figure (PIL)

COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189)]


def _log_ticks(low: float, high: float) -> list[float]:
    """Ticks inside [10^low, 10^high]: powers of ten, else 1-2-5 or 1..9 times powers of ten, else the two ends."""
    for mantissas in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [
            m * 10.0**k
            for k in range(math.floor(low) - 1, math.ceil(high) + 1)
            for m in mantissas
            if low <= math.log10(m * 10.0**k) <= high
        ]
        if len(ticks) >= 2:
            return ticks
    return [10.0**low, 10.0**high]


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    """Objective (log scale) against the step, one panel per (init, problem): Frobenius as lines, Wasserstein as
    dots on them, one colour per gamma."""
    from PIL import Image, ImageDraw, ImageFont

    inits = sorted({r["init_scale"] for r in rows}, reverse=True)
    gammas = sorted({r["gamma"] for r in rows})
    pw, ph, left, right, top, bottom = 330, 240, 58, 12, 34, 34
    legend = 28
    image = Image.new("RGB", (pw * len(PROBLEMS), ph * len(inits) + legend), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    x0 = 8
    for gi, gamma in enumerate(gammas):
        colour = COLOURS[gi % len(COLOURS)]
        draw.line([(x0, 14), (x0 + 24, 14)], fill=colour, width=2)
        draw.text((x0 + 28, 8), f"Frobenius, gamma={gamma:g}", fill="black", font=font)
        x0 += 190
        draw.ellipse([(x0 + 9, 11), (x0 + 15, 17)], outline=colour, width=2)
        draw.text((x0 + 28, 8), f"Wasserstein-2, gamma={gamma:g}", fill="black", font=font)
        x0 += 210
    for ri, init in enumerate(inits):
        for ci, problem in enumerate(PROBLEMS):
            panel = [r for r in rows if r["init_scale"] == init and r["problem"] == problem]
            if not panel:
                continue
            ox, oy = ci * pw, legend + ri * ph
            values = [v for r in panel for k in DISTANCES for v in r[k] if v > 0]
            low, high = math.log10(min(values)), math.log10(max(values))
            if high - low < 1e-9:
                low, high = low - 0.5, high + 0.5
            steps = max(len(r["frobenius"]) for r in panel) - 1
            ax0, ax1, ay0, ay1 = ox + left, ox + pw - right, oy + top, oy + ph - bottom

            def to_xy(t: int, v: float, steps=steps, ax0=ax0, ax1=ax1, ay0=ay0, ay1=ay1, low=low, high=high):
                lv = math.log10(max(v, 10.0**low))
                return ax0 + (ax1 - ax0) * t / steps, ay1 - (ay1 - ay0) * (lv - low) / (high - low)

            draw.rectangle([(ax0, ay0), (ax1, ay1)], outline="black")
            draw.text((ax0, oy + 8), f"{problem}, init scale {init:g}", fill="black", font=font)
            for tick in _log_ticks(low, high):
                _, ty = to_xy(0, tick)
                draw.line([(ax0 - 4, ty), (ax0, ty)], fill="black")
                draw.text((ox + 4, ty - 6), f"{tick:.2g}", fill="black", font=font)
            for t in (0, steps // 2, steps):
                tx, _ = to_xy(t, 10.0**low)
                draw.line([(tx, ay1), (tx, ay1 + 4)], fill="black")
                draw.text((tx - 8, ay1 + 6), str(t), fill="black", font=font)
            draw.text((ax1 - 60, ay1 + 18), "proximal step", fill="black", font=font)
            for r in panel:
                colour = COLOURS[gammas.index(r["gamma"]) % len(COLOURS)]
                draw.line([to_xy(t, v) for t, v in enumerate(r["frobenius"])], fill=colour, width=2)
                every = max(1, steps // 25)
                for t, v in enumerate(r["wasserstein"]):
                    if t % every == 0 or t == steps:
                        px, py = to_xy(t, v)
                        draw.ellipse([(px - 3, py - 3), (px + 3, py + 3)], outline=colour, width=2)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--small", action="store_true", help="width 20, 20 steps, one setting per problem")
    parser.add_argument(
        "--out", type=Path, help="folder of the CSV and PNG (default: docs/figures; with --small a temporary folder)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    args.out = figure_dir(args.out, args.small)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        start = time.perf_counter()
        rows = run(args.small, args.seed)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    cfg = settings(args.small)
    print(machine_line(torch.device("cpu"), args.threads))
    print(
        f"TwoLayerReLU width {cfg['width']}, fixed signs, float64; ProximalPoint with {cfg['inner_steps']} inner "
        f"steps (inner_lr = gamma / 2), {cfg['steps']} steps; {elapsed:.1f} s in all\n"
    )
    print(table(rows, (0, *cfg["checks"])))
    args.out.mkdir(parents=True, exist_ok=True)
    write_csv(rows, args.out / "proximal_objective_curves.csv")
    plot(rows, args.out / "proximal_objective_curves.png")
    print(f"\nwrote {args.out / 'proximal_objective_curves.csv'} and {args.out / 'proximal_objective_curves.png'}")
    return rows


if __name__ == "__main__":
    main()
