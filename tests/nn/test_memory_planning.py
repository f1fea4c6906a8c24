"""Planning ``stored_blocks`` for a memory budget (zoo.nn.plan_stored_blocks) and the step peak it measures
(zoo.nn.step_peak_bytes). The peak is checked against tensors of known sizes; the plan against the budget by
measuring its peak and that of one more stored block independently."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from test_momentum import mlp_blocks

import zoo
from zoo.errors import ZooError
from zoo.nn import ResidualStack, plan_stored_blocks, step_peak_bytes


def test_step_peak_counts_live_tensor_bytes_from_the_start():
    def step():
        a = torch.empty(1000, 1000)  # 4,000,000 bytes
        b = torch.empty(250, 1000)  # 1,000,000 bytes with a: 5,000,000
        del a, b
        c = torch.empty(1250, 1000, dtype=torch.float64)  # 10,000,000 bytes alone
        del c

    assert step_peak_bytes(step, "cpu") == 10_000_000
    assert step_peak_bytes(lambda: None, torch.device("cpu")) == 0


def test_step_peak_on_cpu_keeps_counting_tensors_allocated_before_it():
    # the profiler sees no free of a tensor allocated before it started: an upper bound, never an undercount
    before = [torch.empty(2_000_000)]  # 8,000,000 bytes

    def step():
        before.clear()
        a = torch.empty(1_000_000)  # 4,000,000 bytes
        del a

    assert step_peak_bytes(step, "cpu") == 4_000_000


def test_step_peak_ignores_frees_of_blocks_an_earlier_window_saw():
    # the allocator reports the free of a block it saw allocated in an earlier profiled window (with that size,
    # even where the address was reused since): a free counts only for a block allocated during the step
    kept = []
    step_peak_bytes(lambda: kept.append(torch.empty(2_000_000)), "cpu")  # 8,000,000 bytes, allocated while profiled

    def step():
        kept.clear()  # its free is reported: -8,000,000
        a = torch.empty(1_000_000)  # 4,000,000 bytes
        del a

    assert step_peak_bytes(step, "cpu") == 4_000_000


# kineto's log lines (its C++ Logger writes them to file descriptor 2): "STAGE:2024-01-01 12:00:00 1:1 File.cpp:38] ..."
KINETO_LINE = re.compile(
    r"^(VERBOSE|INFO|WARNING|STAGE|ERROR|USDT):\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \d+:\d+ .+?:\d+\] ", re.M
)

# measured in a fresh process (kineto reads KINETO_LOG_LEVEL once, as its first profile starts): a step that writes to
# stderr from Python (a print, a warning) and below it (the file descriptor), twice; a step that raises; then, with
# KINETO_LOG_LEVEL set (after kineto started: its log level stays, the user's choice is read at each measure), once more
MEASURE_ON_CPU = r"""
import os, sys, warnings
import torch
from zoo.nn import step_peak_bytes

warnings.simplefilter("always")

def step():
    a = torch.empty(1000, 1000)  # 4,000,000 bytes
    print("user print", file=sys.stderr)
    warnings.warn("user warning")
    os.write(2, b"user fd write\n")
    del a

def failing():
    raise RuntimeError("the step failed")

print(step_peak_bytes(step, "cpu"), step_peak_bytes(step, "cpu"))
try:
    step_peak_bytes(failing, "cpu")
except RuntimeError as e:
    print("caught:", e, file=sys.stderr)
