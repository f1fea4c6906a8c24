"""docs/export.md's claims, on a tiny model of every family: ``torch.export`` with a dynamic batch (the program saved,
loaded, and run at other batch sizes gives eager's logits), a caller's ``torch.compile(fullgraph=True)`` without
gradients, and ``torch.onnx.export(dynamo=True)`` run by onnxruntime where onnxscript and onnxruntime are installed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import zoo

IMAGE = (3, 16, 16)
VIT = {"img_size": 16, "patch_size": 8, "embed_dim": 16, "num_heads": 2, "depth": 2, "num_classes": 3}
SET = {"embed_dim": 16, "num_heads": 2, "num_inducing": 4, "num_classes": 3}
PCT = {
    "embed_dim": 8,
    "sample_points": (8, 4),
    "num_neighbors": 2,
    "depth": 1,
    "fuse_dim": 16,
    "head_dims": (8,),
    "num_classes": 3,
}

# family -> (builder of the model in eval mode, the shape of one example without the batch dim)
FAMILIES: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet": (lambda: zoo.tiny(depth=1, num_classes=3), IMAGE),
    "heun_resnet_adjoint": (lambda: zoo.heun_tiny(depth=2, num_classes=3, memory="adjoint"), IMAGE),
    "momentum_resnet_reversible": (lambda: zoo.momentum_tiny(depth=2, num_classes=3), IMAGE),
    "sinkformer_vit": (lambda: zoo.sinkformer_vit_tiny_patch16_224(**VIT), IMAGE),
    "vmoe_expert_choice": (lambda: zoo.vmoe_tiny_patch32_224(num_experts=2, **VIT), IMAGE),
    "vmoe_token_choice": (lambda: zoo.vmoe_tiny_patch32_224(num_experts=2, router="token_choice", **VIT), IMAGE),
    "vmoe_groups": (lambda: zoo.vmoe_small_patch32_224(num_experts=2, k=2, group_size=4, **VIT), IMAGE),
    "set_sinkformer": (lambda: zoo.set_sinkformer_modelnet40(**SET), (12, 3)),
    "point_cloud_sinkformer": (lambda: zoo.point_cloud_sinkformer(**PCT), (12, 3)),
}


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    build, shape = FAMILIES[name]
    return build().eval(), shape


@pytest.mark.parametrize("name", list(FAMILIES))
def test_export_with_a_dynamic_batch_saves_loads_and_matches_eager(name: str, tmp_path: Path) -> None:
    """Every family exports with the batch dim free (V-MoE's token-choice capacity and expert-choice groups are
    functions of it; they failed with a constraint violation), and the saved program (token choice's capacity
    ceil could not be serialised) gives eager's logits at batch sizes other than the example's."""
    model, shape = _model(name)
    batch = torch.export.Dim("batch", min=2, max=16)
    exported = torch.export.export(model, (torch.randn(4, *shape),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, tmp_path / "model.pt2")
    loaded = torch.export.load(tmp_path / "model.pt2").module()
    for b in (2, 5):
        x = torch.randn(b, *shape)
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["momentum_resnet_reversible", "sinkformer_vit", "vmoe_token_choice"])
def test_compile_fullgraph_without_gradients_matches_eager(name: str) -> None:
    """Without gradients a stack is traced like any module (docs/export.md): inference under a caller's
    torch.compile is one graph (a reversible stack included), and gives eager's logits."""
    model, shape = _model(name)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["vmoe_token_choice", "point_cloud_sinkformer"])
def test_onnx_export_runs_in_onnxruntime(name: str, tmp_path: Path) -> None:
    """ONNX (dynamo exporter): V-MoE token choice and PCT exported graphs held ``aten.sort.stable`` (slot ranks,
    farthest point sampling's lexicographic order), which the exporter cannot translate; now onnxruntime runs them
    and gives eager's logits."""
    pytest.importorskip("onnxscript")
    onnxruntime = pytest.importorskip("onnxruntime")
    model, shape = _model(name)
    x = torch.randn(2, *shape)
    torch.onnx.export(model, (x,), dynamo=True, verbose=False).save(tmp_path / "model.onnx")
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"))
    (logits,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(logits), model(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("router", ["expert_choice", "token_choice"])
def test_relaxed_router_exports_with_a_dynamic_batch(router: str) -> None:
    """The table's relaxed V-MoE row: traced, the Dykstra solver uses no out= ops (which refuse inputs that require
    grad) and the row chunks do not specialise the batch: the program gives eager's logits at another batch size,
    also for an input that requires grad."""
    torch.manual_seed(0)
    model = zoo.vmoe_tiny_patch32_224(num_experts=2, router=router, topk="soft", **VIT).eval()
    batch = torch.export.Dim("batch", min=2, max=16)
    exported = torch.export.export(model, (torch.randn(4, *IMAGE),), dynamic_shapes=({0: batch},))
    x = torch.randn(3, *IMAGE)
    with torch.no_grad():
        want = model(x)
        torch.testing.assert_close(exported.module()(x), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(exported.module()(x.requires_grad_(True)).detach(), want, rtol=1e-5, atol=1e-6)
