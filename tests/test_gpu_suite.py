"""benchmarks/gpu_suite.py: its smoke run (every step of the GPU suite at tiny sizes on the CPU) and its parts.

The smoke run executes the same code as the GPU run (only the sizes and the device differ), so these tests are
what is known about the suite before it first meets a GPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_suite.py"
sys.path.insert(0, str(SCRIPT.parent))

import gpu_suite  # noqa: E402

TIMEOUT = 300  # a hang guard: the smoke run takes about 20 s on 2 idle cores (a minute on a loaded machine)


def run_suite(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    base = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=cwd,
        env={**base, **(env or {})},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    folder = tmp_path_factory.mktemp("gpu_suite")
    proc = run_suite("--smoke", "--threads", "1", "--md", "out/suite.md", "--json", "out/suite.json", cwd=folder)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {
        "proc": proc,
        "report": json.loads((folder / "out" / "suite.json").read_text()),
        "markdown": (folder / "out" / "suite.md").read_text(),
        "folder": folder,
    }


# ------------------------------------------------------------------------------------------------ smoke run


def test_smoke_run_passes_every_check(smoke: dict) -> None:
    report = smoke["report"]
    assert report["suite"] == "gpu_suite" and report["smoke"] is True
    assert report["complete"] is True and report["passed"] is True
    names = [c["name"] for c in report["checks"]]
    families = {
        "reversible momentum": 3,
        "Sinkhorn attention": 5,
        "topk": 16,
        "MoE": 4,
    }
    for prefix, count in families.items():
        assert sum(prefix in n for n in names) == count, (prefix, names)
    assert len(names) == sum(families.values()) == len(set(names))
    for c in report["checks"]:
        assert c["passed"] is True, c
        assert isinstance(c["max_error"], float) and 0 <= c["max_error"] <= c["tolerance"], c
    # the float64 reversible check is tight, and its error is real round-off, not a vacuous zero
    rev64 = next(c for c in report["checks"] if "reversible" in c["name"] and "float64" in c["name"])
    assert rev64["tolerance"] == 1e-8 and 0 < rev64["max_error"]
    assert "PASS" in smoke["proc"].stderr and "FAIL" not in smoke["proc"].stderr


def test_smoke_run_names_the_machine_and_sizes(smoke: dict) -> None:
    report = smoke["report"]
    machine = report["machine"]
    assert machine["torch"] == torch.__version__ and machine["device"] == "cpu" and machine["gpu"] is None
    assert machine["cuda"] == torch.version.cuda
    assert report["sizes"] == json.loads(json.dumps(dataclasses.asdict(gpu_suite.SMOKE)))
    assert f"torch {torch.__version__}" in smoke["markdown"]
    # nothing half-written: no temporary left beside the reports
    assert sorted(p.name for p in (smoke["folder"] / "out").iterdir()) == ["suite.json", "suite.md"]


def test_smoke_run_has_every_benchmark_table(smoke: dict) -> None:
    sections = smoke["report"]["sections"]
    assert list(sections) == ["resnet", "budget", "sinkhorn", "moe"]
    for name, sec in sections.items():
        assert "error" not in sec and sec["skipped"] == [], (name, sec)
        assert sec["cap_s"] > 0 and 0 < sec["wall_s"]

    resnet = sections["resnet"]["rows"]
    assert [r["method"] for r in resnet] == list(gpu_suite.RESNET_METHODS)
    plain = resnet[0]
    for r in resnet:
        assert len(r["step_times"]) == gpu_suite.SMOKE.repeats and r["step_time"] > 0
        assert isinstance(r["peak_bytes"], int)
        assert r["step_time_ratio"] == pytest.approx(r["step_time"] / plain["step_time"])
    assert plain["step_time_ratio"] == 1.0
    # the stored row: the counts zoo.nn.plan_stored_blocks picked for checkpointing's peak, measured as planned (the
    # step's peak, one measure for both, at or below the budget it was planned for); at the smoke's batch of 2 the
    # reversible stacks' own parameter gradients outweigh the activations and nothing fits: nothing stored
    stored = next(r for r in resnet if r["method"] == "zoo-reversible-stored")
    ck_peak = next(r for r in resnet if r["method"] == "checkpoint")["peak_bytes"]
    if stored["plan"]:
        assert stored["stored_blocks"] == [stored["plan"][f"layer{i}"] for i in range(1, 5)]
        assert stored["peak_bytes"] <= ck_peak
        assert "planned: peak <= checkpointing's" in stored["label"]
    else:
        assert stored["stored_blocks"] == [0, 0, 0, 0]
        assert "no setting found within checkpointing's peak" in stored["label"]
    assert f"stored_blocks=({', '.join(map(str, stored['stored_blocks']))})" in smoke["markdown"]

    budget = sections["budget"]
    assert budget["budget_bytes"] == int(gpu_suite.SMOKE.budget_gib * 2**30)
    assert [r["method"] for r in budget["rows"]] == list(gpu_suite.BUDGET_METHODS)
    for r in budget["rows"]:
        assert r["probes"] and r["probes"][0]["batch"] == 1
        assert 0 <= r["max_batch"] <= gpu_suite.SMOKE.budget_max_batch
        fits = [p["batch"] for p in r["probes"] if p["fits"]]
        assert r["max_batch"] == max(fits, default=0)
        for p in r["probes"]:  # fits means: ran, and the whole step's peak within the budget
            assert p["fits"] == (not p["oom"] and p["peak_bytes"] <= budget["budget_bytes"])

    sinkhorn = sections["sinkhorn"]["rows"]
    assert [r["seq"] for r in sinkhorn] == list(gpu_suite.SMOKE.sinkhorn_seqs)
    for r in sinkhorn:
        assert r["kernel"] == "chunked"  # CPU, short sequences
        assert r["sdpa"]["step_time"] > 0 and r["sinkhorn"]["step_time"] > 0
        assert r["step_time_ratio"] == pytest.approx(r["sinkhorn"]["step_time"] / r["sdpa"]["step_time"])

    moe = sections["moe"]["rows"]
    assert [r["experts"] for r in moe] == list(gpu_suite.SMOKE.bench_moe_experts)
    for r in moe:
        for cell in gpu_suite.MOE_CELLS:
            assert r[cell]["step_time"] > 0
        assert r["token"]["step_time_ratio"] == pytest.approx(r["token"]["step_time"] / r["dense"]["step_time"])


def test_smoke_markdown_has_every_section(smoke: dict) -> None:
    md = smoke["markdown"]
    n = len(smoke["report"]["checks"])
    assert f"{n} of {n} passed" in md and "**FAIL**" not in md and md.count("| PASS |") == n
    sizes = gpu_suite.SMOKE
    for heading in (
        "## Correctness checks",
        f"## ResNet-{sizes.resnet_arch} training step, batch {sizes.resnet_batch}",
        f"## Largest batch within {sizes.budget_gib:g} GiB",
        "## Sinkhorn attention (n_iter 3) vs SDPA",
        "## MoE vs dense MLP",
    ):
        assert heading in md, heading
    for method in gpu_suite.BUDGET_METHODS:
        assert md.count(f"| {gpu_suite.RESNET_LABELS[method]} |") == 2  # the 224 px table and the budget table
    assert md.count(f"| {gpu_suite.RESNET_LABELS['zoo-reversible-stored']}=(") == 1  # the 224 px table
    assert "smoke run (tiny sizes)" in md and "INCOMPLETE" not in md


# ------------------------------------------------------------------------------------------------ refusal


def test_full_run_without_cuda_refuses_with_one_message(tmp_path: Path) -> None:
    started = time.perf_counter()
    proc = run_suite(cwd=tmp_path, env={"CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2
    assert proc.stderr.strip() == gpu_suite.NO_GPU
    assert "--smoke" in proc.stderr and proc.stdout == ""
    assert list(tmp_path.iterdir()) == []  # no report written
    assert time.perf_counter() - started < TIMEOUT


def test_full_run_on_the_cpu_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    md, js = tmp_path / "a.md", tmp_path / "a.json"
    assert gpu_suite.main(["--device", "cpu", "--md", str(md), "--json", str(js)]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("device", "words"), [("tpu", "is not a torch device"), ("meta", "runs on cuda")])
def test_other_devices_are_one_line(device: str, words: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    md, js = tmp_path / "a.md", tmp_path / "a.json"
    assert gpu_suite.main(["--smoke", "--device", device, "--md", str(md), "--json", str(js)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert words in line
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flag", ["--budget-gib", "--max-batch", "--time-limit"])
def test_bad_arguments_are_refused(flag: str) -> None:
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--smoke", flag, "0"])


# ------------------------------------------------------------------------------------------------ parts


def clock(cap: float = 1e6) -> gpu_suite.Clock:
    return gpu_suite.Clock(cap, deadline=math.inf)


def fake_probe(limit: int) -> tuple[list[int], object]:
    seen: list[int] = []

    def probe(b: int) -> dict:
        seen.append(b)
        return {"batch": b, "fits": b <= limit, "peak_bytes": b, "oom": b > limit, "seconds": 1e-6 * b}

    return seen, probe


@pytest.mark.parametrize("limit", [1, 2, 3, 37, 64, 100])
def test_largest_batch_doubles_then_bisects(limit: int) -> None:
    seen, probe = fake_probe(limit)
    best, how, probes = gpu_suite.largest_batch(probe, 512, clock())
    assert (best, how) == (limit, "exact")
    assert [p["batch"] for p in probes] == seen
    doubling = [2**i for i in range(11) if 2 ** (i - 1) <= limit]  # up to the first failure
    assert seen[: len(doubling)] == doubling
    assert len(seen) <= len(doubling) + math.ceil(math.log2(max(2, limit)))


def test_largest_batch_at_the_cap_and_when_nothing_fits() -> None:
    seen, probe = fake_probe(10_000)
    assert gpu_suite.largest_batch(probe, 48, clock())[:2] == (48, "at least (cap)")
    assert seen == [1, 2, 4, 8, 16, 32, 48]
    seen, probe = fake_probe(0)
    assert gpu_suite.largest_batch(probe, 48, clock())[:2] == (0, "exact") and seen == [1]


def test_largest_batch_stops_at_the_time_cap() -> None:
    seen, probe = fake_probe(1000)
    expired = gpu_suite.Clock(1e6, deadline=time.perf_counter() - 1)
    assert not expired.allows(0)
    best, how, _ = gpu_suite.largest_batch(probe, 512, expired)
    assert (best, how, seen) == (1, "at least (time cap)", [1])  # the first probe always runs
    assert clock(100).allows(1) and not clock(100).allows(1000)


@pytest.mark.parametrize("section", gpu_suite.BENCHMARKS)
def test_a_section_past_its_time_cap_skips_everything_and_says_so(section: str) -> None:
    bench = getattr(gpu_suite, f"bench_{section}")
    expired = gpu_suite.Clock(1e6, deadline=time.perf_counter() - 1)
    result = bench(torch.device("cpu"), gpu_suite.SMOKE, expired, time.perf_counter())
    items = {
        "resnet": gpu_suite.RESNET_METHODS,
        "budget": gpu_suite.BUDGET_METHODS,
        "sinkhorn": [f"{s} tokens" for s in gpu_suite.SMOKE.sinkhorn_seqs],
        "moe": [f"{e} experts" for e in gpu_suite.SMOKE.bench_moe_experts],
    }[section]
    assert result["rows"] == []
    assert [s["item"] for s in result["skipped"]] == list(items)
    assert all(s["reason"].startswith("time cap") for s in result["skipped"])
    sizes = dataclasses.asdict(gpu_suite.SMOKE)
    text = "\n".join(gpu_suite._section_markdown(section, {**result, "cap_s": 0.0, "wall_s": 0.0}, sizes, ""))
    assert all(f"- skipped {item}: time cap" in text for item in items)


class OutOfMemoryAbove(nn.Module):
    """Logits for 1000 classes from 3x8x8 images; the allocator 'fails' above ``limit`` samples."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.linear = nn.Linear(3 * 8 * 8, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB (simulated)")
        return self.linear(x.flatten(1))


