"""The figure scripts of benchmarks/figures run at a small size and write a PNG and its CSV; the relaxed top-k
worked example has the published properties, checked on the figure's own data against an independent solution."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

FIGURES = Path(__file__).resolve().parents[2] / "benchmarks" / "figures"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def load(name: str):
    """Import benchmarks/figures/<name>.py as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"figure_{name}", FIGURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def rows_of(path: Path) -> list[dict[str, str]]:
    return load("figure_common").read_csv(path)


@pytest.mark.parametrize(
    "name, columns",
    [
        ("relaxed_topk", {"s", "hard", "p2", "p4_3"}),
        ("adjoint_gradient_error", {"rule", "depth", "seed", "grad_rel_err"}),
        ("memory_vs_depth", {"method", "depth", "peak_mib"}),
        ("sinkhorn_scaling", {"method", "seq", "time_s", "peak_mib"}),
        ("nested_rings", {"rule", "seed", "train_acc", "test_acc"}),
        ("moe_load", {"routing", "expert", "tokens"}),
    ],
)
def test_figure_script_writes_png_and_csv(name, columns, tmp_path):
    paths = load(name).main(["--small", "--out", str(tmp_path)])
    assert sorted(p.name for p in paths) == [f"{name}.csv", f"{name}.png"]
    png = (tmp_path / f"{name}.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) < 100_000
    rows = rows_of(tmp_path / f"{name}.csv")
    assert rows and columns <= set(rows[0])
    text = (tmp_path / f"{name}.csv").read_text()
    assert f"python benchmarks/figures/{name}.py --small" in text and "CPUs" in text  # command and machine
    assert sorted(q.name for q in tmp_path.iterdir()) == [f"{name}.csv", f"{name}.png"]  # no temporary left


def test_figure_data_is_what_it_says(tmp_path):
    """Each small run's numbers obey what the figure claims by construction (not the full-size findings)."""
    load("moe_load").main(["--small", "--out", str(tmp_path)])
    rows = rows_of(tmp_path / "moe_load.csv")
    by = {}
    for r in rows:
        by.setdefault(r["routing"], []).append(int(r["tokens"]))
    tokens = 2 * 64  # the small run's batch x seq
    assert sum(by["token choice, no capacity limit"]) == tokens  # k = 1, nothing dropped
    capped = by["token choice, capacity factor 1.25"]
    assert max(capped) <= -(-1.25 * tokens // 8)  # C = ceil(1.25 T / E)
    assert all(c <= d for c, d in zip(capped, by["token choice, no capacity limit"], strict=True))
    assert len(set(by["expert choice, capacity factor 1"])) == 1  # balanced by construction


def bisection_mask(x: torch.Tensor, k: int, lam: float, power: int) -> torch.Tensor:
    """sum_i clip((x_i - g) / lam, 0, 1)^power = k solved for g by bisection (float64), then the mask.

    The relaxed mask's stationarity conditions: y_i = clip((x_i - g) / lam, 0, 1) for p = 2 (power 1) and its cube
    for p = 4/3 (power 3), with one threshold g per row; the sum is non-increasing in g.
    """
    lo = x.min(-1, keepdim=True).values - lam - 1
    hi = x.max(-1, keepdim=True).values + 1
    for _ in range(200):
        mid = (lo + hi) / 2
        total = ((x - mid) / lam).clamp(0, 1).pow(power).sum(-1, keepdim=True)
        lo, hi = torch.where(total > k, mid, lo), torch.where(total > k, hi, mid)
    return ((x - (lo + hi) / 2) / lam).clamp(0, 1).pow(power)


def test_relaxed_topk_worked_example_properties():
    """x(s) = (3, 1, -1 + s, s), k = 2: hard is a step, p = 2 piecewise linear and continuous, p = 4/3 smooth,
    both relaxed curves exactly 0 on an interval; the curves equal an independent bisection solution."""
    fig = load("relaxed_topk")
    curves = fig.worked_example(701)
    s, hard, p2, p43 = curves["s"], curves["hard"], curves["p=2"], curves["p=4/3"]
    h = float(s[1] - s[0])
    x = torch.stack([torch.full_like(s, 3.0), torch.ones_like(s), s - 1, s], -1)
    torch.testing.assert_close(p2, bisection_mask(x, 2, fig.LAM, 1)[:, 1:3].sum(-1), atol=1e-9, rtol=0)
    torch.testing.assert_close(p43, bisection_mask(x, 2, fig.LAM, 3)[:, 1:3].sum(-1), atol=1e-9, rtol=0)

    # hard: a step, 1 below s = 1, 0 on (1, 4), 1 above 4 (ties at 1 and 4 excluded)
    off_ties = ((s - 1).abs() > 1e-9) & ((s - 4).abs() > 1e-9)
    expected = ((s < 1) | (s > 4)).double()
    assert torch.equal(hard[off_ties], expected[off_ties])

    # both relaxed: exactly 0 on [2, 3], positive just outside, continuous (no jump larger than a slope bound)
    zero = (s >= 2) & (s <= 3)
    for y in (p2, p43):
        assert torch.equal(y[zero], torch.zeros(int(zero.sum()), dtype=y.dtype))
        assert (y[(s > 1.5) & (s < 1.95)] > 0).all() and (y[(s > 3.05) & (s < 3.5)] > 0).all()
        assert (y[1:] - y[:-1]).abs().max() <= 1.01 * h  # |dy/ds| <= 1: Lipschitz, so continuous

    # p = 2: piecewise linear: the slope takes only the values 0 and +-1/2 between kinks (at s = 0, 1, 2, 3, 4, 5)
    slope2 = (p2[1:] - p2[:-1]) / h
    mid = (s[1:] + s[:-1]) / 2
    away = torch.stack([(mid - c).abs() > h for c in range(6)]).all(0)
    values = slope2[away]
    assert (torch.isclose(values.abs(), torch.tensor(0.5, dtype=values.dtype), atol=1e-9) | (values.abs() < 1e-9)).all()
    assert (values.abs() > 0.49).any() and (values.abs() < 1e-9).any()

    # p = 4/3: smooth: the slope changes by O(h) between neighbouring grid points (no kink), while p = 2's jumps
    slope43 = (p43[1:] - p43[:-1]) / h
    assert (slope43[1:] - slope43[:-1]).abs().max() < 0.05
    assert (slope2[1:] - slope2[:-1]).abs().max() > 0.4
