"""Random state in checkpoints, so that a fit resumed from a checkpoint draws what the uninterrupted fit drew.

Lightning's checkpoints hold the weights, the optimiser, the schedule and the loops' progress, but not torch's
global random generators. After a resume, dropout, drop-path, MixUp / CutMix and anything else that draws from
them started from the resumed process's seed: the fit went on differently from the one that was interrupted.
The zoo's models write the generators' states into every checkpoint (:func:`save_rng_states`) and a resumed fit
restores them (:func:`restore_rng_states`); the training data's order and augmentation follow the epoch alone
(:mod:`zoo.data.base`), and the training loader's position in its epoch comes back from the checkpoint too
(:func:`load_pending_loader_states`). Together, a fit resumed from a checkpoint repeats the uninterrupted fit's
steps (bit for bit where the computation is deterministic), from the end of an epoch or from its middle.

Under DDP every process starts from the same seed and draws alike, so rank 0's states, which the checkpoint
holds, are every rank's: its CPU generator's and its own CUDA device's, which every rank restores on its own device.
"""

from __future__ import annotations

from typing import Any

import torch

from zoo.errors import ZooError

__all__ = ["RNG_STATES_KEY", "load_pending_loader_states", "restore_rng_states", "save_rng_states"]

#: the checkpoint entry holding the generators' states
RNG_STATES_KEY = "zoo_rng_states"


def save_rng_states(checkpoint: dict[str, Any]) -> None:
    """Write torch's global CPU generator state and, where CUDA has been initialised, the current CUDA device's
    into ``checkpoint[RNG_STATES_KEY]`` (uint8 tensors; None for CUDA otherwise).

    Args:
        checkpoint: the checkpoint Lightning is writing.
    """
    cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None
    checkpoint[RNG_STATES_KEY] = {"torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng_states(module: Any, checkpoint: dict[str, Any]) -> None:
    """In a resumed fit (``module``'s Trainer is fitting), set torch's generators to the states
    ``checkpoint[RNG_STATES_KEY]`` holds: the CPU generator's, and the CUDA state on the current device when the
    checkpoint holds one and CUDA runs here. Anything else (``load_from_checkpoint``, validate, test, a checkpoint
    without the entry) leaves them alone. The entry is untrusted input: one ZooError unless it holds uint8
    vectors of the generators' sizes.

    Args:
        module: the LightningModule being restored.
        checkpoint: the checkpoint Lightning is reading.
    """
    trainer = getattr(module, "_trainer", None)
    states = checkpoint.get(RNG_STATES_KEY)
    if trainer is None or trainer.state.fn != "fit" or states is None:
        return
    cpu = states.get("torch") if isinstance(states, dict) else None
    cuda = states.get("cuda") if isinstance(states, dict) else None
    restore_cuda = cuda is not None and torch.cuda.is_available()

    def is_state(value: Any, like: torch.Tensor) -> bool:
        return (
            isinstance(value, torch.Tensor)
            and value.dtype == torch.uint8
            and value.shape == like.shape
            and value.device.type == "cpu"
        )

    if (
        not isinstance(states, dict)
        or not is_state(cpu, torch.get_rng_state())
        or (cuda is not None and not isinstance(cuda, torch.Tensor))
        or (restore_cuda and not is_state(cuda, torch.cuda.get_rng_state()))
    ):
        raise ZooError(
            f"the checkpoint's '{RNG_STATES_KEY}' entry is damaged (expected uint8 generator states); remove it "
            "from the checkpoint to resume without the interrupted fit's random state"
        )
    torch.set_rng_state(cpu)
    if restore_cuda:
        torch.cuda.set_rng_state(cuda)


def load_pending_loader_states(trainer: Any) -> None:
    """Hand the training loaders the states a resumed fit's checkpoint holds for them, if Lightning has not: it
    loads them when it sets the training data up, but a fit whose ``configure_optimizers`` asked for the run's
    length (``trainer.estimated_stepping_batches``, which every schedule spanning the run needs) set the data up
    before the checkpoint was read, and the states were dropped, so a fit resumed in the middle of an epoch started
    that epoch's data again. Called at the start of training (``on_train_start``), before the first batch.

    Args:
        trainer: the Trainer of the fit.
    """
    fit_loop = getattr(trainer, "fit_loop", None)
    load = getattr(fit_loop, "_load_combined_loader_states", None)
    if callable(load):  # it loads only in a restarting fit with states still pending, once
        load()
