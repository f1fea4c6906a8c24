"""Helpers shared by the benchmarks: the machine line of a report, and peak memory of one step.

Each benchmark measures memory in a fresh process per configuration.

On CUDA the peak is ``torch.cuda.max_memory_allocated``; on CPU it is the process's resident-set high-water
mark (VmHWM), reset just before the measured step through ``/proc/self/clear_refs`` where the kernel allows,
so that import and build peaks do not count.
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch


def summary(doc: str | None) -> str:
    """A script's ``--help`` description: the first paragraph of its docstring ``doc``, on one line (its first line
    alone ends mid-sentence when the sentence wraps)."""
    return " ".join((doc or "").strip().split("\n\n")[0].split())


def figure_dir(out: str | os.PathLike | None, small: bool) -> Path:
    """Where a figure script writes its PNG and CSV: ``out`` when given; else the docs' figures folder for a full
    run, and a temporary folder for a ``--small`` run (a few-second run's numbers must not replace the docs'
    figures).

    Args:
        out: the ``--out`` folder given on the command line; None for the default.
        small: whether the run is the small one.
    """
    if out is not None:
        return Path(out)
    if small:
        return Path(tempfile.gettempdir()) / "zoo-figures-small"
    return Path(__file__).resolve().parents[1] / "docs" / "figures"


def machine_line(device: torch.device, threads: int = 0) -> str:
    """Processor, cores, torch threads (``threads``, or torch's current count when 0), torch, device, date."""
    dev = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    proc = platform.processor() or platform.machine()
    return (
        f"machine: {proc}, {os.cpu_count()} CPUs, {threads or torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, device {dev}; date {datetime.date.today().isoformat()}"
    )


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_seconds(step: Callable[[], object], device: torch.device, repeats: int, warmup: int = 0) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``step``, after ``warmup`` untimed calls.

    On CUDA each call is bracketed by CUDA events on the current stream (the device's clock: from the first
    kernel the call queues to the end of its last, host launch gaps included), read after one synchronisation at
    the end, so the host never waits between calls; elsewhere ``time.perf_counter`` around each call.
    """
    for _ in range(warmup):
        step()
    if device.type != "cuda":
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            times.append(time.perf_counter() - t0)
        return times
    sync(device)
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in events:
        start.record()
        step()
        end.record()
    sync(device)
    return [start.elapsed_time(end) / 1e3 for start, end in events]


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def reset_high_water() -> bool:
    """Reset this process's peak RSS (VmHWM); False where the kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def peak_working_bytes(step: Callable[[], object], device: torch.device) -> dict[str, object]:
    """Run ``step`` once; its peak memory above what was live before it, and how that was measured."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        sync(device)
        return {
            "peak_bytes": torch.cuda.max_memory_allocated(device) - base,
            "peak_method": "cuda.max_memory_allocated",
        }
    base = rss_bytes()
    reset = reset_high_water()
    step()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    # ru_maxrss also holds the import peaks; VmHWM reset just before the step does not.
    peak = high_water_bytes() if reset else maxrss
    return {
        "peak_bytes": peak - base,
        "baseline_rss": base,
        "ru_maxrss_after": maxrss,
        "peak_method": "VmHWM reset before the step" if reset else "ru_maxrss",
    }
