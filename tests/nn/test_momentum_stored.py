"""memory="reversible" with ``stored_blocks``: the last blocks of a stack store their activations (ordinary autograd)
and only the others are rebuilt. References are autograd through memory="full" on the same blocks; the blocks
count their own calls, so "stored" and "rebuilt" are observed, not assumed."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torchvision
from test_momentum import (  # noqa: F401  (one_thread: the autouse fixture, for this module too)
    MLP,
    ArgBlock,
    DropBlock,
    assert_grads_close,
    mlp_blocks,
    one_thread,
    run,
)

import converters
import zoo
from zoo.errors import ZooError
from zoo.nn import ResidualStack


class Counted(nn.Module):
    """A block that counts its calls with and without grad mode."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.calls = {"grad": 0, "no_grad": 0}

    def forward(self, x, *args, **kwargs):
        self.calls["grad" if torch.is_grad_enabled() else "no_grad"] += 1
        return self.inner(x, *args, **kwargs)


def stacks(blocks, transition=None, **kwargs):
    """The same blocks (shared modules) under memory='full' and memory='reversible' with ``kwargs``."""
    full = ResidualStack(blocks, rule="momentum", memory="full", transition=transition, gamma=0.9)
    rev = ResidualStack(blocks, rule="momentum", memory="reversible", transition=transition, gamma=0.9, **kwargs)
    return full, rev


@pytest.mark.parametrize("stored", [1, 3, 5, 6, 9])
@pytest.mark.parametrize("init", ["zero", "f", "module"])
def test_stored_blocks_give_full_backprop_gradients(stored, init):
    """float64, 48 fractional bits: the gradients of full backprop to 1e-10, whichever part runs where."""
    blocks = mlp_blocks(6, dim=3, hidden=5, seed=3, dtype=torch.float64)
    transition = MLP(3, 5, seed=99, dtype=torch.float64)
    velocity = MLP(3, 4, seed=98, dtype=torch.float64) if init == "module" else init
    full = ResidualStack(
        blocks, rule="momentum", memory="full", transition=transition, gamma=0.75, init_velocity=velocity
    )
    rev = ResidualStack(
        blocks,
        rule="momentum",
        memory="reversible",
        transition=transition,
        gamma=0.75,
        init_velocity=velocity,
        fixed_point_bits=48,
        stored_blocks=stored,
    )
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    a, b = run(full, x), run(rev, x)
    assert len(b[2]) == 4 * 7 + (4 if init == "module" else 0)  # every block, the transition, the velocity module
    assert_grads_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("stored", [0, 2, 4, 5])
def test_stored_blocks_run_once_and_the_others_are_rebuilt(stored):
    depth = 4
    blocks = [Counted(MLP(4, 6, seed=k)) for k in range(depth)]
    transition = Counted(MLP(4, 6, seed=50))
    _, rev = stacks(blocks, transition=transition, stored_blocks=stored)
    run(rev, torch.randn(3, 4))
    whole = stored >= depth  # nothing left to rebuild: the transition is stored too
    assert transition.calls == ({"grad": 1, "no_grad": 0} if whole else {"grad": 1, "no_grad": 1})
    for n, block in enumerate(blocks):
        if n >= depth - stored:  # stored: one forward, with autograd
            assert block.calls == {"grad": 1, "no_grad": 0}, n
        else:  # rebuilt: the forward without graph, the recomputation in backward with it
            assert block.calls == {"grad": 1, "no_grad": 1}, n


def test_extra_arguments_get_gradients_from_both_parts():
    blocks = [ArgBlock(4, 60 + k) for k in range(6)]
    full, rev = stacks(blocks, stored_blocks=2)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(61))
    t0 = torch.randn(3, 4, generator=torch.Generator().manual_seed(62))

    def grads_of(stack):
        t = t0.clone().requires_grad_(True)
        return run(stack, x, t, scale=0.7), t.grad

    (a, ta), (b, tb) = grads_of(full), grads_of(rev)
    assert_grads_close(a, b)
    torch.testing.assert_close(tb, ta, rtol=1e-4, atol=1e-5)
    # both parts contribute to t's gradient: the rebuilt part alone gives another one
    only_rebuilt = ResidualStack(blocks[:4], rule="momentum", memory="reversible", gamma=0.9)
    t = t0.clone().requires_grad_(True)
    run(only_rebuilt, x, t, scale=0.7)
    assert not torch.allclose(t.grad, tb, atol=1e-3)


