"""Forward rules as objects (zoo.nn.rules): a new rule is one registered class that the stack runs under its
memory strategies; the momentum rule's inverse undoes its step; RULES behaves as the tuple of names it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.nn import ResidualStack
from zoo.nn.rules import _RULES, RULES, EulerRule, ForwardRule, MomentumRule, register_rule


class Midpoint(ForwardRule):
    """Explicit midpoint: x_{n+1} = x_n + h f_n(x_n + h/2 f_n(x_n))."""

    name = "midpoint_test"
    calls_per_step = 2

    def step(self, f, n, state, h):
        (x,) = state
        return (x + h * f(n, x + (h / 2) * f(n, x, 0), 1),)

    def inverse_step(self, f, n, state, h):
        (x_next,) = state
        return (x_next - h * f(n, x_next - (h / 2) * f(n, x_next, 1), 0),)


@pytest.fixture
def midpoint():
    register_rule(Midpoint)
    yield Midpoint
    del _RULES[Midpoint.name]


def blocks(n: int) -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 4)).double() for _ in range(n)]


def test_a_new_rule_is_one_registered_class(midpoint) -> None:
    fs = blocks(5)
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    stack = ResidualStack(fs, rule="midpoint_test", scale="depth", memory="full")
    out = stack(x)
    ref, h = x, 1 / 5  # the rule written out by hand
    for f in fs:
        ref = ref + h * f(ref + (h / 2) * f(ref))
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    # the adjoint strategy runs it backwards with its inverse: gradients close to full backprop's (approximate)
    adjoint = ResidualStack(fs, rule="midpoint_test", scale="depth", memory="adjoint")
    (g_full,) = torch.autograd.grad(out.sum(), x)
    (g_adj,) = torch.autograd.grad(adjoint(x).sum(), x)
    torch.testing.assert_close(g_adj, g_full, rtol=1e-2, atol=1e-3)
    assert not torch.equal(g_adj, g_full)  # rebuilt, not stored
    with pytest.raises(ZooError, match="registered already"):
        register_rule(Midpoint)


def test_momentum_inverse_undoes_the_step() -> None:
    fs = blocks(1)
    rule = MomentumRule(0.7)
    x, v = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)

    def f(m, y, k):
        return fs[m](y)

    with torch.no_grad():
        back = rule.inverse_step(f, 0, rule.step(f, 0, (x, v), 0.5), 0.5)
    torch.testing.assert_close(back[0], x, rtol=0, atol=1e-14)
    torch.testing.assert_close(back[1], v, rtol=0, atol=1e-14)
    # Euler's inverse is only approximate (A1): off by O(h^2)
    euler = EulerRule()
    with torch.no_grad():
        (x_back,) = euler.inverse_step(f, 0, euler.step(f, 0, (x,), 0.01), 0.01)
    assert 0 < (x_back - x).abs().max() < 1e-3


def test_rules_behave_as_the_names() -> None:
    assert tuple(RULES) == ("euler", "heun", "momentum")
    assert "heun" in RULES and "rk4" not in RULES
    with pytest.raises(TypeError):
        RULES["rk4"] = EulerRule  # read-only: rules are added by register_rule
    with pytest.raises(ZooError, match="rk4"):
        ResidualStack(blocks(2), rule="rk4")
