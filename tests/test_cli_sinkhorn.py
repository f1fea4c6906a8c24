"""``zoo convert --to sinkhorn``: a timm ViT checkpoint (file or hf-hub, offline) becomes a file that the zoo
Sinkformer ViT builder loads; n_iter=1 of that file is the timm function. Tests make their own random
checkpoints (vit_tiny_patch16_224); nothing downloads."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from helpers import seed_hf_hub_cache
from test_cli import assert_convert_fails, run_main, walk_files, zoo_lines

import zoo
from zoo.models import SinkformerViT


@pytest.fixture(scope="module")
def timm_source(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.nn.Module, Path]:
    """A randomised timm vit_tiny_patch16_224 and its weights as a ``.pth`` file."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224").eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("timm_vit") / "vit_tiny.pth"
    torch.save(model.state_dict(), path)
    return model, path


def images() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= tol * max(1.0, b.abs().max().item()))


def test_convert_timm_vit_file_loads_into_the_zoo_builder(
    timm_source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, weights = timm_source
    out_file = tmp_path / "sink.safetensors"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "timm:vit_tiny_patch16_224",
            "--weights",
            str(weights),
            "--to",
            "sinkhorn",
            "--n-iter",
            "3",
            "--out",
            str(out_file),
        ],
        capsys,
    )
    assert code == 0, err
    assert zoo_lines(out)[-1].startswith(f"wrote {out_file} (SinkformerViT, 5.")
    assert not [p for p in walk_files(tmp_path) if p.name.endswith(".tmp")]
    x = images()
    model = zoo.from_pretrained(out_file).eval()
    assert type(model) is SinkformerViT and model.hparams.n_iter == 3 and all(b.attn.n_iter == 3 for b in model.blocks)
    same_as_timm = zoo.sinkformer_vit_tiny_patch16_224(weights=str(out_file), n_iter=1).eval()
    with torch.no_grad():
        assert close(same_as_timm(x), source(x))
        out = model(x)
        assert not close(out, source(x), 1e-3)
        same_as_timm.set_n_iter(3)
        assert close(same_as_timm(x), out)


def test_convert_from_hf_hub_weights_with_options(
    timm_source, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source, _ = timm_source
    seed_hf_hub_cache("timm/vit_tiny_patch16_224.zoo_test", source.state_dict())
    out_dir = tmp_path / "sink"
    code, out, err = run_main(
        [
            "convert",
            "--from",
            "timm:vit_tiny_patch16_224",
            "--weights",
            "hf-hub:timm/vit_tiny_patch16_224.zoo_test",
            "--to",
            "sinkhorn",
            "--n-iter",
            "1",
            "--option",
            "label_smoothing=0.1",
            "--option",
            "record_stats=true",
            "--out",
            str(out_dir),
        ],
        capsys,
    )
    assert code == 0, err
    model = SinkformerViT.from_pretrained(out_dir).eval()
    assert (model.hparams.n_iter, model.hparams.label_smoothing, model.hparams.record_stats) == (1, 0.1, True)
    x = images()
    with torch.no_grad():
        assert close(model(x), source(x))
    assert len(model.attention_stats()) == 12


@pytest.mark.parametrize(
    "argv, words",
    [
        (
            ["--from", "timm:vit_tiny_patch16_224", "--weights", "none", "--to", "sinkhorn", "--n-iter", "0"],
            ["n_iter must be an integer >= 1"],
        ),
        (
            ["--from", "timm:vit_tiny_patch16_224", "--weights", "none", "--to", "sinkhorn", "--option", "gamma=0.9"],
            ["unknown option 'gamma'", "n_iter"],
        ),
        (
            ["--from", "timm:resnet18", "--weights", "none", "--to", "sinkhorn"],
            ["cannot convert", "'sinkhorn'", "MultiheadAttention"],
        ),
        (
            ["--from", "timm:vit_tiny_patch16_224", "--weights", "hf-hub:timm/not_in_the_cache", "--to", "sinkhorn"],
            ["hf-hub:timm/not_in_the_cache"],
        ),
    ],
)
def test_convert_sinkhorn_errors(
    argv: list[str], words: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert_convert_fails(argv, words, tmp_path, capsys)
