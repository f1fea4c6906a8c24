"""Recipes and launch examples for many GPUs and nodes, checked without running any training.

1. Every recipe's leading comment states its per-process batch, its learning-rate scaling rule with the reference
   global batch the lr was tuned for, and its warm-up, in three lines of a fixed form; the numbers in them are the
   ones in the YAML (the data module's ``batch_size`` / ``max_tokens``, the optimiser's ``lr``, the schedule's
   warm-up). The recipe table of docs/scaling.md agrees with the files.
2. The launch commands of docs/scaling.md (its ```bash blocks) and of examples/launch/*.sh pass ``bash -n``; each
   is then run by bash with ``zoo``, ``torchrun``, ``srun``, ``sbatch`` and ``python`` replaced by stubs that only
   record their arguments (``sbatch`` is emulated: the batch script runs with the SLURM variables its ``#SBATCH``
   lines and command-line options give). Every recorded torchrun command line parses with torchrun's own argument
   parser (``torch.distributed.run.get_args_parser``, the parser behind ``python -m torch.distributed.run
   --help``), each option spelled as the parser defines it (no abbreviations); every srun and sbatch option is one
   of the Slurm 26.11 man pages; every ``zoo fit`` command line, as it reaches the zoo, parses with the zoo CLI's
   parser (``--print_config``: nothing is instantiated, no training) with its distributed flags printed back; and
   ``--trainer.devices`` / ``--trainer.num_nodes`` equal the processes per node / nodes the launcher starts (what
   Lightning's TorchElasticEnvironment and SLURMEnvironment require).
"""

from __future__ import annotations

import inspect
import re
import shlex
import stat
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")

ROOT = Path(__file__).resolve().parents[1]
RECIPE_DIR = ROOT / "zoo" / "recipes"
RECIPES = sorted(RECIPE_DIR.rglob("*.yaml"))
SCALING_PAGE = ROOT / "docs" / "scaling.md"
LAUNCH_SCRIPTS = sorted((ROOT / "examples" / "launch").glob("*.sh"))

# recipes whose headers are still to be written (strict: an xfail that passes fails, so a name must leave this set
# as soon as its header is in); empty: every recipe has one
PENDING_HEADERS: set[str] = set()

# ---------------------------------------------------------------------------------------------------------------
# 1. recipe headers

BATCH_LINE = re.compile(
    r"^# Per-process batch: (?:(?P<n>\d+)(?P<tokens> tokens)? \(data\.init_args\.(?P<key>batch_size|max_tokens)\)"
    r"|(?P<full>the whole training set) \(data\.init_args\.batch_size: null\))",
    re.M,
)
LR_LINE = re.compile(
    r"^# LR scaling: (?:linear in B, lr = (?P<lr>[0-9.eE+-]+) x B / (?P<ref>\d+)(?P<tokens> tokens)? "
    r"\(tuned for B = (?P<ref_again>\d+)(?: tokens)?[:)]|(?P<none>none)\b)",
    re.M,
)
WARMUP_LINE = re.compile(
    r"^# Warm-up: (?:(?P<n>[0-9.]+) (?P<unit>epochs?|steps|updates) in the schedule "
    r"\(lr_scheduler\.init_args\.(?P<arg>warmup_epochs|warmup_steps|warmup_updates)\)|(?P<none>none in the schedule))",
    re.M,
)


def recipe_name(path: Path) -> str:
    return path.relative_to(RECIPE_DIR).with_suffix("").as_posix()


