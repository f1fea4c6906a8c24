"""The ``zoo: error:`` line under a distributed launch (zoo/cli.py ``main``): each distinct error once per machine,
printed by whichever process meets it; the usual case (every process meets the same error) is one line.

The processes of one "launch" are real ``python -m zoo.cli`` processes given the environment a launcher gives them
(``LOCAL_RANK``, ``WORLD_SIZE`` and what keys the launch: Lightning's launcher passes on the first process's
``ZOO_LAUNCH_ID``; torchrun's processes share their parent, the run id and the restart count). They fail fast (a
``--config`` file that does not exist). Each run has its own ``TMPDIR``, where the processes keep their record.
Two real Lightning DDP runs (2 CPU processes) are marked ``distributed``, as in tests/test_distributed.py.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import lightning.pytorch as pl
import pytest

from zoo.cli import ERROR_RECORD_MAX_AGE_S, ERROR_RECORD_PREFIX, LAUNCH_ID_ENV, _first_to_meet, main
from zoo.errors import ZooError

ROOT = Path(__file__).resolve().parents[1]
TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 240  # one process fails within seconds (importing torch and Lightning); a loaded machine is slower

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")


def _launch_id() -> str:
    """A ``ZOO_LAUNCH_ID`` as the first process of a Lightning launch makes it: that process is this one here,
    the parent of the processes started below."""
    return f"{os.getpid()}-{uuid.uuid4().hex}"


def _env(tmp: Path, **launch: str | int) -> dict[str, str]:
    """This environment with no launch in it, ``TMPDIR`` set to ``tmp`` and the ``launch`` variables added."""
    names = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", LAUNCH_ID_ENV)
    env = {k: v for k, v in os.environ.items() if k not in names and not k.startswith(("TORCHELASTIC_", "SLURM_"))}
    env.update({k: str(v) for k, v in launch.items()})
    env.update(
        TMPDIR=str(tmp),
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
        PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    )
    return env


def _start(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "zoo.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group: a DDP run's second process is stopped with it
    )


def _communicate(proc: subprocess.Popen[str], timeout: float) -> tuple[str, str]:
    """``proc``'s stdout and stderr; after ``timeout`` seconds its process group is killed and the test fails."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise


def _finish(procs: list[subprocess.Popen[str]]) -> tuple[list[int], list[str]]:
    """Exit codes and the ``zoo: error:`` lines of all of ``procs`` (killed after ``TIMEOUT_S``)."""
    codes, lines = [], []
    deadline = time.monotonic() + TIMEOUT_S
    for proc in procs:
        _, err = _communicate(proc, max(1.0, deadline - time.monotonic()))
        codes.append(proc.returncode)
        lines += [line for line in err.splitlines() if line.startswith("zoo: error: ")]
    return codes, lines


def _records(tmp: Path) -> list[Path]:
    return sorted(tmp.glob(ERROR_RECORD_PREFIX + "*"))


