"""Untrusted weight files never run code, never allocate what their config claims before the weights agree,
and every bad file is one clear ZooError (zoo.hub). Each case is a crafted file."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo import hub
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet

SMALL = {"layers": (1, 1, 1), "widths": (8, 16, 32)}


def small_model(**kwargs) -> DepthScaledResNet:
    torch.manual_seed(0)
    return zoo.depth_scaled_cifar_resnet(**{**SMALL, **kwargs}).eval()


def crafted(
    path: Path, config: object, tensors: dict[str, torch.Tensor] | None = None, raw_config: str | None = None
) -> Path:
    """A .safetensors file whose metadata holds ``config`` (or the raw text ``raw_config``)."""
    meta = {"format": "pt", "zoo.config": raw_config if raw_config is not None else json.dumps(config)}
    save_file(tensors if tensors is not None else {"w": torch.zeros(2)}, str(path), metadata=meta)
    return path


# ------------------------------------------------------------------------------------------------ no code from files


@pytest.mark.parametrize(
    "class_path, init_args",
    [
        ("subprocess.Popen", {"args": ["touch", "{marker}"]}),
        ("os.system", {"command": "touch {marker}"}),
        ("builtins.exec", {"source": "open('{marker}', 'w').close()"}),
    ],
)
def test_config_naming_a_callable_runs_nothing(tmp_path, class_path, init_args):
    marker = tmp_path / "pwned"
    args = json.loads(json.dumps(init_args).replace("{marker}", str(marker)))
    path = crafted(tmp_path / "evil.safetensors", {"class_path": class_path, "init_args": args})
    with pytest.raises(ZooError, match="not a registered zoo model class"):
        zoo.from_pretrained(path)
    time.sleep(0.2)  # a spawned process would have had the time to write it
    assert not marker.exists()


def test_config_naming_a_module_with_import_side_effects_imports_nothing(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "zoo_sidefx_module.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = crafted(tmp_path / "evil.safetensors", {"class_path": "zoo_sidefx_module.Model", "init_args": {}})
    with pytest.raises(ZooError, match="not a registered zoo model class"):
        zoo.from_pretrained(path)
    assert not marker.exists()
    assert "zoo_sidefx_module" not in sys.modules


def test_save_pretrained_folder_naming_a_callable_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    small_model().save_pretrained(tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    tensors, meta = hub.read_safetensors(weights)
    config = {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}
    save_file(tensors, str(weights), metadata={**meta, "zoo.config": json.dumps(config)})
    with pytest.raises(ZooError, match="subprocess.Popen"):
        zoo.from_pretrained(tmp_path / "m")
    assert not marker.exists()


@pytest.mark.parametrize("width, match", [(2**15, "do not fit"), (2**20, "larger than the file's weights")])
def test_wide_config_is_refused_before_anything_is_allocated(tmp_path, width, match):
    """A config declaring a very wide network beside small weights: the meta-device build and the shape check
    refuse it (building it for real would ask for tens of gigabytes, terabytes at 2^20)."""
    good = small_model()
    tensors = {k: v.contiguous() for k, v in good.state_dict().items()}
    config = hub.model_config(good)
    config["init_args"]["widths"] = [width] * 3
    path = crafted(tmp_path / "wide.safetensors", config, tensors)
    with pytest.raises(ZooError, match=match):
        zoo.from_pretrained(path)


def test_config_building_far_more_than_the_file_holds_is_refused(tmp_path):
    """Tensors the file does not hold (a huge hidden buffer) are bounded too: checked on the meta device."""
    good = small_model()
    config = hub.model_config(good)
    tensors = {k: v.contiguous() for k, v in good.state_dict().items()}
    path = crafted(tmp_path / "m.safetensors", config, tensors)
    with pytest.raises(ZooError, match="refusing to allocate"):
        hub.build_checked(
            DepthScaledResNet, config["init_args"], hub.safetensors_header(path)[1], "test", max_extra_bytes=-1
        )


def test_huge_depth_is_refused_before_the_meta_build(tmp_path):
    good = small_model()
    config = hub.model_config(good)
    config["init_args"]["layers"] = [10**9, 1, 1]
    tensors = {k: v.contiguous() for k, v in good.state_dict().items()}
    path = crafted(tmp_path / "deep.safetensors", config, tensors)
    start = time.perf_counter()
    with pytest.raises(ZooError, match="larger than the file's weights can hold"):
        zoo.from_pretrained(path)
    assert time.perf_counter() - start < 30


# ------------------------------------------------------------------------------------------------ init_args checked


@pytest.mark.parametrize(
    "change, match",
    [
        ({"not_an_argument": 1}, "not_an_argument"),
        ({"layers": "111"}, "layers"),
        ({"num_classes": "ten"}, "num_classes"),
        ({"weights": "hf-hub:someone/else"}, "weights"),
    ],
)
def test_init_args_are_checked_against_the_signature(tmp_path, change, match):
    good = small_model()
    config = hub.model_config(good)
    config["init_args"].update(change)
    tensors = {k: v.contiguous() for k, v in good.state_dict().items()}
    path = crafted(tmp_path / "m.safetensors", config, tensors)
    with pytest.raises(ZooError, match=match):
        zoo.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ bad files, one error


def test_empty_and_truncated_safetensors(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(ZooError, match="empty"):
        zoo.from_pretrained(tmp_path / "empty.safetensors")
    small_model().save_pretrained(tmp_path / "m.safetensors")
    data = (tmp_path / "m.safetensors").read_bytes()
    for cut in (4, 20, len(data) // 2, len(data) - 1):
        (tmp_path / "cut.safetensors").write_bytes(data[:cut])
        with pytest.raises(ZooError, match="is the file complete"):
            zoo.from_pretrained(tmp_path / "cut.safetensors")


@pytest.mark.parametrize(
    "raw, match",
    [
        ("{not json", "is not JSON"),
        ('["a list"]', "must be a JSON object"),
        ('{"init_args": {}}', "lacks 'class_path'"),
        ('{"class_path": "zoo.models.ResNet", "init_args": [1, 2]}', "'init_args'"),
    ],
)
def test_malformed_metadata(tmp_path, raw, match):
    path = crafted(tmp_path / "m.safetensors", None, raw_config=raw)
    with pytest.raises(ZooError, match=match):
        zoo.from_pretrained(path)
    with pytest.raises(ZooError, match=match):  # the builders' weights= reads the same metadata
        zoo.depth_scaled_cifar_resnet(**SMALL, weights=str(path))


def test_empty_pth_is_one_clear_error(tmp_path):
    (tmp_path / "empty.pth").write_bytes(b"")
    with pytest.raises(ZooError, match=r"empty \(0 bytes\)"):
        zoo.depth_scaled_cifar_resnet(**SMALL, weights=str(tmp_path / "empty.pth"))


def test_pth_holding_a_foreign_class_names_it(tmp_path):
    torch.save({"state_dict": small_model().state_dict(), "extra": argparse.Namespace(a=1)}, tmp_path / "obj.pth")
    with pytest.raises(ZooError, match="argparse.Namespace"):
        zoo.depth_scaled_cifar_resnet(**SMALL, weights=str(tmp_path / "obj.pth"))


def test_pth_with_non_tensor_entries(tmp_path):
    torch.save({"state_dict": {"conv1.weight": [1, 2, 3]}}, tmp_path / "bad.pth")
    with pytest.raises(ZooError, match="conv1.weight"):
        zoo.depth_scaled_cifar_resnet(**SMALL, weights=str(tmp_path / "bad.pth"))


# ------------------------------------------------------------------------------------------------ Lightning .ckpt


def test_from_pretrained_loads_a_lightning_checkpoint(lightning_ckpt, tmp_path):
    path, state = lightning_ckpt
    # written by Trainer.fit (no LightningCLI class path): the zoo model recorded its registered class itself
    assert torch.load(path, weights_only=True)[hub.CHECKPOINT_CLASS_KEY] == "zoo.models.resnet.DepthScaledResNet"
    for model in (zoo.from_pretrained(path), DepthScaledResNet.from_pretrained(path)):
        assert type(model) is DepthScaledResNet
        for k, v in state.items():
            assert torch.equal(model.state_dict()[k], v), k
    # a checkpoint that names no class (an older one, or a subclass that is not registered): the family says
    ckpt = torch.load(path, weights_only=True)
    del ckpt[hub.CHECKPOINT_CLASS_KEY]
    torch.save(ckpt, tmp_path / "nameless.ckpt")
    with pytest.raises(ZooError, match="does not name its model class"):
        zoo.from_pretrained(tmp_path / "nameless.ckpt")
    assert type(DepthScaledResNet.from_pretrained(tmp_path / "nameless.ckpt")) is DepthScaledResNet
    # the name is resolved through the registry, never imported
    ckpt[hub.CHECKPOINT_CLASS_KEY] = "os.system"
    torch.save(ckpt, tmp_path / "crafted.ckpt")
    with pytest.raises(ZooError, match="os.system"):
        zoo.from_pretrained(tmp_path / "crafted.ckpt")


def test_from_pretrained_resolves_lightning_cli_class_path(tmp_path):
    good = small_model()
    hparams = {
        "_class_path": "zoo.models.DepthScaledResNet",
        **dict(good.hparams),
        "_instantiator": "lightning.pytorch.cli.instantiate_module",
    }
    torch.save(
        {"state_dict": good.state_dict(), "hyper_parameters": hparams, "pytorch-lightning_version": "2.6.0"},
        tmp_path / "cli.ckpt",
    )
    model = zoo.from_pretrained(tmp_path / "cli.ckpt")
    assert type(model) is DepthScaledResNet
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), good(x))
    hparams["_class_path"] = "subprocess.Popen"
    torch.save({"state_dict": good.state_dict(), "hyper_parameters": hparams}, tmp_path / "evil.ckpt")
    with pytest.raises(ZooError, match="not a registered zoo model class"):
        zoo.from_pretrained(tmp_path / "evil.ckpt")


# ------------------------------------------------------------------------------------------------ dtypes


def test_float64_weights_are_cast_with_an_info_line(tmp_path, caplog):
    good = small_model()
    torch.save(
        {k: (v.double() if v.is_floating_point() else v) for k, v in good.state_dict().items()}, tmp_path / "f64.pth"
    )
    with caplog.at_level(logging.INFO):
        model = zoo.depth_scaled_cifar_resnet(**SMALL, weights=str(tmp_path / "f64.pth"))
    assert "cast to the model's precision" in caplog.text
    assert all(p.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool])
def test_integer_or_bool_weights_for_float_parameters_are_refused(tmp_path, dtype):
    good = small_model()
    bad = {k: (v.to(dtype) if k == "conv1.weight" else v) for k, v in good.state_dict().items()}
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ZooError, match=f"conv1.weight is {dtype}"):
        zoo.depth_scaled_cifar_resnet(**SMALL, weights=str(tmp_path / "bad.pth"))
    config = hub.model_config(good)
    path = crafted(tmp_path / "bad.safetensors", config, {k: v.contiguous() for k, v in bad.items()})
    with pytest.raises(ZooError, match=f"conv1.weight is {dtype}"):  # refused from the header, before reading
        zoo.from_pretrained(path)


# ------------------------------------------------------------------------------------------------ files on disk


def test_save_pretrained_files_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        small_model().save_pretrained(tmp_path / "m")
        small_model().save_pretrained(tmp_path / "one.safetensors")
    finally:
        os.umask(old)
    for f in (
        tmp_path / "m" / "model.safetensors",
        tmp_path / "m" / "config.json",
        tmp_path / "m" / "README.md",
        tmp_path / "one.safetensors",
    ):
        assert (f.stat().st_mode & 0o777) == 0o644, f


_KILLED_WRITER = """
import sys, time
from pathlib import Path
from zoo import hub