def leading_comment(path: Path) -> str:
    """The comment lines before the first YAML line (the recipe's header)."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def schedule_warmup(init: dict[str, Any]) -> tuple[str, float] | None:
    """(argument, length) of the recipe's warm-up, None when its schedule has none. An omitted ``lr_scheduler`` is
    the task's default, ``WarmupCosineLR`` without warm-up; ``null`` a constant learning rate."""
    sched = init.get("lr_scheduler")
    if not sched:
        return None
    args = sched.get("init_args", {})
    name = sched["class_path"].rsplit(".", 1)[-1]
    if name == "WarmupCosineLR":
        for arg in ("warmup_epochs", "warmup_steps"):
            if args.get(arg):
                return arg, float(args[arg])
        return None
    if name == "InverseSqrtLR":
        from zoo.tasks.optim import InverseSqrtLR  # its default warm-up counts when the recipe omits it

        default = inspect.signature(InverseSqrtLR).parameters["warmup_updates"].default
        updates = args.get("warmup_updates", default)
        return ("warmup_updates", float(updates)) if updates else None
    return None  # MultiStepLR and the other torch schedules have no warm-up


@dataclass
class Header:
    """The scaling statements of one recipe."""

    batch: int | None  # None: the whole training set
    batch_key: str
    tokens: bool
    rule: str  # "linear" | "none"
    lr: float | None
    reference: int | None


def parse_header(path: Path) -> Header:
    text = leading_comment(path)
    batch, lr, warm = BATCH_LINE.search(text), LR_LINE.search(text), WARMUP_LINE.search(text)
    missing = [name for name, m in (("Per-process batch", batch), ("LR scaling", lr), ("Warm-up", warm)) if not m]
    assert not missing, f"{path.name}: the leading comment has no line '# {missing[0]}: ...' of the stated form"
    assert batch is not None and lr is not None and warm is not None
    return Header(
        batch=None if batch["full"] else int(batch["n"]),
        batch_key=batch["key"] or "batch_size",
        tokens=bool(batch["tokens"]),
        rule="none" if lr["none"] else "linear",
        lr=None if lr["none"] else float(lr["lr"]),
        reference=None if lr["none"] else int(lr["ref"]),
    )


def recipe_params() -> list[Any]:
    return [
        pytest.param(
            p,
            id=recipe_name(p),
            marks=[pytest.mark.xfail(strict=True, reason="header written with its recipe's task")]
            if recipe_name(p) in PENDING_HEADERS
            else [],
        )
        for p in RECIPES
    ]


@pytest.mark.parametrize("recipe", recipe_params())
def test_recipe_states_batch_and_learning_rate_scaling(recipe: Path) -> None:
    header = parse_header(recipe)
    config = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    data = config["data"].get("init_args", {})
    init = config["model"].get("init_args", {})

    # the per-process batch is the data module's
    if header.batch is None:
        assert data.get("batch_size") is None, f"{recipe.name}: 'the whole training set' but batch_size is set"
    else:
        assert header.batch_key in data, f"{recipe.name}: data.init_args.{header.batch_key} is not in the file"
        assert data[header.batch_key] == header.batch, (recipe.name, header.batch_key, data[header.batch_key])
        assert header.tokens == (header.batch_key == "max_tokens"), f"{recipe.name}: tokens are max_tokens"

    # the lr named by the rule is the optimiser's, and the reference global batch is whole processes of it
    text = leading_comment(recipe)
    lr_match = LR_LINE.search(text)
    assert lr_match is not None
    if header.rule == "linear":
        assert int(lr_match["ref_again"]) == header.reference, f"{recipe.name}: two reference batches"
        optimizer = init.get("optimizer") or {}
        assert "lr" in optimizer.get("init_args", {}), f"{recipe.name}: the rule names an lr the optimiser lacks"
        assert float(optimizer["init_args"]["lr"]) == pytest.approx(header.lr, rel=1e-12), recipe.name
        assert header.batch is not None and header.reference is not None
        assert header.reference % header.batch == 0, (
            f"{recipe.name}: the reference global batch {header.reference} is no whole number of processes at "
            f"{header.batch} per process"
        )

    # the warm-up stated is the schedule's
    warm = WARMUP_LINE.search(text)
    assert warm is not None
    actual = schedule_warmup(init)
    if warm["none"]:
        assert actual is None, f"{recipe.name}: says no warm-up, the schedule has {actual}"
    else:
        assert actual == (warm["arg"], float(warm["n"])), (recipe.name, actual, warm.group(0))


