"""Helpers shared by the tests (importable as ``helpers``: pytest puts ``tests/`` on the path)."""

from __future__ import annotations

import timm
import torch
import torch.nn as nn
import torchvision


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BatchNorm affine parameters and running statistics, so that a wrong depth-factor fold
    changes the output (zero-initialised last BNs, as timm's, would hide the residual branches)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(0.5 + torch.rand(n, generator=g))
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(0.5 + torch.rand(n, generator=g))
    return model


def seed_hf_hub_cache(repo_id: str, state_dict: dict[str, torch.Tensor]) -> None:
    """Put ``model.safetensors`` of ``repo_id`` in the (tmp, offline) Hugging Face cache, as a download would,
    so that ``hf-hub:<repo_id>`` weights resolve without network."""
    from pathlib import Path

    import huggingface_hub.constants as hf_constants
    from safetensors.torch import save_file

    root = Path(hf_constants.HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}"
    commit = "0" * 40
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    snapshot = root / "snapshots" / commit
    snapshot.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state_dict.items()}, str(snapshot / "model.safetensors"))


def build_resnet_source(name: str, **kwargs) -> nn.Module:
    """A torchvision ("tv_resnet50") or timm ("timm_resnet18") ResNet, seeded, random BN statistics, eval."""
    torch.manual_seed(0)
    lib, arch = name.split("_", 1)
    model = getattr(torchvision.models, arch)(**kwargs) if lib == "tv" else timm.create_model(arch, **kwargs)
    return randomize_batchnorm(model).eval()


def seed_torchvision_cache(arch: str, weights: str, seed: int = 0) -> None:
    """Put random weights of torchvision's ``arch`` under the file name of its ``weights`` entry in the (tmp,
    offline) torch hub cache, as a download would, so that ``weights=<name>`` resolves without network."""
    import os
    from pathlib import Path

    enum = torchvision.models.get_model_weights(arch)[weights]
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=len(enum.meta["categories"]))
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(randomize_batchnorm(model, seed).state_dict(), path)