print("after", file=sys.stderr, flush=True)
os.environ["KINETO_LOG_LEVEL"] = "0"
print("KINETO_LOG_LEVEL=0", file=sys.stderr, flush=True)
print(step_peak_bytes(lambda: torch.empty(1000, 1000), "cpu"))
"""


@pytest.fixture(scope="module")
def stderr_measuring_on_cpu():
    """The subprocess's stderr: before KINETO_LOG_LEVEL was set, and after."""
    env = {k: v for k, v in os.environ.items() if k not in ("KINETO_LOG_LEVEL", "PYTHONWARNINGS")}
    proc = subprocess.run([sys.executable, "-c", MEASURE_ON_CPU], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["4000000", "4000000", "4000000"]
    before, marker, after = proc.stderr.partition("KINETO_LOG_LEVEL=0\n")
    assert marker, proc.stderr
    return before, after


def test_step_peak_on_cpu_writes_no_profiler_log_and_keeps_the_steps_own_stderr(stderr_measuring_on_cpu):
    """torch.profiler's kineto logs each profile's start and stop ("USDT: ... profiler_start", "STAGE: ... Completed
    Stage: Warm Up", ...) to file descriptor 2 from C++: none of it reaches stderr, while what the step writes
    there (a print, a warning, a write to the descriptor) does, in order, also after a step that raised."""
    stderr, _ = stderr_measuring_on_cpu
    assert not KINETO_LINE.search(stderr), stderr
    assert stderr.count("user print\n") == 2 and stderr.count("UserWarning: user warning\n") == 2, stderr
    assert stderr.count("user fd write\n") == 2, stderr
    assert stderr.index("user print") < stderr.index("user fd write") < stderr.rindex("user print"), stderr
    assert stderr.endswith("caught: the step failed\nafter\n"), stderr


@pytest.mark.skipif(not torch.profiler.kineto_available(), reason="needs torch.profiler's kineto")
def test_step_peak_on_cpu_leaves_the_profiler_log_to_a_set_kineto_log_level(stderr_measuring_on_cpu):
    # KINETO_LOG_LEVEL set is the user's choice of kineto's log: passed through as it is (kineto logs every start
    # and stop, "USDT: ... profiler_start", at its default level and at any below 6)
    _, stderr = stderr_measuring_on_cpu
    assert KINETO_LINE.search(stderr), stderr


def test_step_peak_refuses_other_devices():
    with pytest.raises(ZooError, match="CUDA or CPU"):
        step_peak_bytes(lambda: None, "meta")


def mlp_stacks(memory="reversible"):
    """Three momentum stacks of MLP blocks (3, 4 and 3 steps) with wide hidden layers and a large batch: a stored
    block's activations (two 1 MiB tensors) outweigh everything else, so the peak grows with every stored block."""
    model = nn.Sequential(
        *[
            ResidualStack(mlp_blocks(d, dim=16, hidden=256, seed=i), rule="momentum", memory=memory, gamma=0.9)
            for i, d in enumerate((3, 4, 3))
        ]
    )
    x = torch.randn(1024, 16, generator=torch.Generator().manual_seed(1))
    return model, lambda: model(x).square().mean().backward()


def counts(model):
    return tuple(s.stored_blocks for s in model)


def measured(model, step, stored):
    """The step's peak with ``stored`` blocks, measured here (a warm-up call, gradients cleared before each)."""
    for s, k in zip(model, stored):
        s.stored_blocks = k
    model.zero_grad(set_to_none=True)
    step()
    model.zero_grad(set_to_none=True)
    peak = step_peak_bytes(step, "cpu")
    model.zero_grad(set_to_none=True)
    return peak


def test_plan_stores_the_blocks_that_fit_and_not_one_more():
    model, step = mlp_stacks()
    # a budget between the step with the last stack and one block of the middle one stored, and the step with two
    fits, over = measured(model, step, (0, 1, 3)), measured(model, step, (0, 2, 3))
    assert measured(model, step, (0, 0, 3)) < fits < over  # every stored block raises the peak
    budget = (fits + over) // 2
    for s in model:
        s.stored_blocks = 0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.random.get_rng_state()

    plan = plan_stored_blocks(model, step, budget)

    assert plan == {"0": 0, "1": 1, "2": 3}
    assert counts(model) == (0, 1, 3)
    # the plan fits; one more stored block (in the stack where the search stopped) does not
    assert measured(model, step, (0, 1, 3)) <= budget < measured(model, step, (0, 2, 3))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert torch.equal(torch.random.get_rng_state(), rng)


def small_resnet(**kwargs):
    torch.manual_seed(0)
    model = zoo.momentum_cifar_resnet(layers=(2, 4, 3), widths=(4, 8, 16), block="bottleneck", num_classes=3, **kwargs)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 3, (4,), generator=g)
    return model, lambda: F.cross_entropy(model(x), y).backward()


