"""zoo.data.teacher: the arguments of the teacher task are checked as the rest of the zoo checks them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zoo.data.teacher import TeacherDataModule, teacher_regression
from zoo.errors import ZooError


def test_numpy_integers_are_integers() -> None:
    """Sizes and seeds from numpy (a seed sweep over np.arange) give the data of the same Python integers (they
    were refused as 'must be a positive integer, got np.int64(3)')."""
    x, y = teacher_regression(np.int64(6), dim=np.int64(3), seed=np.int64(2))
    ref = teacher_regression(6, dim=3, seed=2)
    assert torch.equal(x, ref[0]) and torch.equal(y, ref[1])
    data = TeacherDataModule(dim=3, num_train=np.int64(4), num_val=2, num_test=2, seed=np.int64(2), batch_size=4)
    data.setup("fit")
    assert torch.equal(data.train_dataset.tensors[1], teacher_regression(8, dim=3, seed=2)[1][:4])


@pytest.mark.parametrize("seed", [2**64, -(2**63) - 1, 1.0])
def test_seed_outside_torch_range_is_one_clear_error(seed) -> None:
    """A seed torch's generator cannot take is a ZooError naming the range (was torch's 'Overflow when unpacking
    long long' ValueError)."""
    with pytest.raises(ZooError, match="seed must be an integer"):
        teacher_regression(3, seed=seed)
    with pytest.raises(ZooError, match="seed"):
        TeacherDataModule(seed=seed)
