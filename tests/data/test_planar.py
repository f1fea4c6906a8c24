"""zoo.data.planar: the arguments of the generated problems are checked as the rest of the zoo checks them."""

from __future__ import annotations

import pytest

from zoo.data.planar import PlanarDataModule, planar_problem
from zoo.errors import ZooError


@pytest.mark.parametrize("split", ["train", "val"])
def test_seed_outside_torch_range_is_one_clear_error(split: str) -> None:
    """A seed torch's generator cannot take (the val split adds 1) is a ZooError naming the range (was torch's
    'Overflow when unpacking long long' ValueError); the largest accepted seed works for both splits."""
    with pytest.raises(ZooError, match=r"seed must be an integer.*2\*\*64 - 2"):
        planar_problem("disc", 4, split=split, seed=2**64 - 1)
    assert planar_problem("disc", 4, split=split, seed=2**64 - 2)[0].shape == (4, 2)
    with pytest.raises(ZooError, match="seed"):
        PlanarDataModule(seed=2**64)