def test_plan_of_a_momentum_resnet_restores_its_state():
    """Every stage stored when the budget allows; BatchNorm statistics, step counts, gradients kept."""
    model, step = small_resnet()
    step()
    grads = [p.grad.clone() for p in model.parameters()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    plan = plan_stored_blocks(model, step, 2**40)
    assert plan == {"layer1": 1, "layer2": 3, "layer3": 2}  # each stage's residual steps (its first block apart)
    assert (model.layer1.stored_blocks, model.layer2.stored_blocks, model.layer3.stored_blocks) == (1, 3, 2)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_planned_resnet_saves_and_reloads_its_plan(tmp_path, monkeypatch):
    """The plan is recorded in the model's hparams, so save_pretrained (and checkpoints) rebuild the planned counts;
    a failed plan records nothing. Simulated peaks (MiB) give a plan that stores part of a stage."""
    import zoo.nn.memory.planning as planning

    model, step = small_resnet(stored_blocks=(0, 1, 0))
    stages = lambda m: tuple(s.stored_blocks for s in m.stages)  # noqa: E731
    fake = {(0, 0, 0): 900, (0, 0, 2): 700, (0, 3, 2): 800, (0, 1, 2): 740, (0, 2, 2): 750}
    monkeypatch.setattr(planning, "step_peak_bytes", lambda step, device: fake[stages(model)] * 2**20)
    with pytest.raises(ZooError, match="no setting tried"):
        plan_stored_blocks(model, step, 600 * 2**20)
    assert list(model.hparams.stored_blocks) == [0, 1, 0]

    assert plan_stored_blocks(model, step, 760 * 2**20) == {"layer1": 0, "layer2": 2, "layer3": 2}
    assert list(model.hparams.stored_blocks) == [0, 2, 2]
    model.save_pretrained(tmp_path / "planned")
    loaded = zoo.from_pretrained(tmp_path / "planned")
    assert stages(loaded) == (0, 2, 2)
    assert stages(zoo.momentum_cifar_resnet(weights=str(tmp_path / "planned"))) == (0, 2, 2)


def test_out_of_memory_counts_as_over_the_budget():
    model, step = mlp_stacks()

    def step_on_a_small_card():
        if model[1].stored_blocks >= 2:
            raise torch.OutOfMemoryError("simulated: the card is full")
        step()

    assert plan_stored_blocks(model, step_on_a_small_card, 2**40) == {"0": 0, "1": 1, "2": 3}


def test_plan_refuses_a_budget_no_setting_fits_and_leaves_the_counts():
    model, step = mlp_stacks()
    model[1].stored_blocks, model[2].stored_blocks = 1, 2
    with pytest.raises(ZooError, match="no setting tried keeps the step within .* every block rebuilt .* raise budget"):
        plan_stored_blocks(model, step, 1000)
    assert counts(model) == (0, 1, 2)


def test_a_whole_stack_stored_can_bring_an_over_budget_step_within_it(monkeypatch):
    """Storing a whole stack can lower the peak (its gradients go straight into .grad): the search tries it even when
    the rebuilt step is over the budget. Simulated peaks (MiB) make the case exact."""
    import zoo.nn.memory.planning as planning

    model, step = mlp_stacks()
    fake = {(0, 0, 0): 900, (0, 0, 3): 700, (0, 4, 3): 800, (0, 1, 3): 750, (0, 2, 3): 820}
    monkeypatch.setattr(planning, "step_peak_bytes", lambda step, device: fake[counts(model)] * 2**20)
    assert plan_stored_blocks(model, step, 760 * 2**20) == {"0": 0, "1": 1, "2": 3}
    # over the budget with the last stack rebuilt and whole: nothing found, the counts left as they were
    with pytest.raises(ZooError, match=r"needs 900.0 MiB, at least 700.0 MiB \(stored_blocks \(0, 0, 3\)\)"):
        plan_stored_blocks(model, step, 600 * 2**20)
    assert counts(model) == (0, 1, 3)


@pytest.mark.parametrize("budget", [0, -5, 1.5e9, True])
def test_plan_refuses_bad_budgets(budget):
    model, step = mlp_stacks()
    with pytest.raises(ZooError, match="budget_bytes must be a positive number of bytes"):
        plan_stored_blocks(model, step, budget)


def test_plan_needs_reversible_stacks():
    model, step = mlp_stacks(memory="full")
    with pytest.raises(ZooError, match="no memory='reversible' ResidualStack"):
        plan_stored_blocks(model, step, 2**30)
