"""Peak resident memory of a training step is flat in depth for memory="reversible" and "adjoint", with glibc's
default allocator (issue 13: a small tensor kept per step, the saved random state, pinned freed blocks of the heap,
so the process grew with depth although the live tensors did not).

One fresh ``python -c`` process, started without any ``MALLOC_*`` variable, imports zoo once and forks a child per
configuration, so every configuration starts from the same heap. A child warms up (one step of a 2-block stack:
one-time allocations of the library), builds the measured stack, hands free heap pages back (``malloc_trim``, so
that no configuration runs on pages left resident by earlier frees), resets VmHWM (``/proc/self/clear_refs``) and
runs two training steps; it reports the peak resident set above the resident set just before them.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

PROBE = r'''
import ctypes, json, os, sys
import torch
import torch.nn as nn
from zoo.nn import ResidualStack
from zoo.ops.fixed_point import set_fused

torch.set_num_threads(1)
set_fused(False)  # eager kernels: no compilation in every child (the stored states do not depend on it)
ROWS, DIM = int(sys.argv[1]), 256


class Wave(nn.Module):
    """f(x) = tanh(w x + b): element-wise, so a step costs little next to the size of its state."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.full((DIM,), 0.5))
        self.b = nn.Parameter(torch.zeros(DIM))

    def forward(self, x):
        return torch.tanh(x * self.w + self.b)


def status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def measure(memory, depth):
    rule = "euler" if memory == "adjoint" else "momentum"
    block = Wave()  # tied: the parameters do not grow with depth
    x = torch.randn(ROWS, DIM)

    def step(stack):
        stack(x).square().mean().backward()

    step(ResidualStack([block] * 2, rule=rule, scale="depth", memory=memory))
    stack = ResidualStack([block] * depth, rule=rule, scale="depth", memory=memory)
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # free heap pages back to the system: every child starts alike
    base = status("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(2):
        step(stack)
    return status("VmHWM:") - base


results = []
for memory, depth in json.loads(sys.argv[2]):
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, str(measure(memory, depth)).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r) as f:
        text = f.read()
    _, code = os.waitpid(pid, 0)
    if code or not text:
        raise SystemExit(f"the child for {memory} at depth {depth} failed (status {code})")
    results.append([memory, depth, int(text)])
print("RESULT " + json.dumps(results))
'''

# The state: 1024 x 256 float32 = 1 MiB, the size. There the old engine (a saved random state per step)
# grew in every run, 36 -> 122 MiB (adjoint) and 49 -> 119 MiB (reversible) from depth 10 to 100, now flat
# (33 -> 32-35, 44-46 -> 45-49); with a 256 KiB state the old growth came and went from run to run.
ROWS = 1024
SMALL, LARGE = 10, 100
MIB = 2**20


def _can_reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc" or not _can_reset_peak(),
    reason="measures glibc's allocator, and needs /proc/self/clear_refs to reset the peak",
)
def test_peak_resident_memory_of_a_training_step_is_flat_in_depth_with_the_default_allocator(tmp_path):
    configs = [["reversible", SMALL], ["reversible", LARGE], ["adjoint", SMALL], ["adjoint", LARGE], ["full", LARGE]]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES"))}  # the defaults
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROWS), json.dumps(configs)],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    peak = {(memory, depth): value for memory, depth, value in json.loads(lines[-1][len("RESULT ") :])}
    state = ROWS * 256 * 4
    for memory in ("reversible", "adjoint"):
        small, large = peak[(memory, SMALL)], peak[(memory, LARGE)]
        # a few MiB of the allocator's own granularity (heap top pad, arenas) is noise: the floor is 8 states
        assert large <= 1.5 * max(small, 8 * state), (
            f"{memory}: peak {large / MIB:.1f} MiB at depth {LARGE} against {small / MIB:.1f} MiB at depth {SMALL}"
        )
        # and far below ordinary autograd, which keeps every step's activations
        assert large < peak[("full", LARGE)] / 5, (memory, large, peak[("full", LARGE)])
