"""Helpers shared by the figure scripts: command-line options, the CSV beside each PNG, the machine footnote.

Every figure script writes ``<name>.csv`` (its data) and ``<name>.png`` (the figure) under ``--out`` (default
``docs/figures``), each atomically (readers never see a half-written file); ``--small`` runs a few-second version
for the test suite. The PNGs are kept small (about 100 dpi, plain styling, no transparency).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display: files only

import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from zoo.hub import atomic_write  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1]
ROOT = BENCHMARKS.parent
if str(BENCHMARKS) not in sys.path:  # the benchmark scripts and their shared helpers (common.py) beside this folder
    sys.path.insert(0, str(BENCHMARKS))

from common import figure_dir, machine_line  # noqa: E402

DPI = 100
MIB = 2**20


class _FigureParser(argparse.ArgumentParser):
    """Resolves ``--out`` once ``--small`` is known (:func:`common.figure_dir`)."""

    def parse_known_args(self, args: Any = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        parsed, rest = super().parse_known_args(args, namespace)
        if hasattr(parsed, "out"):
            parsed.out = figure_dir(parsed.out, getattr(parsed, "small", False))
        return parsed, rest


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every figure script takes: ``--out`` and ``--small``.

    Args:
        description: the script's one-line description, shown by ``--help``.
    """
    p = _FigureParser(description=description)
    p.add_argument(
        "--out", type=Path, help="folder of the PNG and CSV (default: docs/figures; with --small a temporary folder)"
    )
    p.add_argument("--small", action="store_true", help="a few-second run at small sizes (the test suite's)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine may be shared)")
    return p


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` torch threads, then restore the previous count.

    On a machine shared with other jobs two OpenMP threads can be many times slower than one, so the figures
    measure with one by default.

    Args:
        threads: torch threads inside the block (0: leave the count alone).
    """
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def machine(threads: int = 0) -> str:
    """The machine line of ``benchmarks/common.py`` for the CPU, as a figure footnote.

    Args:
        threads: torch threads the measurements used (0: torch's current count).
    """
    return machine_line(torch.device("cpu"), threads).removeprefix("machine: ")


def write_csv(path: Path, rows: Sequence[dict[str, Any]], comment: str = "") -> Path:
    """Write ``rows`` (dicts with the same keys) as a CSV with a header, atomically; ``comment`` lines first.

    Args:
        path: the CSV file.
        rows: one dict per row; the first row's keys are the columns.
        comment: lines written first, each prefixed with ``# `` (the machine, the command).
    """
    if not rows:
        raise ValueError(f"no rows to write to {path}")
    buf = io.StringIO()
    for line in comment.splitlines():
        buf.write(f"# {line}\n")
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    text = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            f.write(text)

    return atomic_write(path, write)


def read_csv(path: Path) -> list[dict[str, str]]:
    """The rows of a CSV written by :func:`write_csv` (comment lines skipped).

    Args:
        path: the CSV file.
    """
    with open(path, newline="") as f:
        return list(csv.DictReader(line for line in f if not line.startswith("#")))


def save_png(fig: plt.Figure, path: Path, footnote: str) -> Path:
    """Add ``footnote`` (the machine) at the bottom of ``fig`` and save it as a PNG at :data:`DPI`, atomically.

    Args:
        fig: the matplotlib figure; it is closed afterwards.
        path: the PNG file.
        footnote: one or two short lines printed under the axes.
    """
    fig.text(0.01, 0.005, footnote, fontsize=7, color="0.35", ha="left", va="bottom", wrap=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, metadata={"Software": None})
    plt.close(fig)
    data = buf.getvalue()

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def command(script: str, small: bool) -> str:
    """The command that regenerates a figure, for the CSV's comment line.

    Args:
        script: the script's file name under ``benchmarks/figures``.
        small: whether this run was ``--small``.
    """
    return f"python benchmarks/figures/{script}" + (" --small" if small else "")


def report(paths: Sequence[Path]) -> None:
    """Print what was written (relative to the repository where possible).

    Args:
        paths: the files written.
    """
    for p in paths:
        try:
            shown = os.path.relpath(p, ROOT)
        except ValueError:
            shown = str(p)
        print(f"wrote {shown} ({p.stat().st_size / 1024:.0f} KiB)")