def scaling_table() -> dict[str, list[str]]:
    """The recipe table of docs/scaling.md: recipe name -> its cells."""
    rows = {}
    for line in SCALING_PAGE.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\| `([\w/]+)` \|(.*)\|\s*$", line)
        if m and (RECIPE_DIR / f"{m[1]}.yaml").is_file():
            rows[m[1]] = [c.strip() for c in m[2].split("|")]
    return rows


def test_scaling_page_table_agrees_with_the_recipes() -> None:
    """One row per recipe; its per-process batch and lr are the file's, its reference batch the header's."""
    rows = scaling_table()
    assert set(rows) == {recipe_name(p) for p in RECIPES}
    for name, (batch, reference, lr, _warmup) in rows.items():
        path = RECIPE_DIR / f"{name}.yaml"
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
        data = config["data"].get("init_args", {})
        key = "max_tokens" if "max_tokens" in data else "batch_size"
        if data.get(key) is None:
            assert batch == "the whole training set", name
        else:
            assert batch == f"{data[key]}" + (" tokens" if key == "max_tokens" else ""), name
        opt_args = (config["model"]["init_args"].get("optimizer") or {}).get("init_args", {})
        if "lr" in opt_args:
            assert float(lr.split()[0]) == pytest.approx(float(opt_args["lr"]), rel=1e-12), name
        if name not in PENDING_HEADERS or "# Per-process batch:" in leading_comment(path):
            header = parse_header(path)
            if header.reference is not None:
                assert int(reference.split()[0]) == header.reference, name


# ---------------------------------------------------------------------------------------------------------------
# 2. launch commands

# long options of srun(1) and sbatch(1), Slurm 26.11 (doc/man/man1/{srun,sbatch}.1 of SchedMD/slurm)
SRUN_OPTIONS = frozenset(
    """account acctg-freq async bb bbf bcast bcast-exclude begin chdir cluster-constraint clusters comment compress
    consolidate-segments constraint container container-id contiguous core-spec cores-per-socket cpu-bind cpu-freq
    cpus-per-gpu cpus-per-task deadline delay-boot dependency disable-status distribution epilog error exact exclude
    exclusive export external-launcher extra extra-node-info gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket
    gpus-per-task gres gres-flags help het-group hint hold ignore-signals immediate input job-name jobid
    kill-on-bad-exit label licenses mail-type mail-user mcs-label mem mem-bind mem-per-cpu mem-per-gpu mem-update
    mincpus mpi msg-timeout multi-prog network nice no-allocate no-kill nodefile nodelist nodes ntasks
    ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket oom-kill-step open-mode output overcommit
    overlap oversubscribe parsable partition prefer preserve-env priority profile prolog propagate pty qos quiet
    quit-on-interrupt reboot relative reservation resources resv-ports runtime segment send-libs signal slurmd-debug
    sockets-per-node spread-job spread-segments stepmgr switches task-epilog task-prolog test-only thread-spec
    threads threads-per-core time time-min tmp treewidth tres-bind tres-per-task unbuffered usage use-min-nodes
    verbose version wait wait-for-children wckey x11""".split()
)
SBATCH_OPTIONS = frozenset(
    """account acctg-freq array batch bb bbf begin chdir cluster-constraint clusters comment consolidate-segments
    constraint container container-id contiguous core-spec cores-per-socket cpu-freq cpus-per-gpu cpus-per-task
    deadline delay-boot dependency distribution error exclude exclusive export export-file extra extra-node-info
    get-user-env gid gpu-bind gpu-freq gpus gpus-per-node gpus-per-socket gpus-per-task gres gres-flags help hint
    hold ignore-pbs input job-name kill-on-invalid-dep licenses mail-type mail-user mcs-label mem mem-bind
    mem-per-cpu mem-per-gpu mem-update mincpus network nice no-kill no-requeue nodefile nodelist nodes ntasks
    ntasks-per-core ntasks-per-gpu ntasks-per-node ntasks-per-socket oom-kill-step open-mode output overcommit
    oversubscribe parsable partition prefer priority profile propagate qos quiet reboot requeue reservation
    resources resv-ports runtime segment signal sockets-per-node spread-job spread-segments stepmgr switches
    test-only thread-spec threads-per-core time time-min tmp tres-bind tres-per-task uid usage use-min-nodes verbose
    version wait wait-all-nodes wckey wrap""".split()
)
STUBBED = ("zoo", "torchrun", "srun", "sbatch", "python", "python3")
# what the multi-node examples read from the environment of the node they run on
LAUNCH_ENV = {"RDZV_ENDPOINT": "node001:29400", "JOB_ID": "refit152"}


