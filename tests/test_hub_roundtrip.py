"""save_pretrained / from_pretrained keep what the model states about itself (zoo.hub): its pretrained_cfg (the
transform timm reads, architecture, tag, source) is stored and restored, checked as untrusted input; the config and
model card state source weights and metrics only when those weights were loaded; a classifier absent from the
weights, or absent from the model, is left out as one of another size is; torchvision weight names on a model
without torchvision's layout say so; a features_only extractor is refused at save time. Everything runs offline."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import timm
import torch
import yaml
from helpers import randomize_batchnorm, seed_hf_hub_cache, seed_torchvision_cache
from safetensors.torch import save_file

import zoo
from zoo import hub
from zoo.errors import ZooError

SMALL_R18 = {"widths": (4, 4, 8, 8)}
MNIST = {"embed_dim": 8, "attn_head_dim": 4}


def data_config(model: torch.nn.Module) -> dict:
    return timm.data.resolve_data_config({}, model=model)


def card(folder: Path) -> tuple[dict, str]:
    text = (folder / "README.md").read_text()
    return yaml.safe_load(text.split("---\n")[1]), text


def stored_config(path: Path) -> dict:
    meta, _ = hub.safetensors_header(path / "model.safetensors" if path.is_dir() else path)
    return json.loads(meta["zoo.config"])


# ------------------------------------------------------------------------------------------------ pretrained_cfg


@pytest.mark.parametrize("target", ["folder", "m.safetensors"])
def test_from_pretrained_restores_the_pretrained_cfg(tmp_path, target):
    model = zoo.sinkformer_vit_mnist(**MNIST)
    path = model.save_pretrained(tmp_path / target)
    loaded = zoo.from_pretrained(path)
    assert data_config(loaded) == data_config(model)  # MNIST's mean / std and crop 1.0, not the family's
    assert data_config(loaded)["mean"] == (0.1307,) and data_config(loaded)["crop_pct"] == 1.0
    for key in ("architecture", "tag", "input_size", "mean", "std", "crop_pct", "classifier", "num_classes"):
        assert loaded.pretrained_cfg[key] == model.pretrained_cfg[key], key
    assert loaded.default_cfg is loaded.pretrained_cfg
    if target == "folder":  # config.json is the same config (for people and tools)
        assert json.loads((path / "config.json").read_text())["pretrained_cfg"]["mean"] == [0.1307]


def test_hub_weights_keep_their_transform_and_source_through_a_save(tmp_path):
    torch.manual_seed(0)
    seed_hf_hub_cache("timm/resnet18.a1_in1k", zoo.resnet18(**SMALL_R18).state_dict())
    model = zoo.create_model("resnet18.a1_in1k", pretrained=True, num_classes=10, **SMALL_R18)
    model.save_pretrained(tmp_path / "q")
    loaded = zoo.from_pretrained(tmp_path / "q")
    assert data_config(loaded) == data_config(model)
    assert data_config(loaded)["interpolation"] == "bicubic" and data_config(loaded)["crop_pct"] == 0.95
    cfg = loaded.pretrained_cfg
    assert (cfg["architecture"], cfg["tag"], cfg["source"]) == ("resnet18", "a1_in1k", "hf-hub:timm/resnet18.a1_in1k")
    assert cfg["num_classes"] == 10 and cfg["test_input_size"] == (3, 288, 288)
    # overrides: the model as built (num_classes) with the stored transform
    other = zoo.from_pretrained(tmp_path / "q", num_classes=4)
    assert other.pretrained_cfg["num_classes"] == 4 and data_config(other) == data_config(model)


def test_builder_given_a_saved_folder_restores_its_pretrained_cfg(tmp_path):
    torch.manual_seed(0)
    seed_hf_hub_cache("timm/resnet18.a1_in1k", zoo.resnet18(**SMALL_R18).state_dict())
    model = zoo.create_model("resnet18.a1_in1k", pretrained=True, num_classes=10, **SMALL_R18)
    model.save_pretrained(tmp_path / "q")
    assert hub.recorded_pretrained_cfg(tmp_path / "q")["interpolation"] == "bicubic"
    built = zoo.resnet18(weights=str(tmp_path / "q"), **SMALL_R18)
    assert data_config(built) == data_config(model)  # not resnet18's default tag (bilinear, 0.875)


def test_folder_saved_without_a_pretrained_cfg_loads_as_before(tmp_path):
    model = zoo.sinkformer_vit_mnist(**MNIST)
    config = hub.model_config(model)
    assert "pretrained_cfg" in config
    del config["pretrained_cfg"]
    path = tmp_path / "old.safetensors"
    hub.save_safetensors(model.state_dict(), path, {"zoo.config": json.dumps(config)})
    loaded = zoo.from_pretrained(path)
    fresh = type(model)(**config["init_args"])
    assert loaded.pretrained_cfg == fresh.pretrained_cfg  # the class's own cfg, as before
    assert hub.recorded_pretrained_cfg(path) is None
    torch.testing.assert_close(loaded(torch.ones(1, 1, 28, 28)), model(torch.ones(1, 1, 28, 28)), rtol=0, atol=0)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"class_path": "os.system"}, "not PretrainedCfg fields: class_path"),
        ({"mean": "0.5"}, "'mean'.*list of numbers"),
        ({"mean": [0.1, 0.2]}, "mean must hold 1 finite numbers"),
        ({"interpolation": "import os"}, "interpolation must be one of"),
        ({"crop_pct": 7}, "crop_pct must be in"),
        ({"tag": {"nested": 1}}, "'tag'.*string or null"),
        ({"notes": ["x" * 100_000]}, "characters"),
        ({"model_args": {"a": [[[[[[[[1]]]]]]]]}}, "nests deeper"),
        ({"pool_size": list(range(5000))}, "entries"),
        ({"metrics": {"top1": {"value": 1.0, "kind": "claimed", "of": "model"}}}, "kind"),
        ({"fixed_input_size": "yes"}, "true or false"),
    ],
)
def test_stored_pretrained_cfg_is_checked_as_untrusted_input(tmp_path, change, match):
    model = zoo.sinkformer_vit_mnist(**MNIST)
    config = hub.model_config(model)
    config["pretrained_cfg"] = {**config["pretrained_cfg"], **change}
    path = tmp_path / "crafted.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path), {"zoo.config": json.dumps(config)})
    with pytest.raises(ZooError, match=match):
        zoo.from_pretrained(path)
    with pytest.raises(ZooError, match=match):
        hub.recorded_pretrained_cfg(path)


def test_stored_pretrained_cfg_that_is_not_an_object_or_not_finite(tmp_path):
    model = zoo.sinkformer_vit_mnist(**MNIST)
    tensors = {k: v.contiguous() for k, v in model.state_dict().items()}
    config = hub.model_config(model)
    for raw, match in [
        (json.dumps({**config, "pretrained_cfg": [1, 2]}), "pretrained_cfg must be a JSON object"),
        (json.dumps(config).replace('"crop_pct": 1.0', '"crop_pct": NaN'), "not plain JSON"),  # Python reads NaN
    ]:
        save_file(tensors, str(tmp_path / "a.safetensors"), {"zoo.config": raw})
        with pytest.raises(ZooError, match=match):
            zoo.from_pretrained(tmp_path / "a.safetensors")


# ------------------------------------------------------------------------------------------------ model cards


def test_cards_of_models_built_without_weights_claim_no_weights_or_metrics(tmp_path):
    for name, builder, absent in [
        ("st", zoo.set_transformer_modelnet40, ["87.8", "86.3"]),
        ("cd", zoo.sinkformer_vit_cats_dogs, ["79.5"]),
        ("r", lambda: zoo.resnet18(num_classes=10), ["69.758", "IMAGENET1K_V1", "computes the source function"]),
    ]:
        model = builder()
        model.save_pretrained(tmp_path / name)
        meta, text = card(tmp_path / name)
        assert "model-index" not in meta and "base_model" not in meta, name
        assert "## Source weights" not in text and "## Metrics" not in text, name
        assert not [s for s in absent if s in text], name
        stored = stored_config(tmp_path / name)["pretrained_cfg"]
        assert not {"source", "metrics", "conversion", "url"} & set(stored), name
        assert any("no weights of" in n for n in stored["notes"]), name
        # the model's transform is kept, and the reloaded model's card claims nothing either
        reloaded = zoo.from_pretrained(tmp_path / name)
        reloaded.save_pretrained(tmp_path / f"{name}2")
        assert "model-index" not in card(tmp_path / f"{name}2")[0], name


def test_card_states_loaded_torchvision_weights_and_keeps_them_through_a_reload(tmp_path):
    seed_torchvision_cache("resnet18", "IMAGENET1K_V1")
    model = zoo.create_model("resnet18.tv_in1k", pretrained=True)
    model.save_pretrained(tmp_path / "tv")
    _, text = card(tmp_path / "tv")
    assert "- Source: `ResNet18_Weights.IMAGENET1K_V1`" in text and "| imagenet-1k/top1 | 69.758 |" in text
    assert "computes the source function" in text and text.startswith("---") and "# resnet18.tv_in1k" in text
    reloaded = zoo.from_pretrained(tmp_path / "tv")
    reloaded.save_pretrained(tmp_path / "again")
    assert "- Source: `ResNet18_Weights.IMAGENET1K_V1`" in card(tmp_path / "again")[1]
    # a new head: the source is still where the body came from, but the conversion sentence no longer holds
    ten = zoo.create_model("resnet18.tv_in1k", pretrained=True, num_classes=10)
    ten.save_pretrained(tmp_path / "ten")
    _, text = card(tmp_path / "ten")
    assert "- Source: `ResNet18_Weights.IMAGENET1K_V1`" in text and "computes the source function" not in text
    # the table's cfg with weights loaded from elsewhere: not the table's weights
    other = zoo.resnet18()
    torch.save(zoo.resnet18().state_dict(), tmp_path / "other.pth")
    zoo.load_weights(other, str(tmp_path / "other.pth"))
    other.save_pretrained(tmp_path / "other")
    assert "IMAGENET1K_V1" not in card(tmp_path / "other")[1]


def model_with_published_model_metrics() -> torch.nn.Module:
    torch.manual_seed(0)
    model = zoo.cifar_resnet(layers=(1, 1), widths=(4, 8), num_classes=3)
    model.pretrained_cfg = {
        **model.pretrained_cfg,
        "architecture": "cifar_resnet",
        "tag": "test",
        "source": "hf-hub:someone/source",
        "metrics": {"digits/top1": {"value": 97.8, "kind": "measured", "of": "model"}},
    }
    seed_hf_hub_cache("someone/source", model.state_dict())
    return model


def test_model_metrics_hold_only_with_the_loaded_head(tmp_path):
    model = model_with_published_model_metrics()
    model.save_pretrained(tmp_path / "none")  # the cfg names weights, none were loaded
    assert "model-index" not in card(tmp_path / "none")[0] and "97.8" not in card(tmp_path / "none")[1]
    zoo.load_weights(model, "hf-hub:someone/source")
    model.save_pretrained(tmp_path / "loaded")
    (result,) = card(tmp_path / "loaded")[0]["model-index"][0]["results"]
    assert result["metrics"][0]["value"] == 97.8
    # reloaded: the file states its weights, the card still does
    reloaded = zoo.from_pretrained(tmp_path / "loaded")
    reloaded.save_pretrained(tmp_path / "reloaded")
    assert "model-index" in card(tmp_path / "reloaded")[0]
    # another head: the model no longer computes the measured function
    zoo.from_pretrained(tmp_path / "loaded", num_classes=5).save_pretrained(tmp_path / "five")
    meta, text = card(tmp_path / "five")
    assert "model-index" not in meta and "97.8" not in text and "Source: `hf-hub:someone/source`" in text
    model.reset_classifier(7)
    model.save_pretrained(tmp_path / "reset")
    assert "model-index" not in card(tmp_path / "reset")[0]


# ------------------------------------------------------------------------------------------------ classifier leniency


def test_weights_without_a_classifier_load_into_a_model_with_one(tmp_path, caplog):
    torch.manual_seed(0)
    source = randomize_batchnorm(zoo.resnet20_cifar(num_classes=0, widths=(4, 8, 8))).eval()
    source.save_pretrained(tmp_path / "nc0")
    torch.manual_seed(5)
    init_fc = {k: v.clone() for k, v in zoo.resnet20_cifar(num_classes=5, widths=(4, 8, 8)).fc.state_dict().items()}
    torch.manual_seed(5)
    with caplog.at_level(logging.INFO):
        model = zoo.resnet20_cifar(weights=str(tmp_path / "nc0"), num_classes=5, widths=(4, 8, 8))
    assert "holds no classifier" in caplog.text and "fc.weight" in caplog.text
    assert all(torch.equal(model.fc.state_dict()[k], init_fc[k]) for k in init_fc)  # left at its initialisation
    body = source.state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in body.items())
    loaded = zoo.from_pretrained(tmp_path / "nc0", num_classes=5)
    assert loaded.fc.out_features == 5 and all(torch.equal(loaded.state_dict()[k], v) for k, v in body.items())


@pytest.mark.parametrize(
    "builder, kwargs, head",
    [
        (zoo.resnet18, SMALL_R18, "fc"),
        (zoo.sinkformer_vit_mnist, MNIST, "head"),
    ],
)
def test_headless_pth_loads_into_a_builder_with_a_head(tmp_path, builder, kwargs, head):
    torch.manual_seed(0)
    torch.save(builder(num_classes=0, **kwargs).state_dict(), tmp_path / "b.pth")
    model = builder(weights=str(tmp_path / "b.pth"), **kwargs)
    assert getattr(model, head).out_features == model.num_classes > 0


def test_full_weights_load_into_a_headless_model_through_load_weights(tmp_path, caplog):
    torch.manual_seed(0)
    full = zoo.resnet18(**SMALL_R18)
    torch.save(full.state_dict(), tmp_path / "full.pth")
    with caplog.at_level(logging.INFO):
        headless = zoo.load_weights(zoo.resnet18(num_classes=0, **SMALL_R18), str(tmp_path / "full.pth"))
    assert "the model has no classifier" in caplog.text
    own = headless.state_dict()
    assert "fc.weight" not in own and all(torch.equal(own[k], full.state_dict()[k]) for k in own)
    # the same as the builder (which already left the head out)
    built = zoo.resnet18(weights=str(tmp_path / "full.pth"), num_classes=0, **SMALL_R18)
    assert all(torch.equal(built.state_dict()[k], own[k]) for k in own)


def test_only_the_classifier_is_lenient(tmp_path):
    torch.manual_seed(0)
    state = zoo.resnet18(**SMALL_R18).state_dict()
    for name, sd, match in [
        ("body", {k: v for k, v in state.items() if k != "layer1.0.conv1.weight"}, "missing.*layer1.0.conv1.weight"),
        ("extra", {**state, "extra.weight": torch.zeros(1)}, "unexpected.*extra.weight"),
        ("half_head", {k: v for k, v in state.items() if k != "fc.bias"}, "missing.*fc.bias"),
    ]:
        torch.save(sd, tmp_path / f"{name}.pth")
        with pytest.raises(ZooError, match=match):
            zoo.load_weights(zoo.resnet18(**SMALL_R18), str(tmp_path / f"{name}.pth"))
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.save({**headless, "head.weight": torch.zeros(2, 2)}, tmp_path / "other_head.pth")
    with pytest.raises(ZooError, match="unexpected.*head.weight"):  # not this model's classifier name
        zoo.load_weights(zoo.resnet18(num_classes=0, **SMALL_R18), str(tmp_path / "other_head.pth"))


def test_classifier_prefixes_are_the_models_own():
    assert hub.classifier_prefixes(zoo.resnet18(num_classes=0, **SMALL_R18)) == ("fc.",)
    assert hub.classifier_prefixes(zoo.sinkformer_vit_mnist(**MNIST)) == ("head.",)


# ------------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "build, weights, match",
    [
        (lambda: zoo.create_model("resnet18.tv_in1k", pretrained=True, in_chans=1), None, r"in_chans=1"),
        (lambda: zoo.create_model("resnet18.tv_in1k", pretrained=True, stem="cifar"), None, r"stem='cifar'"),
        (lambda: zoo.create_model("resnet18.tv_in1k", pretrained=True, widths=(4, 4, 8, 8)), None, r"widths="),
        (zoo.resnet20_cifar, "IMAGENET1K_V1", r"stem='cifar'"),
        (lambda: zoo.sinkformer_vit_mnist(**MNIST), "ResNet18_Weights.IMAGENET1K_V1", "no torchvision counterpart"),
    ],
)
def test_torchvision_name_on_a_model_without_torchvision_layout_says_why(build, weights, match):
    with pytest.raises(ZooError) as info:
        model = build()
        zoo.load_weights(model, weights)
    message = str(info.value)
    assert "torchvision's layout (in_chans=3, the ImageNet stem" in message and "not an existing file" in message
    assert re.search(match, message), message
    assert "a torchvision weight name such as" not in message  # no longer suggests what it just refused


def test_a_missing_path_on_a_model_without_torchvision_layout_suggests_no_torchvision_name(tmp_path):
    with pytest.raises(ZooError, match="not an existing file or folder; give a weight file") as info:
        zoo.load_weights(zoo.resnet20_cifar(), str(tmp_path / "nope.pth"))
    assert "torchvision" not in str(info.value)


def test_features_only_extractor_is_refused_at_save_time(tmp_path):
    extractor = zoo.resnet18(features_only=True, **SMALL_R18)
    for target in ("fo", "fo.safetensors"):
        with pytest.raises(ZooError, match="features_only.*save the model before wrapping it.*features_only=True"):
            zoo.save_pretrained(extractor, tmp_path / target)
        assert not (tmp_path / target).exists()
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    # the fix the message gives works
    torch.manual_seed(0)
    zoo.resnet18(**SMALL_R18).save_pretrained(tmp_path / "model")
    features = zoo.resnet18(weights=str(tmp_path / "model"), features_only=True, **SMALL_R18)
    assert len(features.eval()(torch.randn(2, 3, 32, 32))) == len(features.feature_info)


def test_from_pretrained_returns_the_model_in_eval_mode(tmp_path):
    """As Hugging Face's from_pretrained: the model comes back in eval mode, so its outputs are the saved model's in
    eval mode (BatchNorm on its running statistics), whether the file, the folder or a Lightning checkpoint."""
    torch.manual_seed(0)
    model = randomize_batchnorm(zoo.depth_scaled_cifar_resnet(layers=(1, 1, 1), widths=(4, 8, 8)))
    model.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m.safetensors")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        want = model.eval()(x)
    for src in (tmp_path / "m", tmp_path / "m.safetensors"):
        loaded = zoo.from_pretrained(src)
        assert not any(m.training for m in loaded.modules())
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), want, rtol=0, atol=0)
        assert loaded.train().training  # and back to training on request


def test_a_lightning_checkpoint_keeps_the_pretrained_cfg(tmp_path):
    """A Lightning checkpoint of a zoo model holds its pretrained_cfg as save_pretrained does: from_pretrained,
    load_from_checkpoint and a builder's weights= give MNIST's transform back, not the family's default; a
    crafted cfg in the checkpoint is refused as untrusted input."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from zoo.models import SinkformerViT

    model = zoo.sinkformer_vit_mnist(**MNIST)
    size = model.pretrained_cfg["input_size"]
    x, y = torch.randn(4, *size), torch.randint(0, 10, (4,))
    trainer = pl.Trainer(
        max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=4))
    trainer.save_checkpoint(tmp_path / "m.ckpt")
    default = SinkformerViT(**{k: v for k, v in model.hparams.items() if k != "weights"})
    assert data_config(default)["mean"] != (0.1307,)  # the family's own transform, what was returned before
    for loaded in (
        zoo.from_pretrained(tmp_path / "m.ckpt"),
        SinkformerViT.load_from_checkpoint(tmp_path / "m.ckpt"),
        zoo.sinkformer_vit_mnist(**MNIST, weights=str(tmp_path / "m.ckpt")),
    ):
        assert data_config(loaded) == data_config(model) and data_config(loaded)["mean"] == (0.1307,)
        assert loaded.pretrained_cfg["architecture"] == model.pretrained_cfg["architecture"]
    crafted = torch.load(tmp_path / "m.ckpt", weights_only=True)
    crafted[hub.CHECKPOINT_CFG_KEY]["mean"] = "os.system"
    torch.save(crafted, tmp_path / "crafted.ckpt")
    with pytest.raises(ZooError, match="mean"):
        zoo.from_pretrained(tmp_path / "crafted.ckpt")
