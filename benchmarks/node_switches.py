"""Width against switches for neural ODEs: how many switches L a ReLU NeuralODE of width p needs to send N random
points onto N random targets, trained by gradient descent, beside the interpolation theorem's L = 2 ceil(N/p) - 1
(2 ceil(N/p) - 2 when d > N) and the constructive controls of ``zoo.models.neural_ode.interpolating_controls``.

For each width p and each L from 0 to the theorem's L + ``--extra``, NeuralODEs (learned switch times, ``--steps``
Euler steps per interval, T = 1) are trained with Adam on the mean squared error over the N pairs from ``--seeds``
initialisations (each hyperplane a_i . x + b_i = 0 started through a data point, so that no neuron starts dead);
the best final max_n |Phi_T(x_n) - y_n| is kept. The table reports, for each p, the smallest L whose
trained model reaches ``--tol``, the theorem's L, and the switches and error of the constructive controls (float64,
exact flow). Writes ``node_switches.csv`` and ``node_switches.png`` (error against L, one curve per width, the
theorem's L marked) under ``--out-dir`` and prints a markdown table.

    python benchmarks/node_switches.py                 # N = 8 in the unit square, p = 1, 2, 4, 8 (10-20 minutes)
    python benchmarks/node_switches.py --small         # seconds: the test suite runs this
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import figure_dir, machine_line, summary  # noqa: E402

from zoo.hub import atomic_write  # noqa: E402
from zoo.models.neural_ode import NeuralODE, interpolating_controls, interpolation_switches  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("--points", type=int, default=8, help="N, the number of pairs")
    parser.add_argument("--dim", type=int, default=2, help="d, the dimension")
    parser.add_argument("--widths", type=int, nargs="+", default=[1, 2, 4, 8], help="the widths p")
    parser.add_argument("--extra", type=int, default=1, help="switches tried beyond the theorem's L")
    parser.add_argument("--iterations", type=int, default=600, help="Adam steps per training")
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--seeds", type=int, default=2, help="initialisations per (p, L); the best is kept")
    parser.add_argument("--steps", type=int, default=2, help="Euler steps per interval")
    parser.add_argument("--tol", type=float, default=0.2, help="the error to reach: max_n |Phi(x_n) - y_n|")
    parser.add_argument("--data-seed", type=int, default=0)
    parser.add_argument(
        "--out-dir", help="folder of the CSV and PNG (default: docs/figures; with --small a temporary folder)"
    )
    parser.add_argument("--small", action="store_true", help="N = 4, p = 2, 4, few steps: a few seconds")
    args = parser.parse_args(argv)
    if args.small:
        args.points, args.widths, args.iterations, args.seeds, args.extra = 4, [2, 4], 60, 1, 0
    return args


def train(x: torch.Tensor, y: torch.Tensor, width: int, switches: int, args: argparse.Namespace, seed: int) -> float:
    """The final max_n |Phi_T(x_n) - y_n| of a NeuralODE trained with Adam on the mean squared error."""
    torch.manual_seed(seed)
    dim = x.shape[1]
    model = NeuralODE(
        dim=dim,
        width=width,
        switches=switches,
        steps=args.steps,
        switch_times="learned",
        in_features=dim,
        embed=False,
        num_classes=0,
    )
    with torch.no_grad():  # every hyperplane a_i . x + b_i = 0 through a data point (no neuron starts dead)
        for field in model.fields:
            anchors = x[torch.randint(0, x.shape[0], (width,))]
            field.b.copy_(-(field.a * anchors).sum(dim=1) + 0.1)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.iterations)
    for _ in range(args.iterations):
        opt.zero_grad(set_to_none=True)
        loss = (model(x) - y).pow(2).sum(dim=1).mean()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return float((model(x) - y).norm(dim=1).max())


def run(args: argparse.Namespace) -> tuple[list[dict], list[dict]]:
    g = torch.Generator().manual_seed(args.data_seed)
    x = torch.rand(args.points, args.dim, generator=g)
    y = torch.rand(args.points, args.dim, generator=g)
    curves, table = [], []
    for width in args.widths:
        theorem = interpolation_switches(args.points, width, args.dim)
        built = interpolating_controls(x.double(), y.double(), width)
        with torch.no_grad():
            built_error = float((built(x.double()) - y.double()).norm(dim=1).max())
        active = sum(bool(f.w.detach().abs().max() > 0) for f in built.fields)
        reached = None
        for switches in range(theorem + args.extra + 1):
            start = time.perf_counter()
            error = min(train(x, y, width, switches, args, seed) for seed in range(args.seeds))
            curves.append(
                {"width": width, "switches": switches, "error": error, "seconds": time.perf_counter() - start}
            )
            if reached is None and error <= args.tol:
                reached = switches
        at_theorem = next(c["error"] for c in curves if c["width"] == width and c["switches"] == theorem)
        table.append(
            {
                "width": width,
                "smallest_trained_L": "" if reached is None else reached,
                "trained_error_at_theorem_L": at_theorem,
                "theorem_L": theorem,
                "constructive_L": built.switches,
                "constructive_active_intervals": active,
                "constructive_error": built_error,
            }
        )
    return curves, table


def write_outputs(curves: list[dict], table: list[dict], args: argparse.Namespace) -> tuple[Path, Path]:
    out = figure_dir(args.out_dir, args.small)
    out.mkdir(parents=True, exist_ok=True)
    csv_path, png_path = out / "node_switches.csv", out / "node_switches.png"
    rows = [{**c, **next(t for t in table if t["width"] == c["width"])} for c in curves]
    fields = list(rows[0])

    def write_csv(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(csv_path, write_csv)

    image = plot(curves, table, args)
    atomic_write(png_path, lambda tmp: image.save(tmp, format="PNG"))
    return csv_path, png_path


COLOURS = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))


def plot(curves: list[dict], table: list[dict], args: argparse.Namespace) -> Image.Image:
    """Error (log scale) against L, one curve per width, the theorem's L dotted, the tolerance dashed (drawn with
    Pillow, which torchvision brings, so the benchmark needs no plotting library)."""
    width_px, height_px, left, right, top, bottom = 640, 400, 70, 150, 30, 50
    image = Image.new("RGB", (width_px, height_px), "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    errors = [max(c["error"], 1e-12) for c in curves] + [args.tol]
    lo, hi = math.floor(math.log10(min(errors))), math.ceil(math.log10(max(errors)))
    hi = max(hi, lo + 1)
    max_l = max(max(c["switches"] for c in curves), max(t["theorem_L"] for t in table), 1)

    def px(switches: float, error: float) -> tuple[float, float]:
        u = left + (width_px - left - right) * switches / max_l
        v = top + (height_px - top - bottom) * (hi - math.log10(max(error, 1e-12))) / (hi - lo)
        return u, v

    draw.rectangle([left, top, width_px - right, height_px - bottom], outline="black")
    for e in range(lo, hi + 1):
        u, v = px(0, 10.0**e)
        draw.line([left - 4, v, left, v], fill="black")
        draw.text((8, v - 6), f"1e{e}", fill="black", font=font)
    for switches in range(max_l + 1):
        u, v = px(switches, 10.0**lo)
        draw.line([u, v, u, v + 4], fill="black")
        draw.text((u - 4, v + 6), str(switches), fill="black", font=font)
    draw.text((left, height_px - 22), "switches L (dotted: the theorem's L = 2 ceil(N/p) - 1)", fill="black", font=font)
    draw.text((left, 8), f"trained max_n |Phi(x_n) - y_n|, N = {args.points} pairs in [0,1]^{args.dim}", fill="black")
    _, tol_v = px(0, args.tol)
    for u in range(left, width_px - right, 8):
        draw.line([u, tol_v, u + 4, tol_v], fill=(120, 120, 120))
    for i, t in enumerate(table):
        colour = COLOURS[i % len(COLOURS)]
        pts = [px(c["switches"], c["error"]) for c in curves if c["width"] == t["width"]]
        if len(pts) > 1:
            draw.line(pts, fill=colour, width=2)
        for u, v in pts:
            draw.ellipse([u - 3, v - 3, u + 3, v + 3], fill=colour)
        u, _ = px(t["theorem_L"], 1.0)
        for v in range(top, height_px - bottom, 6):
            draw.line([u, v, u, v + 2], fill=colour)
        ly = top + 16 * i
        draw.line([width_px - right + 12, ly + 6, width_px - right + 32, ly + 6], fill=colour, width=2)
        draw.text((width_px - right + 38, ly), f"p = {t['width']}", fill="black", font=font)
    ly = top + 16 * len(table)
    draw.line([width_px - right + 12, ly + 6, width_px - right + 32, ly + 6], fill=(120, 120, 120))
    draw.text((width_px - right + 38, ly), f"tol {args.tol:g}", fill="black", font=font)
    return image


def markdown(table: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"N = {args.points} pairs uniform in [0, 1]^{args.dim}; trained: learned switch times, {args.steps} Euler "
        f"steps per interval, Adam lr {args.lr:g} (cosine) x {args.iterations}, best of {args.seeds} seeds; "
        f"tolerance max_n |Phi(x_n) - y_n| <= {args.tol:g}",
        "",
        "| width p | smallest trained L reaching the tolerance | trained error at the theorem's L | theorem L | "
        "constructive L (active intervals) | constructive error |",
        "|---|---|---|---|---|---|",
    ]
    for t in table:
        reached = t["smallest_trained_L"] if t["smallest_trained_L"] != "" else f"> {t['theorem_L'] + args.extra}"
        lines.append(
            f"| {t['width']} | {reached} | {t['trained_error_at_theorem_L']:.3f} | {t['theorem_L']} | "
            f"{t['constructive_L']} ({t['constructive_active_intervals']}) | {t['constructive_error']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(int(os.environ.get("ZOO_BENCH_THREADS", "1")))
    curves, table = run(args)
    csv_path, png_path = write_outputs(curves, table, args)
    text = markdown(table, args)
    print(machine_line(torch.device("cpu")))
    print(text)
    print(f"\nwrote {csv_path} and {png_path}")
    return text


if __name__ == "__main__":
    main()