def write(tmp):
    Path(tmp).write_bytes(b"partial")
    Path(sys.argv[2]).write_text("writing")
    time.sleep(60)

hub.atomic_write(sys.argv[1], write)
"""


def _writer(target: Path, flag: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _KILLED_WRITER, str(target), str(flag)])
    deadline = time.monotonic() + 60
    while not flag.exists():
        assert proc.poll() is None and time.monotonic() < deadline, "writer did not start"
        time.sleep(0.05)
    return proc


def _temporaries(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.startswith(".") and p.name.endswith(".tmp")]


def test_sigkill_leftovers_are_removed_by_the_next_save_but_a_live_writer_is_left_alone(tmp_path):
    target = tmp_path / "m" / "model.safetensors"
    proc = _writer(target, tmp_path / "started")
    try:
        assert _temporaries(target.parent)
        small_model().save_pretrained(tmp_path / "m")  # the writer is alive: its temporary stays
        assert len(_temporaries(target.parent)) == 1
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    assert len(_temporaries(target.parent)) == 1  # what the killed writer left
    (target.parent / ".config.json.abc123.tmp").write_text("{")  # an old-style stale temporary
    small_model().save_pretrained(tmp_path / "m")
    assert _temporaries(target.parent) == []
    assert sorted(p.name for p in target.parent.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_a_save_killed_between_the_two_files_never_reads_mixed(tmp_path, monkeypatch):
    """The weights file is the single source of truth: a stale config.json beside new weights is ignored."""
    old, new = small_model(num_classes=10), small_model(num_classes=3, drop_rate=0.1)
    old.save_pretrained(tmp_path / "m")
    real = hub.atomic_write

    def killed_at_config(path, write):
        if Path(path).name == "config.json":
            raise KeyboardInterrupt  # as if the process died between the renames
        return real(path, write)

    monkeypatch.setattr(hub, "atomic_write", killed_at_config)
    with pytest.raises(KeyboardInterrupt):
        new.save_pretrained(tmp_path / "m")
    monkeypatch.undo()
    assert json.loads((tmp_path / "m" / "config.json").read_text())["init_args"]["num_classes"] == 10
    loaded = zoo.from_pretrained(tmp_path / "m")
    assert loaded.hparams.num_classes == 3 and loaded.hparams.drop_rate == 0.1
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded.eval()(x), new(x))


def test_stale_temporary_names_are_escaped(tmp_path):
    """A target whose name holds glob characters matches only its own temporaries."""
    (tmp_path / ".a[1].bin.x.tmp").write_text("stale")
    (tmp_path / ".a1.bin.x.tmp").write_text("someone else's")
    hub.atomic_write(tmp_path / "a[1].bin", lambda tmp: Path(tmp).write_bytes(b"ok"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".a1.bin.x.tmp", "a[1].bin"]


def test_recorded_num_classes(tmp_path, lightning_ckpt):
    small_model(num_classes=7).save_pretrained(tmp_path / "m")
    assert hub.recorded_num_classes(tmp_path / "m") == 7
    small_model(num_classes=4).save_pretrained(tmp_path / "m.safetensors")
    assert hub.recorded_num_classes(tmp_path / "m.safetensors") == 4
    assert hub.recorded_num_classes(lightning_ckpt[0]) == 10
    torch.save(small_model().state_dict(), tmp_path / "plain.pth")
    assert hub.recorded_num_classes(tmp_path / "plain.pth") is None
    assert hub.recorded_num_classes("IMAGENET1K_V1") is None
    assert hub.recorded_num_classes(None) is None


def test_crafted_file_in_a_fresh_process_runs_nothing(tmp_path):
    """End to end in a fresh interpreter (nothing imported beforehand): the marker never appears."""
    marker = tmp_path / "pwned"
    path = crafted(
        tmp_path / "evil.safetensors", {"class_path": "subprocess.Popen", "init_args": {"args": ["touch", str(marker)]}}
    )
    code = textwrap.dedent(f"""
        import zoo
        try:
            zoo.from_pretrained({str(path)!r})
        except zoo.ZooError as e:
            print("refused:", e)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert "refused:" in out.stdout, out.stderr
    time.sleep(0.2)
    assert not marker.exists()


def test_momentum_file_saved_before_keep_first_block_rebuilds_what_was_saved(tmp_path):
    """A Momentum ResNet-18 file written before keep_first_block existed (its config lacks the key) had layer1's
    first block inside the momentum stack: from_pretrained rebuilds that function, weights= warns."""
    torch.manual_seed(0)
    old = zoo.momentum_resnet18(num_classes=4, keep_first_block=False, memory="full").eval()
    config = hub.model_config(old)
    del config["init_args"]["keep_first_block"]
    path = crafted(tmp_path / "old.safetensors", config, {k: v.contiguous() for k, v in old.state_dict().items()})
    loaded = zoo.from_pretrained(path).eval()
    assert loaded.hparams.keep_first_block is False
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), old(x))
    with pytest.warns(UserWarning, match="keep_first_block=False to reproduce"):
        zoo.momentum_resnet18(weights=str(path), memory="full")