@pytest.fixture(scope="module")
def launches(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[int], list[str], list[Path]]]:
    """Several launches of failing ``python -m zoo.cli`` processes, started together (their start-up, importing
    torch and Lightning, overlaps); then, once they ended, the later launches. Each launch, by name: the exit
    codes and the ``zoo: error:`` lines of all its processes, and the records in its TMPDIR when they ended."""
    configs = tmp_path_factory.mktemp("configs")  # stays empty: every --config below names a missing file
    folders: dict[str, Path] = {}
    started: dict[str, list[subprocess.Popen[str]]] = {}

    def launch(name: str, runs: list[tuple[str, dict[str, str | int]]], beside: str = "") -> None:
        """Start the processes of one launch: (the config file that is missing, its launch variables) each; with
        ``beside``, in the TMPDIR of that earlier launch."""
        tmp = folders[name] = folders[beside] if beside else tmp_path_factory.mktemp(name)
        started[name] = [
            _start(["fit", "--config", str(configs / f"{bad}.yaml")], _env(tmp, **env), tmp) for bad, env in runs
        ]

    def finish() -> dict[str, tuple[list[int], list[str], list[Path]]]:
        done = {name: (*_finish(procs), _records(folders[name])) for name, procs in started.items()}
        started.clear()
        return done

    def lightning(rank: int, key: str, world: int = 2) -> dict[str, str | int]:
        return {"LOCAL_RANK": rank, "WORLD_SIZE": world, LAUNCH_ID_ENV: key}

    # Lightning's launcher: every process meets the same error
    key = _launch_id()
    launch("same", [("shared", lightning(0, key)), ("shared", lightning(1, key))])
    # torchrun: the processes share their parent (this process), the run id and the restart count; the third
    # process of the machine does not fail, so the record stays
    elastic = {"WORLD_SIZE": 3, "LOCAL_WORLD_SIZE": 3, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": 29511}
    elastic.update(TORCHELASTIC_RUN_ID="none", TORCHELASTIC_RESTART_COUNT=0)
    launch("torchrun", [("shared", {**elastic, "LOCAL_RANK": rank}) for rank in (0, 1)])
    # only the second process fails (its data shard, its device): the first goes on
    launch("only_second", [("rank1", lightning(1, _launch_id()))])
    # two processes of three, two different errors: the record stays (the third might still fail)
    key = _launch_id()
    launch("distinct", [("rank0", lightning(0, key, 3)), ("rank1", lightning(1, key, 3))])
    # no launch at all
    launch("plain", [("shared", {})])
    done = finish()

    # later launches meeting the same errors, beside the records the earlier ones left
    launch("later", [("rank0", lightning(0, _launch_id()))], beside="distinct")
    launch("torchrun_restart", [("shared", {**elastic, "TORCHELASTIC_RESTART_COUNT": 1, "LOCAL_RANK": 0})], "torchrun")
    done.update(finish())
    return done


def test_every_process_meeting_the_same_error_prints_one_line(launches: dict) -> None:
    """The usual case under DDP: one line in all, every process exits with 2; once every process of the machine
    has failed, the record is removed."""
    codes, lines, records = launches["same"]
    assert codes == [2, 2]
    assert len(lines) == 1 and "shared.yaml" in lines[0] and "does not exist" in lines[0], lines
    assert records == []


def test_torchrun_processes_print_one_line(launches: dict) -> None:
    """Processes torchrun started (no ZOO_LAUNCH_ID: keyed by their parent, run id and restart count): one line;
    the third process has not failed, so the record stays, one line per failed process."""
    codes, lines, records = launches["torchrun"]
    assert codes == [2, 2]
    assert len(lines) == 1 and "shared.yaml" in lines[0], lines
    (record,) = records
    assert len(record.read_text().splitlines()) == 2


def test_an_error_only_the_second_process_meets_is_printed(launches: dict) -> None:
    """The defect: LOCAL_RANK 1 alone failing used to exit with 2 and print nothing."""
    codes, lines, _ = launches["only_second"]
    assert codes == [2]
    assert len(lines) == 1 and "rank1.yaml" in lines[0], lines


def test_each_distinct_error_is_printed_once(launches: dict) -> None:
    codes, lines, records = launches["distinct"]
    assert codes == [2, 2]
    assert len(lines) == 2, lines
    assert sorted("rank0.yaml" in line for line in lines) == [False, True]
    assert len(records) == 1  # 2 of 3 processes failed


def test_outside_a_launch_the_line_is_printed_and_no_file_written(launches: dict) -> None:
    codes, lines, records = launches["plain"]
    assert codes == [2]
    assert len(lines) == 1 and "shared.yaml" in lines[0], lines
    assert records == []


def test_a_later_launch_prints_the_same_error_again(launches: dict) -> None:
    """A record an earlier launch left (its processes did not all fail) suppresses nothing in a later launch, under
    either launcher (a torchrun restart is a new launch)."""
    for name in ("later", "torchrun_restart"):
        codes, lines, records = launches[name]
        assert codes == [2]
        assert len(lines) == 1 and ("rank0.yaml" if name == "later" else "shared.yaml") in lines[0], lines
        assert len(records) == 2  # the earlier launch's and its own


# ------------------------------------------------------------------------------------------------
# the record, in-process


def _meet(message: str, key: str, processes: int | None) -> None:
    """In a forked process: exit with 0 when this process is the first to meet ``message``, else 1."""
    os._exit(0 if _first_to_meet(message, key, processes) else 1)


@pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods() or os.name != "posix", reason="needs fork and fcntl"
)
def test_many_processes_at_once_one_is_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """8 processes meeting the same error together: one is first; the last removes the record, whichever it is,
    although only some of them know how many processes the launch has (Lightning's first process does not)."""
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # tempfile.gettempdir() reads TMPDIR again
    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_meet, args=("the same error", "launch-x", i % 2 * 8 or None)) for i in range(8)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=60)
    assert sorted(proc.exitcode for proc in procs) == [0] + [1] * 7
    assert _records(tmp_path) == []