def shell_sources() -> list[tuple[str, str]]:
    """(where, bash source) of every ```bash block of docs/scaling.md and every examples/launch/*.sh script."""
    text = SCALING_PAGE.read_text(encoding="utf-8")
    sources = []
    for m in re.finditer(r"^```bash\n(.*?)^```\s*$", text, re.S | re.M):
        sources.append((f"docs/scaling.md:{text.count(chr(10), 0, m.start()) + 2}", m[1]))
    for path in LAUNCH_SCRIPTS:
        sources.append((path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")))
    return sources


def test_shell_examples_pass_bash_n() -> None:
    sources = shell_sources()
    assert len(LAUNCH_SCRIPTS) >= 3 and len(sources) >= len(LAUNCH_SCRIPTS) + 5
    for where, source in sources:
        proc = subprocess.run(["bash", "-n"], input=source, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 0, f"{where}: {proc.stderr}"
    for path in LAUNCH_SCRIPTS:  # run as ./script or by sbatch: a shebang, executable
        assert path.read_text(encoding="utf-8").startswith("#!/usr/bin/env bash\n"), path.name
        assert path.stat().st_mode & stat.S_IXUSR, f"{path.name} is not executable"


@dataclass
class Launch:
    """One ``zoo`` command line as it reaches the zoo, and the processes its launcher starts."""

    where: str
    launcher: str  # "zoo" (Lightning starts the processes), "torchrun" or "srun"
    argv: list[str]
    nproc_per_node: int | None = None
    nnodes: int | None = None
    options: dict[str, str] = field(default_factory=dict)  # the launcher's own options


def run_with_stubs(script: str, args: list[str], env: dict[str, str], tmp: Path) -> list[list[str]]:
    """Run bash ``script`` with ``args`` where the launchers are stubs; their recorded command lines, in order."""
    stubs = tmp / "stubs"
    stubs.mkdir(exist_ok=True)
    for name in STUBBED:
        stub = stubs / name
        stub.write_text('#!/bin/bash\n{ printf "%s\\0" "${0##*/}" "$@"; printf "\\n"; } >> "$LAUNCH_LOG"\n')
        stub.chmod(0o755)
    log = tmp / "launch.log"
    log.write_text("")
    path = tmp / "script.sh"
    path.write_text(script)
    full_env = {
        "PATH": f"{stubs}:/usr/bin:/bin",
        "HOME": str(tmp),
        "LAUNCH_LOG": str(log),
        **LAUNCH_ENV,
        **env,
    }
    proc = subprocess.run(
        ["bash", "--noprofile", "--norc", "-e", str(path), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return [record.split("\0") for record in log.read_text().split("\0\n") if record]


def long_options(tokens: list[str], known: frozenset[str], tool: str, where: str) -> tuple[dict[str, str], int]:
    """Leading ``--name[=value]`` options of a Slurm command line: {name: value}, and where the rest starts."""
    options = {}
    for i, token in enumerate(tokens):
        if not token.startswith("-"):
            return options, i
        name, _, value = token.partition("=")
        assert name.startswith("--"), f"{where}: {tool} option {token!r}: write the long form --name=value"
        assert name[2:] in known, f"{where}: {tool} has no option {name}"
        options[name[2:]] = value
    return options, len(tokens)


def torchrun_launch(args: list[str], where: str) -> Launch:
    from torch.distributed.run import get_args_parser

    parser = get_args_parser()
    ns = parser.parse_args(args)  # raises SystemExit on an unknown option or a bad value
    end = args.index(ns.training_script)
    for token in args[:end]:
        if token.startswith("-"):
            flag = token.partition("=")[0]
            assert flag in parser._option_string_actions, f"{where}: torchrun has no option {flag}"
    assert ns.module and ns.training_script == "zoo.cli", f"{where}: torchrun must run -m zoo.cli"
    assert ns.nproc_per_node.isdigit() and ns.nnodes.isdigit(), f"{where}: give torchrun fixed process counts"
    if int(ns.nnodes) > 1:
        assert ns.rdzv_endpoint and ns.rdzv_backend == "c10d", f"{where}: several nodes need a c10d rendezvous"
    options = {"nnodes": ns.nnodes, "nproc-per-node": ns.nproc_per_node, "rdzv-endpoint": ns.rdzv_endpoint}
    return Launch(where, "torchrun", list(ns.training_script_args), int(ns.nproc_per_node), int(ns.nnodes), options)


def sbatch_job(args: list[str], where: str, tmp: Path) -> Iterator[Launch]:
    """Emulate ``sbatch [options] script [args]``: the script's ``#SBATCH`` lines, overridden by the command
    line's options, give the allocation and its SLURM variables; the script runs with its launchers stubbed."""
    cli_options, start = long_options(args, SBATCH_OPTIONS, "sbatch", where)
    script = ROOT / args[start]
    assert script.is_file(), f"{where}: sbatch {args[start]}: no such file in the repository"
    directives: dict[str, str] = {}
    for line in script.read_text(encoding="utf-8").splitlines()[1:]:
        if not line.startswith("#"):
            break  # sbatch reads #SBATCH lines up to the first command
        if line.startswith("#SBATCH"):
            options, _ = long_options(shlex.split(line)[1:], SBATCH_OPTIONS, "#SBATCH", str(script))
            directives.update(options)
    alloc = {**directives, **cli_options}
    nodes, tasks = int(alloc.get("nodes", "1")), int(alloc.get("ntasks-per-node", "1"))
    env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": alloc.get("job-name", script.name),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NNODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(tasks),
        "SLURM_NTASKS": str(nodes * tasks),
        "SLURM_CPUS_PER_TASK": alloc.get("cpus-per-task", "1"),
    }
    for record in run_with_stubs(script.read_text(encoding="utf-8"), args[start + 1 :], env, tmp):
        for launch in interpret(record, f"{where} -> {script.name}", tmp):
            if launch.launcher == "srun":  # srun's own counts win, else the allocation's
                launch.nnodes = launch.nnodes or nodes
                launch.nproc_per_node = launch.nproc_per_node or tasks
                gpus = alloc.get("gpus-per-node")
                assert gpus is None or int(gpus) == launch.nproc_per_node, f"{where}: one task per GPU"
            yield launch


def interpret(record: list[str], where: str, tmp: Path) -> Iterator[Launch]:
    """The zoo launches of one recorded command line."""
    tool, args = record[0], record[1:]
    if tool in ("python", "python3"):
        assert args[:1] == ["-m"] and args[1:2] in (["zoo.cli"], ["torch.distributed.run"]), f"{where}: {record}"
        tool, args = ("zoo" if args[1] == "zoo.cli" else "torchrun"), args[2:]
    if tool == "zoo":
        yield Launch(where, "zoo", args)
    elif tool == "torchrun":
        yield torchrun_launch(args, where)
    elif tool == "srun":
        options, start = long_options(args, SRUN_OPTIONS, "srun", where)
        inner = list(interpret(args[start:], where, tmp))
        assert [x.launcher for x in inner] == ["zoo"], f"{where}: srun runs zoo (one task per process)"
        nodes, tasks = options.get("nodes"), options.get("ntasks-per-node")
        launch = inner[0]
        yield Launch(where, "srun", launch.argv, int(tasks) if tasks else None, int(nodes) if nodes else None, options)
    elif tool == "sbatch":
        yield from sbatch_job(args, where, tmp)
    else:
        raise AssertionError(f"{where}: unexpected command {record}")


def collect_launches(tmp: Path) -> list[Launch]:
    launches = []
    sources = [(where, source, []) for where, source in shell_sources() if where.startswith("docs/")]
    for path in LAUNCH_SCRIPTS:
        if "#SBATCH" in path.read_text(encoding="utf-8"):
            continue  # batch scripts run through the sbatch emulation (from the docs and below)
        where = path.relative_to(ROOT).as_posix()
        source = path.read_text(encoding="utf-8")
        sources += [(where, source, []), (where, source, ["digits_vmoe_soft", "--trainer.max_epochs", "3"])]
    for where, source, args in sources:
        for record in run_with_stubs(source, args, {}, tmp):
            launches += interpret(record, where, tmp)
    for path in LAUNCH_SCRIPTS:  # every batch script submitted as is
        if "#SBATCH" in path.read_text(encoding="utf-8"):
            launches += sbatch_job([path.relative_to(ROOT).as_posix()], "sbatch", tmp)
    return launches


def option(argv: list[str], name: str) -> str | None:
    """The last value of ``--name value`` / ``--name=value`` in ``argv``."""
    value = None
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


def check_strategy(name: str, where: str) -> None:
    """``--trainer.strategy`` names a strategy Lightning knows once the zoo is imported, or a Strategy class
    (``--print_config`` does not build the strategy, so an unknown name would pass it)."""
    import importlib

    from lightning.pytorch.strategies import Strategy, StrategyRegistry

    if "." in name:
        module, _, cls = name.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), Strategy), f"{where}: {name}"
    else:
        assert name in StrategyRegistry, f"{where}: no strategy named {name!r}"


def test_launch_commands_parse_and_agree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from zoo.cli import list_recipes, main

    launches = collect_launches(tmp_path)
    # the page and the scripts show each way to start many processes
    torchruns = [x for x in launches if x.launcher == "torchrun"]
    assert any(x.nnodes == 1 for x in torchruns), "no single-node torchrun example"
    assert any(x.nnodes and x.nnodes > 1 and x.options["rdzv-endpoint"] for x in torchruns), "no multi-node torchrun"
    assert any(x.launcher == "srun" and x.nnodes and x.nnodes > 1 and "->" in x.where for x in launches), (
        "no multi-node srun in an sbatch script"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    parsed = 0
    for launch in launches:
        argv = launch.argv
        assert argv, f"{launch.where}: zoo without a subcommand"
        if argv[0] == "recipes":  # zoo recipes --show <name>
            shown = option(argv, "--show")
            assert shown is None or shown in list_recipes(), f"{launch.where}: no recipe {shown}"
            continue
        assert argv[0] in ("fit", "validate", "test", "predict"), f"{launch.where}: zoo {argv[0]}"
        capsys.readouterr()
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, "--print_config"])
        out, err = capsys.readouterr()
        assert exit_info.value.code in (0, None), f"{launch.where}: zoo {' '.join(argv)}\n{err}"
        trainer = yaml.safe_load(out)["trainer"]
        for key in ("devices", "num_nodes", "accelerator", "strategy"):
            given = option(argv, f"--trainer.{key}")
            if given is not None:
                printed = trainer[key]
                printed = printed["class_path"] if isinstance(printed, dict) else printed
                assert str(printed) == given, (launch.where, key, printed, given)
        strategy = option(argv, "--trainer.strategy")
        if strategy is not None:
            check_strategy(strategy, launch.where)
        parsed += 1
        if launch.launcher in ("torchrun", "srun"):  # Lightning checks these against the launcher's environment
            assert str(trainer["devices"]) == str(launch.nproc_per_node), (launch.where, "devices", trainer)
            assert int(trainer["num_nodes"]) == launch.nnodes, (launch.where, "num_nodes", trainer)
            assert str(trainer["strategy"]) != "auto" or launch.nproc_per_node == 1, launch.where
    assert parsed >= 8