def test_budget_probe_catches_out_of_memory_and_the_search_goes_on() -> None:
    sizes = dataclasses.replace(gpu_suite.SMOKE, budget_size=8)
    model = OutOfMemoryAbove(5)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = gpu_suite.state_tensors(model)
    cpu = torch.device("cpu")

    def probe(b: int) -> dict:
        return gpu_suite.budget_probe(model, opt, b, sizes, cpu, 2**40, state)

    best, how, probes = gpu_suite.largest_batch(probe, 64, clock())
    assert (best, how) == (5, "exact")
    assert [(p["batch"], p["fits"], p["oom"]) for p in probes] == [
        (1, True, False),
        (2, True, False),
        (4, True, False),
        (8, False, True),
        (6, False, True),
        (5, True, False),
    ]
    assert all(p["peak_bytes"] is None for p in probes if p["oom"])
    # over the budget without an out-of-memory error does not fit either
    over = gpu_suite.budget_probe(model, opt, 2, sizes, cpu, 1, state)
    assert over["fits"] is False and over["oom"] is False and over["peak_bytes"] > 1
    # an error that is not out-of-memory is not swallowed
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        gpu_suite.budget_probe(model, opt, 2, dataclasses.replace(sizes, budget_size=4), cpu, 2**40, state)


def test_budget_probe_turns_the_fused_kernels_back_on_after_out_of_memory() -> None:
    """A probe that ran out of memory leaves the fused kernels as they were before it, even if they fell back to
    eager during it (a failed compilation does that; an out-of-memory error in a compiled kernel is raised as it
    is, zoo/ops/compiled.py)."""
    from zoo.ops import fixed_point

    class FallsBackThenFails(OutOfMemoryAbove):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            fixed_point.set_fused(False)  # what the kernels' eager fallback does when a compiled call raises
            return super().forward(x)

    sizes = dataclasses.replace(gpu_suite.SMOKE, budget_size=8)
    model = FallsBackThenFails(1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    state = gpu_suite.state_tensors(model)
    before = fixed_point.fused_enabled()
    try:
        for start in (True, False):
            fixed_point.set_fused(start)
            assert gpu_suite.budget_probe(model, opt, 2, sizes, torch.device("cpu"), 2**40, state)["oom"]
            assert fixed_point.fused_enabled() is start
    finally:
        fixed_point.set_fused(before)


def test_relative_error_and_check_verdicts() -> None:
    a, b = torch.tensor([1.0, 2.0, 4.0]), torch.tensor([1.0, 2.0, 3.0])
    assert gpu_suite.relative_error([a], [b]) == pytest.approx(1 / 3)
    assert gpu_suite.relative_error([b, a], [b, b]) == pytest.approx(1 / 3)
    assert math.isnan(gpu_suite.relative_error([torch.tensor([math.nan])], [torch.tensor([1.0])]))
    assert gpu_suite.relative_error([torch.ones(2)], [torch.ones(3)]) == math.inf
    assert gpu_suite.check_result("x", "r", 1e-5, 1e-4).passed
    assert not gpu_suite.check_result("x", "r", 1e-3, 1e-4).passed
    assert not gpu_suite.check_result("x", "r", math.nan, 1e-4).passed
    assert not gpu_suite.check_result("x", "r", 0.0, 1e-4, ["dispatch differs"]).passed


def test_sinkhorn_check_fails_when_the_op_is_not_sinkhorn(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check is not vacuous: softmax attention in place of the op (one row step, no column step) fails it."""
    import zoo.ops.sinkhorn

    cpu = torch.device("cpu")
    assert gpu_suite.check_sinkhorn(cpu, gpu_suite.SMOKE, "padding").passed
    real = zoo.ops.sinkhorn.attention
    monkeypatch.setattr(zoo.ops.sinkhorn, "attention", lambda q, k, v, mask, n_iter: real(q, k, v, mask, n_iter=1))
    failed = gpu_suite.check_sinkhorn(cpu, gpu_suite.SMOKE, "padding")
    assert not failed.passed and failed.max_error > 100 * failed.tolerance


# ------------------------------------------------------------------------------------------------ GPU


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_smoke_run_on_cuda(tmp_path: Path) -> None:
    proc = run_suite("--smoke", "--device", "cuda", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert report["passed"] and report["machine"]["gpu"] == torch.cuda.get_device_name()


# ------------------------------------------------------------------------------------------------ failures on the GPU


def test_a_section_that_fails_keeps_the_rows_it_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A section that raises midway (a kernel failing at the second size) keeps the rows measured before, says
    why it stopped, and the next section still runs; the reports are complete and the exit status is 1."""
    sizes = gpu_suite.SMOKE
    first, second = sizes.sinkhorn_seqs[:2]
    cell = {"peak_bytes": 1024, "peak_method": "test", "step_times": [1e-3], "step_time": 1e-3}

    def attention_cell(fn: object, seq: int, sizes: gpu_suite.Sizes, device: torch.device) -> dict:
        if seq == second:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return dict(cell)

    def bench_moe(device, sizes, clock, started, out=None):  # the next section: one row, as bench_moe writes it
        out = {"rows": [], "skipped": []} if out is None else out
        out["rows"].append({"experts": 2, **{c: dict(cell) for c in gpu_suite.MOE_CELLS}})
        return out

    monkeypatch.setattr(gpu_suite, "run_checks", lambda device, sizes, started, on_check=None: [])
    monkeypatch.setattr(gpu_suite, "_attention_cell", attention_cell)
    monkeypatch.setattr(gpu_suite, "bench_moe", bench_moe)
    md, js = tmp_path / "a.md", tmp_path / "a.json"
    argv = ["--smoke", "--sections", "sinkhorn", "moe", "--md", str(md), "--json", str(js)]
    assert gpu_suite.main(argv) == 1
    assert "section error(s): sinkhorn" in capsys.readouterr().err
    report = json.loads(js.read_text())
    assert report["complete"] is True and report["passed"] is False
    sinkhorn = report["sections"]["sinkhorn"]
    assert [r["seq"] for r in sinkhorn["rows"]] == [first]
    assert sinkhorn["rows"][0]["sinkhorn"]["step_time"] == cell["step_time"]
    assert sinkhorn["error"].startswith("RuntimeError: CUDA error: an illegal memory access")
    assert [r["experts"] for r in report["sections"]["moe"]["rows"]] == [2]
    text = md.read_text()
    assert "**ERROR**: RuntimeError: CUDA error" in text and f"| {first} | " in text


def test_emptying_the_cache_after_a_sticky_cuda_error_does_not_end_the_run(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """After an illegal access every CUDA call raises, torch.cuda.empty_cache included: the cleanup between checks
    and sections says so and returns, so that the failed check or section is what the report shows."""

    def empty_cache() -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors ...")

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    gpu_suite.free(torch.device("cuda"), collect=True)
    assert "emptying the CUDA cache failed: CUDA error: an illegal memory access" in capsys.readouterr().err


class FakeAllocator:
    """torch.cuda's memory-fraction calls on an 80 GiB card, recorded (the allocator state they set, no GPU)."""

    total = 80 * 2**30

    def __init__(self, fraction: float) -> None:
        self.fraction = fraction
        self.calls: list[tuple[str, float | None]] = []

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        props = type("Props", (), {"total_memory": self.total})()
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
        monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: self.fraction)
        monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", self.set_fraction)
        monkeypatch.setattr(torch.cuda, "empty_cache", lambda: self.calls.append(("empty_cache", None)))

    def set_fraction(self, fraction: float, device: object = None) -> None:
        assert isinstance(fraction, float) and 0 <= fraction <= 1  # what torch.cuda accepts
        self.fraction = fraction
        self.calls.append(("fraction", fraction))


def test_memory_budget_limits_the_allocator_and_restores_its_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeAllocator(fraction=0.75)  # a limit set before the suite (by its caller) is put back, not lifted
    fake.install(monkeypatch)
    monkeypatch.setattr(gc, "collect", lambda *args: 0)  # a full collection takes a second here; nothing to free
    cuda = torch.device("cuda", 0)
    for fails in (False, True):
        fake.calls.clear()
        with pytest.raises(RuntimeError, match="inside") if fails else contextlib.nullcontext():
            with gpu_suite.memory_budget(cuda, 16 * 2**30):
                assert fake.fraction == 16 / 80
                # the cache was emptied before the limit was set (the limit counts the allocator's cached blocks)
                assert fake.calls == [("empty_cache", None), ("fraction", 16 / 80)]
                if fails:
                    raise RuntimeError("inside")
        assert fake.fraction == 0.75 and fake.calls[-1] == ("empty_cache", None)
    with gpu_suite.memory_budget(cuda, 100 * 2**30):  # more than the card: no limit below the card
        assert fake.fraction == 1.0


def test_a_run_cut_short_during_the_checks_keeps_the_checks_done(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The report is written after every check: a run stopped by the machine's time limit in the middle of the
    checks still leaves the verdicts it reached (marked incomplete)."""
    done = gpu_suite.Check("reversible momentum stub", "-", True, 0.0, 1e-8)
    monkeypatch.setattr(gpu_suite, "check_reversible_mlp", lambda *args: done)

    def killed(*args: object) -> None:
        raise KeyboardInterrupt  # what a kill looks like from inside: nothing after it runs

    monkeypatch.setattr(gpu_suite, "check_reversible_resnet", killed)
    with pytest.raises(KeyboardInterrupt):
        gpu_suite.main(["--smoke", "--md", str(tmp_path / "r.md"), "--json", str(tmp_path / "r.json")])
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["complete"] is False and [c["name"] for c in report["checks"]] == [done.name] * 2
    assert "INCOMPLETE" in (tmp_path / "r.md").read_text()