def test_dropout_in_stored_and_rebuilt_blocks_draws_as_full_backprop():
    blocks = [DropBlock(4, 70 + k) for k in range(6)]
    full, rev = stacks(blocks, stored_blocks=3)
    x = torch.randn(5, 4)
    torch.manual_seed(71)
    a = run(full, x)
    after_full = torch.rand(3)
    torch.manual_seed(71)
    b = run(rev, x)
    assert_grads_close(a, b)
    torch.testing.assert_close(torch.rand(3), after_full, rtol=0, atol=0)


def test_momentum_resnet_stored_blocks_match_full_and_batchnorm_updates_once():
    torch.manual_seed(80)
    full = zoo.momentum_cifar_resnet(layers=(2, 4, 3), widths=(4, 8, 8), memory="full").double().train()
    rev = zoo.momentum_cifar_resnet(layers=(2, 4, 3), widths=(4, 8, 8), stored_blocks=(0, 2, 3)).double().train()
    rev.load_state_dict(full.state_dict())
    assert [rev.layer1.stored_blocks, rev.layer2.stored_blocks, rev.layer3.stored_blocks] == [0, 2, 3]
    x = torch.randn(3, 3, 10, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(81))
    assert_grads_close(run(full, x), run(rev, x), rtol=1e-7, atol=1e-9)
    for (k, va), vb in zip(full.state_dict().items(), rev.state_dict().values()):
        if "num_batches" in k:
            assert va.item() == vb.item() == 1, k
        elif "running" in k:
            torch.testing.assert_close(vb, va, rtol=1e-7, atol=1e-10, msg=lambda m, k=k: f"{k}: {m}")


def test_one_number_applies_to_every_stage_capped_at_its_length():
    model = zoo.momentum_cifar_resnet(layers=(2, 5, 3), widths=(4, 4, 4), stored_blocks=3, num_classes=3)
    assert [model.layer1.stored_blocks, model.layer2.stored_blocks, model.layer3.stored_blocks] == [2, 3, 3]
    assert "stored_blocks=3" in repr(model.layer2)


def test_converter_passes_stored_blocks_and_keeps_the_function():
    torch.manual_seed(90)
    source = torchvision.models.resnet18(weights=None, num_classes=5).eval()
    plain = converters.transform(copy.deepcopy(source), to="momentum", gamma=0.9)
    stored = converters.transform(source, to="momentum", gamma=0.9, stored_blocks=(0, 0, 1, 2))
    assert [stored.layer3.stored_blocks, stored.layer4.stored_blocks] == [1, 2]
    x = torch.randn(2, 3, 32, 32)
    a, b = run(plain.train(), x), run(stored.train(), x)
    assert_grads_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stored_blocks": -1}, "non-negative integer"),
        ({"stored_blocks": 1.5}, "non-negative integer"),
        ({"stored_blocks": True}, "non-negative integer"),
        ({"stored_blocks": 2, "memory": "full"}, "memory='reversible' only"),
    ],
)
def test_stack_refuses_bad_stored_blocks(kwargs, message):
    memory = kwargs.pop("memory", "reversible")
    with pytest.raises(ZooError, match=message):
        ResidualStack(mlp_blocks(3), rule="momentum", memory=memory, **kwargs)


def test_adjoint_stack_refuses_stored_blocks():
    with pytest.raises(ZooError, match="memory='reversible' only"):
        ResidualStack(mlp_blocks(3), rule="euler", memory="adjoint", stored_blocks=1)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"stored_blocks": (0, 4, 1)}, r"stored_blocks\[1\] = 4 but stage 2 has 3 blocks"),
        ({"stored_blocks": (0, 1)}, "one per stage"),
        ({"stored_blocks": 1, "memory": "full"}, "memory='reversible' only"),
        ({"stored_blocks": -2}, "integer >= 0"),
    ],
)
def test_resnet_refuses_bad_stored_blocks(kwargs, message):
    with pytest.raises(ZooError, match=message):
        zoo.momentum_cifar_resnet(layers=(2, 3, 2), widths=(4, 4, 4), **kwargs)


def test_tied_blocks_sum_the_gradients_of_stored_and_rebuilt_steps():
    block = MLP(3, 5, seed=1, dtype=torch.float64)
    full = ResidualStack([block] * 6, rule="momentum", memory="full", gamma=0.8)
    rev = ResidualStack(
        [block] * 6, rule="momentum", memory="reversible", gamma=0.8, stored_blocks=2, fixed_point_bits=48
    )
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert_grads_close(run(full, x), run(rev, x), rtol=1e-10, atol=1e-12)