def test_a_record_older_than_a_day_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    assert _first_to_meet("old", "launch-old", 2)
    (old,) = _records(tmp_path)
    past = time.time() - ERROR_RECORD_MAX_AGE_S - 60
    os.utime(old, (past, past))
    assert _first_to_meet("new", "launch-new", 2) and not _first_to_meet("new", "launch-new", None)
    assert _records(tmp_path) == []  # the old one swept, the new one removed by its second (last) process


@pytest.mark.parametrize("rank", [0, 1])
def test_without_fcntl_the_first_process_alone_prints(
    rank: int, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where there is no fcntl (not Linux or macOS): the behaviour before the record, LOCAL_RANK 0 prints."""
    monkeypatch.setitem(sys.modules, "fcntl", None)  # import fcntl raises ImportError
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(LAUNCH_ID_ENV, _launch_id())
    with pytest.raises(SystemExit) as exit:
        main(["fit", "--config", str(tmp_path / "missing.yaml")])
    assert exit.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("zoo: error:")]
    assert len(lines) == (1 if rank == 0 else 0)
    assert _records(tmp_path) == []


def test_main_leaves_the_environment_as_it_was(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``main()`` called from Python sets ZOO_LAUNCH_ID for the processes a launch would start, and removes it."""
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.delenv(LAUNCH_ID_ENV, raising=False)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(tmp_path / "missing.yaml")])
    assert LAUNCH_ID_ENV not in os.environ


# ------------------------------------------------------------------------------------------------
# a real Lightning DDP run: 2 CPU processes


class BadShardData(pl.LightningDataModule):
    """A data module whose ``setup`` fails on the processes named by ``bad``: ``"all"`` (the same error on each)
    or local ranks (``"1"``: a bad shard on the second process only)."""

    def __init__(self, bad: str = "all") -> None:
        super().__init__()
        self.bad = bad

    def setup(self, stage: str | None = None) -> None:
        rank = self.trainer.local_rank
        if self.bad == "all":
            raise ZooError("every data shard is bad")
        if str(rank) in self.bad.split(","):
            raise ZooError(f"data shard {rank} is bad")


DDP_CONFIG = """
trainer:
  accelerator: cpu
  devices: 2
  strategy: ddp
  max_epochs: 1
  logger: false
  enable_progress_bar: false
  enable_checkpointing: false
  enable_model_summary: false
model:
  class_path: zoo.models.DepthScaledResNet
  init_args: {layers: [1, 1, 1], widths: [4, 8, 8], stem: cifar, num_classes: 10}
data:
  class_path: test_cli_error_lines.BadShardData
"""


@pytest.mark.distributed
@pytest.mark.parametrize("bad, expected", [("all", "every data shard is bad"), ("1", "data shard 1 is bad")])
def test_ddp_error_lines(bad: str, expected: str, tmp_path: Path) -> None:
    """``zoo fit`` with DDP on 2 CPU processes (Lightning starts the second): an error both meet is one line; an
    error only the second meets is its line."""
    config = tmp_path / "ddp.yaml"
    config.write_text(DDP_CONFIG)
    args = ["fit", "--config", str(config), "--data.init_args.bad", bad, "--trainer.default_root_dir", str(tmp_path)]
    proc = _start(args, _env(tmp_path), tmp_path)
    out, err = _communicate(proc, TIMEOUT_S)
    assert proc.returncode != 0
    assert "distributed_backend=gloo" in out + err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith("zoo: error: ")]
    assert lines == [f"zoo: error: {expected}"], err[-3000:]
    # every process failed: the record was removed; else the second's record stays (the first did not fail with
    # a ZooError: the other process left)
    assert len(_records(tmp_path)) == (0 if bad == "all" else 1)
