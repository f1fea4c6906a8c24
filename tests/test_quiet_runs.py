"""What a ``zoo`` run prints: the lines that need no action are dropped, every other message stays."""

from __future__ import annotations

import logging
import warnings

import pytest

import zoo.ops.compiled  # noqa: F401  (installs the cpp_extension filter)
from zoo.cli import quiet_lightning


def test_lightning_cloud_tips_dropped_other_info_kept(caplog: pytest.LogCaptureFixture) -> None:
    from lightning.pytorch.utilities.rank_zero import rank_zero_info

    quiet_lightning()
    quiet_lightning()  # idempotent: one filter
    logger = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    assert sum(type(f).__name__ == "_DropLightningTips" for f in logger.filters) == 1
    with caplog.at_level(logging.INFO, logger="lightning.pytorch.utilities.rank_zero"):
        rank_zero_info("💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]")
        rank_zero_info("GPU available: False, used: False")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["GPU available: False, used: False"]


def test_csv_logger_note_silenced_other_warnings_kept() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_lightning()  # its filters go in front of "always"
        warnings.warn("Starting from v1.9.0, `tensorboardX` has been removed", UserWarning, stacklevel=1)
        warnings.warn("something a user must act on", UserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something a user must act on"]


def test_no_cuda_runtime_note_dropped() -> None:
    """torch's loggers do not propagate to the root, so the records are collected by a handler on the logger."""

    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.messages: list[str] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.messages.append(record.getMessage())

    logger, handler = logging.getLogger("torch.utils.cpp_extension"), Collect()
    logger.addHandler(handler)
    try:
        logger.warning("No CUDA runtime is found, using CUDA_HOME='%s'", "/usr/local")
        logger.warning("Error building extension 'x'")
    finally:
        logger.removeHandler(handler)
    assert handler.messages == ["Error building extension 'x'"]
