"""A weight file is read once per call: a builder's ``weights=``, ``zoo.from_pretrained`` and ``zoo.load_weights``
ask a Lightning checkpoint for its class, hyperparameters, pretrained_cfg and weights, and each used to be its own
``torch.load`` (six for a builder). What one call read is dropped when it returns: a file rewritten between two
calls is read again, and nothing it held (the optimizer's state included) outlives the call."""

from __future__ import annotations

import argparse
import collections
import gc
import os
import shutil
import weakref
from pathlib import Path

import pytest
import safetensors
import torch

import zoo
from zoo import hub
from zoo.errors import ZooError
from zoo.models import DepthScaledResNet

# the lightning_ckpt fixture's model (tests/conftest.py)
ARCH = {"layers": (2, 2, 2), "widths": (8, 16, 32)}
# a transform no model of the family has by default: a model that carries it took it from the checkpoint
STORED_CFG = {"mean": [0.25, 0.5, 0.75], "std": [0.1, 0.2, 0.3], "crop_pct": 0.9}


class Reads:
    """``torch.load`` (and ``safetensors.safe_open``) counted by the file they read; every load must be
    ``weights_only=True``."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        load, safe_open = torch.load, safetensors.safe_open

        def counted_load(f, *args, **kwargs):
            assert kwargs.get("weights_only") is True, kwargs
            self.counts[os.path.realpath(f)] += 1
            return load(f, *args, **kwargs)

        def counted_open(f, *args, **kwargs):
            self.counts[os.path.realpath(f)] += 1
            return safe_open(f, *args, **kwargs)

        monkeypatch.setattr(torch, "load", counted_load)
        monkeypatch.setattr(safetensors, "safe_open", counted_open)

    def of(self, path: Path) -> int:
        return self.counts[os.path.realpath(path)]


@pytest.fixture
def reads(monkeypatch: pytest.MonkeyPatch) -> Reads:
    return Reads(monkeypatch)


@pytest.fixture
def ckpt(lightning_ckpt, tmp_path) -> tuple[Path, dict]:
    """A copy of a Trainer's checkpoint (with its optimizer's momentum) recording a transform of its own; the
    checkpoint as written."""
    path = tmp_path / "m.ckpt"
    checkpoint = torch.load(lightning_ckpt[0], weights_only=True)
    assert checkpoint["optimizer_states"] and hub.CHECKPOINT_CLASS_KEY in checkpoint
    checkpoint[hub.CHECKPOINT_CFG_KEY] = {**checkpoint[hub.CHECKPOINT_CFG_KEY], **STORED_CFG}
    hub.check_pretrained_cfg(checkpoint[hub.CHECKPOINT_CFG_KEY], "test")
    checkpoint["state_dict"] = {k: v.clone() for k, v in checkpoint["state_dict"].items()}  # as _rewrite's
    torch.save(checkpoint, path)
    return path, checkpoint


def assert_is_the_checkpoints(model: torch.nn.Module, checkpoint: dict) -> None:
    state = model.state_dict()
    assert set(state) == set(checkpoint["state_dict"])
    for k, v in checkpoint["state_dict"].items():
        assert torch.equal(state[k], v), k
    for k, v in STORED_CFG.items():
        want = tuple(v) if isinstance(v, list) else v
        assert model.pretrained_cfg[k] == want, k


BUILDS = {
    "builder": lambda path: zoo.depth_scaled_cifar_resnet(weights=str(path)),
    "create_model": lambda path: zoo.create_model("depth_scaled_cifar_resnet", weights=str(path)),
    "from_pretrained": lambda path: zoo.from_pretrained(path),
    "family from_pretrained": lambda path: DepthScaledResNet.from_pretrained(path),
}


@pytest.mark.parametrize("build", BUILDS.values(), ids=BUILDS.keys())
def test_a_checkpoint_is_read_once(reads, ckpt, build):
    path, checkpoint = ckpt
    model = build(path)
    assert reads.of(path) == 1
    assert type(model) is DepthScaledResNet
    assert_is_the_checkpoints(model, checkpoint)


def test_load_weights_reads_a_checkpoint_once(reads, ckpt):
    path, checkpoint = ckpt
    model = zoo.load_weights(zoo.depth_scaled_cifar_resnet(**ARCH), path)
    assert reads.of(path) == 1
    for k, v in checkpoint["state_dict"].items():
        assert torch.equal(model.state_dict()[k], v), k


@pytest.mark.parametrize("target", ["folder", "m.safetensors"])
@pytest.mark.parametrize("build", ["builder", "from_pretrained"])
def test_save_pretrained_weights_are_opened_twice(reads, tmp_path, target, build):
    """A save_pretrained folder or file: its header once (class, hyperparameters, pretrained_cfg, shapes) and its
    tensors once; a builder opened it seven times, from_pretrained three."""
    model = zoo.depth_scaled_cifar_resnet(**ARCH).eval()
    model.pretrained_cfg = {**model.pretrained_cfg, **{k: tuple(v) for k, v in STORED_CFG.items() if k != "crop_pct"}}
    saved = model.save_pretrained(tmp_path / target)
    file = saved / hub.WEIGHTS_NAME if saved.is_dir() else saved
    reads.counts.clear()
    loaded = BUILDS[build](saved)
    assert reads.of(file) == 2
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert loaded.pretrained_cfg["mean"] == (0.25, 0.5, 0.75)


def _rewrite(path: Path, checkpoint: dict, keep_stat: bool) -> dict:
    """The checkpoint at ``path`` with other weights of the same shapes; ``keep_stat``: the file keeps its size and
    modification time (what a cache keyed on them would take for the same file)."""
    before = path.stat()
    changed = {
        **checkpoint,
        "state_dict": {k: v + 1 if v.is_floating_point() else v.clone() for k, v in checkpoint["state_dict"].items()},
    }
    torch.save(changed, path)
    if keep_stat:
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9))
    return changed


@pytest.mark.parametrize("build", ["builder", "from_pretrained"])
def test_a_file_rewritten_between_two_calls_is_read_again(reads, ckpt, build):
    path, checkpoint = ckpt
    assert_is_the_checkpoints(BUILDS[build](path), checkpoint)
    changed = _rewrite(path, checkpoint, keep_stat=True)
    second = BUILDS[build](path)
    assert reads.of(path) == 2  # once per call
    assert_is_the_checkpoints(second, changed)


def test_a_file_changed_within_a_scope_is_read_again(reads, ckpt):
    path, checkpoint = ckpt
    with hub.checkpoint_reads():
        assert hub.recorded_config(path)["class_path"] == "zoo.models.resnet.DepthScaledResNet"
        assert hub.recorded_pretrained_cfg(path)["mean"] == (0.25, 0.5, 0.75)
        state, _ = hub.read_weights(path)
        assert reads.of(path) == 1
        changed = _rewrite(path, checkpoint, keep_stat=False)
        state, _ = hub.read_weights(path)
        assert reads.of(path) == 2
    for k, v in changed["state_dict"].items():
        assert torch.equal(state[k], v), k
    hub.read_weights(path)  # outside any scope: every read goes to the file
    hub.recorded_config(path)
    assert reads.of(path) == 4


def test_nothing_read_outlives_the_call(reads, ckpt, monkeypatch):
    """The scope's read (weights, optimizer state) is dropped when the call returns: no tensor of the file is
    alive once the model has copied its weights."""
    path, _ = ckpt
    alive: list[weakref.ref] = []
    load = torch.load

    def tracked(f, *args, **kwargs):
        obj = load(f, *args, **kwargs)
        alive.extend(weakref.ref(t) for t in obj["state_dict"].values())
        alive.extend(weakref.ref(t) for s in obj["optimizer_states"] for t in s["state"][0].values())
        return obj

    monkeypatch.setattr(torch, "load", tracked)
    model = zoo.depth_scaled_cifar_resnet(weights=str(path))
    assert reads.of(path) == 1 and alive
    gc.collect()
    assert not [r for r in alive if r() is not None]
    assert hub._SCOPE_READS.get() is None
    del model


def test_the_checks_stay_as_strict(reads, ckpt, tmp_path):
    """What is read once is checked as before: a crafted pretrained_cfg or class is refused, and a read that fails
    is not kept (the file, mended, is read within the same scope)."""
    path, checkpoint = ckpt
    crafted = tmp_path / "crafted.ckpt"
    torch.save(
        {**checkpoint, hub.CHECKPOINT_CFG_KEY: {**checkpoint[hub.CHECKPOINT_CFG_KEY], "mean": "os.system"}}, crafted
    )
    for build in (BUILDS["builder"], BUILDS["from_pretrained"]):
        with pytest.raises(ZooError, match="mean"):
            build(crafted)
    foreign = tmp_path / "foreign.ckpt"
    torch.save({**checkpoint, "hyper_parameters": argparse.Namespace(lr=0.1)}, foreign)  # weights_only refuses it
    with pytest.raises(ZooError, match="holds the class argparse.Namespace"):
        BUILDS["builder"](foreign)
    broken = tmp_path / "broken.ckpt"
    broken.write_bytes(path.read_bytes()[:100])
    with hub.checkpoint_reads():
        with pytest.raises(ZooError, match="cannot read weights"):
            hub.read_weights(broken)
        shutil.copyfile(path, broken)
        state, _ = hub.read_weights(broken)
    assert set(state) == set(checkpoint["state_dict"])


def test_the_translation_builder_reads_zoo_weights_once(reads, tmp_path):
    """The translation builders take the arguments zoo weights record, then load them: one read for both."""
    model = zoo.sinkformer_transformer_toy(src_vocab_size=24, tgt_vocab_size=20, n_iter=3).eval()
    saved = model.save_pretrained(tmp_path / "toy")
    reads.counts.clear()
    built = zoo.sinkformer_transformer_toy(weights=str(saved)).eval()
    assert reads.of(saved / hub.WEIGHTS_NAME) == 2  # its header and its tensors
    assert built.hparams["src_vocab_size"] == 24 and built.hparams["n_iter"] == 3
    for k, v in model.state_dict().items():
        assert torch.equal(built.state_dict()[k], v), k
