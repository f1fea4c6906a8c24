"""Shared fixtures: every test runs offline, with torch hub and Hugging Face caches in a tmp folder."""

from __future__ import annotations

import functools
import os
import socket
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before anything imports huggingface_hub
# The fused (torch.compile'd) fixed-point kernels compute the eager kernels' integers bit for bit
# (tests/nn/test_momentum.py checks it with fusion on); the suite runs them eagerly, because every
# process would compile them again for each dtype and shape class (seconds each), subprocesses included.
os.environ.setdefault("ZOO_FUSED_FIXED_POINT", "0")
# The same for the compiled Sinkhorn chunk kernels (tests/ops/test_sinkhorn.py compares them with eager).
os.environ.setdefault("ZOO_COMPILE_SINKHORN", "0")


@pytest.fixture(autouse=True)
def offline_caches(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``TORCH_HOME`` / ``HF_HOME`` in a fresh tmp folder, ``HF_HUB_OFFLINE=1``; returns that folder.

    huggingface_hub reads its cache folder and offline flag when it is imported, so its constants are
    patched too; the torch hub folder is set with ``torch.hub.set_dir`` and restored afterwards.
    """
    import huggingface_hub.constants as hf_constants

    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", str(home / "torch"))
    monkeypatch.setenv("HF_HOME", str(home / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HOME", str(home / "hf"))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(home / "hf" / "hub"))
    real_connect = socket.socket.connect

    def local_only(sock: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and host not in ("127.0.0.1", "::1", "localhost"):
            raise RuntimeError(f"test tried to reach the network: {address!r}")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", local_only)
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(home / "torch" / "hub"))
    try:
        yield home
    finally:
        torch.hub.set_dir(previous)


@pytest.fixture(scope="session")
def lightning_ckpt(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    """A ``.ckpt`` written by a real ``Trainer.fit`` (2 steps, random data) of
    ``depth_scaled_cifar_resnet(layers=(2, 2, 2), widths=(8, 16, 32))``, and the trained state dict."""
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    import zoo

    root = tmp_path_factory.mktemp("lightning_ckpt")
    pl.seed_everything(0, verbose=False)
    model = zoo.depth_scaled_cifar_resnet(
        layers=(2, 2, 2), widths=(8, 16, 32), optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9)
    )
    data = TensorDataset(torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,)))
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=1,
        limit_train_batches=2,
        limit_val_batches=0,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, DataLoader(data, batch_size=4))
    (ckpt,) = (root / "checkpoints").glob("*.ckpt")
    return ckpt, {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture
def one_thread() -> None:
    """One torch thread for the test (small models run fastest on one thread; two threads on a busy 2-core
    machine are up to 10x slower). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
