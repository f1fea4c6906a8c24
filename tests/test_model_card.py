"""save_pretrained's model card (README.md, Hugging Face's layout), push_to_hub up to the HTTP call, and files saved
with the training settings of earlier versions."""

from __future__ import annotations

import functools
import json
import shutil

import pytest
import torch
import yaml
from helpers import seed_hf_hub_cache
from huggingface_hub import HfApi, ModelCard

import zoo
from zoo.errors import ZooError
from zoo.hub import _META_CONFIG, model_config, save_safetensors
from zoo.model_card import describe_factory
from zoo.tasks.optim import WarmupCosineLR


def small_model(**kwargs):
    torch.manual_seed(0)
    return zoo.models.DepthScaledResNet(layers=(2, 2), widths=(4, 8), stem="cifar", num_classes=3, **kwargs)


def front_matter(text: str) -> dict:
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("---\n")[1])


def test_save_pretrained_writes_a_card_that_huggingface_hub_parses(tmp_path) -> None:
    model = small_model(
        optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9),
        lr_scheduler=functools.partial(WarmupCosineLR, warmup_epochs=2),
        layer_decay=0.75,
        mixup_alpha=0.8,
    )
    model.pretrained_cfg = {
        "architecture": "depth_scaled_cifar_resnet",
        "tag": "test",
        "license": "bsd-3-clause",
        "source": "hf-hub:someone/resnet-source",
        "conversion": "the 1/N factor folded into the last BatchNorm",
        "input_size": (3, 32, 32),
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
        "num_classes": 3,
        "metrics": {
            "digits/top1": {"value": 97.8, "kind": "measured", "of": "model", "note": "6 epochs"},
            "imagenet-1k/top1": {"value": 80.9, "kind": "published", "of": "source"},
        },
    }
    # the card states the source and its metrics only for weights loaded from that source
    seed_hf_hub_cache("someone/resnet-source", model.state_dict())
    zoo.load_weights(model, "hf-hub:someone/resnet-source")
    folder = model.save_pretrained(tmp_path / "m", repo_id="someone/zoo-model")
    text = (folder / "README.md").read_text()
    meta = front_matter(text)
    assert meta["library_name"] == "zoo" and meta["license"] == "bsd-3-clause"
    assert meta["pipeline_tag"] == "image-classification" and meta["base_model"] == "someone/resnet-source"
    assert {"zoo", "DepthScaledResNet", "depth_scaled_cifar_resnet"} <= set(meta["tags"])
    # the peer library's own parser: model-index results of this model only (the source's metric is not one)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "zoo"
    (result,) = card.data.eval_results
    assert result.metric_type == "top1" and result.metric_value == 97.8 and result.dataset_name == "digits"
    # the body: usage through the Hub id, source and conversion, architecture, training settings, metric kinds
    assert 'zoo.from_pretrained("hf-hub:someone/zoo-model")' in text
    assert "the 1/N factor folded into the last BatchNorm" in text and "| imagenet-1k/top1 | 80.9 | published |" in text
    assert json.dumps(model_config(model)["init_args"], indent=2, sort_keys=True) in text
    assert '"class_path": "torch.optim.SGD"' in text and '"warmup_epochs": 2' in text
    assert '"layer_decay": 0.75' in text and '"mixup_alpha": 0.8' in text and "cutmix_alpha" not in text
    # the folder still loads (the card is for people; the weights file is the source of truth)
    loaded = zoo.from_pretrained(folder).eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


def test_card_without_a_pretrained_cfg_and_single_file_has_none(tmp_path) -> None:
    folder = small_model().save_pretrained(tmp_path / "plain")
    meta = front_matter((folder / "README.md").read_text())
    assert meta["library_name"] == "zoo" and "model-index" not in meta and "license" not in meta
    single = small_model().save_pretrained(tmp_path / "one.safetensors")
    assert single.is_file() and not (tmp_path / "README.md").exists()


def test_push_to_hub_uploads_the_save_pretrained_folder(tmp_path, monkeypatch) -> None:
    calls: dict = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        calls["upload_folder"] = (repo_id, kwargs)
        shutil.copytree(folder_path, tmp_path / "uploaded")  # what would go over HTTP
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    model = small_model()
    assert model.push_to_hub("someone/zoo-model", private=True, commit_message="first") == "commit-info"
    assert calls["create_repo"] == ("someone/zoo-model", {"private": True, "repo_type": "model", "exist_ok": True})
    repo, kwargs = calls["upload_folder"]
    assert repo == "someone/zoo-model" and kwargs["commit_message"] == "first" and kwargs["repo_type"] == "model"
    uploaded = tmp_path / "uploaded"
    assert sorted(p.name for p in uploaded.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert 'zoo.from_pretrained("hf-hub:someone/zoo-model")' in (uploaded / "README.md").read_text()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(zoo.from_pretrained(uploaded).eval()(x), model.eval()(x), rtol=0, atol=0)
    for bad in ("zoo-model", "a/b/c", "/name", 3):
        with pytest.raises(ZooError, match="namespace/name"):
            zoo.hub.push_to_hub(model, bad)


def test_describe_factory_reads_partials_classes_and_lightning_cli_callables() -> None:
    assert describe_factory(functools.partial(torch.optim.AdamW, lr=1e-3)) == {
        "class_path": "torch.optim.AdamW",
        "init_args": {"lr": 1e-3},
    }
    assert describe_factory(WarmupCosineLR) == {"class_path": "zoo.tasks.optim.WarmupCosineLR", "init_args": {}}

    def instantiator(cls, *args, **kwargs):  # the form jsonargparse gives a class_path callable
        return cls(*args, **kwargs)

    assert describe_factory(functools.partial(instantiator, torch.optim.SGD, lr=0.1, momentum=0.9)) == {
        "class_path": "torch.optim.SGD",
        "init_args": {"lr": 0.1, "momentum": 0.9},
    }
    assert describe_factory(None) is None and "callable" in describe_factory(lambda p: None)


def test_files_saved_with_training_settings_as_model_arguments_still_load(tmp_path, caplog) -> None:
    model = small_model().eval()
    config = model_config(model)
    legacy = {
        **config["init_args"],
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "scheduler": "cosine",
        "warmup_epochs": 1,
        "milestones": [],
        "lr_gamma": 0.1,
        "betas": [0.9, 0.999],
        "nesterov": False,
    }
    path = tmp_path / "old.safetensors"
    save_safetensors(model.state_dict(), path, {_META_CONFIG: json.dumps({**config, "init_args": legacy})})
    with caplog.at_level("INFO"):
        loaded = zoo.from_pretrained(path).eval()
    assert "training settings as model arguments" in caplog.text and "lr" in caplog.text
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)
    # an unknown argument that is not a former training setting is still refused
    save_safetensors(
        model.state_dict(),
        path,
        {_META_CONFIG: json.dumps({**config, "init_args": {**config["init_args"], "depth_of_field": 3}})},
    )
    with pytest.raises(ZooError, match="depth_of_field"):
        zoo.from_pretrained(path)
