"""The residual-stack engine against the definitions of docs/mathematics.md (R1), (H1), (A1), (A2)."""

from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.nn import ResidualStack


class SmoothBlock(nn.Module):
    """f(x; theta) = W2 tanh(W1 x + b)."""

    def __init__(self, w1: torch.Tensor, b: torch.Tensor, w2: torch.Tensor):
        super().__init__()
        self.w1 = nn.Parameter(w1.clone())
        self.b = nn.Parameter(b.clone())
        self.w2 = nn.Parameter(w2.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x @ self.w1.T + self.b) @ self.w2.T


def smooth_blocks(n: int, dim: int = 6, hidden: int = 12, seed: int = 0) -> list[nn.Module]:
    """theta(s) = A + sin(2 pi s) B sampled at s = k/n: weights smooth in depth."""
    g = torch.Generator().manual_seed(seed)
    a1, b1 = torch.randn(hidden, dim, generator=g), torch.randn(hidden, dim, generator=g)
    a2, b2 = torch.randn(dim, hidden, generator=g), torch.randn(dim, hidden, generator=g)
    ab, bb = torch.randn(hidden, generator=g), torch.randn(hidden, generator=g)
    out = []
    for k in range(n):
        s = torch.tensor(k / n)
        w = torch.sin(2 * torch.pi * s)
        out.append(SmoothBlock((a1 + w * b1) / dim**0.5, ab + w * bb, (a2 + w * b2) / hidden**0.5))
    return out


def grads(stack: nn.Module, x: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    x = x.clone().requires_grad_(True)
    stack.zero_grad(set_to_none=True)
    out = stack(x, *args, **kwargs)
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()
    return x.grad, {n: p.grad.clone() for n, p in stack.named_parameters() if p.grad is not None}


def flat(x_grad: torch.Tensor, p_grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([x_grad.flatten()] + [p_grads[k].flatten() for k in sorted(p_grads)])


# ------------------------------------------------------------------------------------------- rules


def test_euler_rule_matches_definition():
    blocks = smooth_blocks(5)
    x = torch.randn(4, 6)
    for scale, h in (("depth", 1 / 5), (1.0, 1.0), (0.3, 0.3)):
        stack = ResidualStack(blocks, rule="euler", scale=scale)
        expected = x
        for f in blocks:
            expected = expected + h * f(expected)
        torch.testing.assert_close(stack(x), expected, rtol=0, atol=0)
        assert stack.step == pytest.approx(h)


def test_heun_rule_matches_definition():
    blocks = smooth_blocks(4)
    x = torch.randn(3, 6)
    stack = ResidualStack(blocks, rule="heun", scale="depth")
    h, xn = 1 / 4, x
    thetas = blocks + [blocks[-1]]  # theta_N := theta_{N-1}
    for n in range(4):
        fx = thetas[n](xn)
        y = xn + h * fx
        xn = xn + h / 2 * (fx + thetas[n + 1](y))
    torch.testing.assert_close(stack(x), xn, rtol=0, atol=0)


@pytest.mark.parametrize(
    "rule, kwargs", [("euler", {}), ("heun", {}), ("momentum", {"gamma": 0.6}), ("momentum", {"init_velocity": "f"})]
)
def test_full_memory_gradients_pass_gradcheck_in_float64(rule, kwargs):
    """memory="full" (the momentum rule's step is a fused custom autograd Function) against central finite
    differences in float64, for the input and every parameter. (memory="reversible" rebuilds its state once, so it
    cannot run gradcheck's repeated backward; test_momentum.py checks it against this memory to 1e-11.)"""
    stack = ResidualStack(smooth_blocks(3, dim=3, hidden=4), rule=rule, scale=0.5, **kwargs).double()
    names = [n for n, _ in stack.named_parameters()]
    x = torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    params = [p.detach().clone().requires_grad_(True) for p in stack.parameters()]

    def f(x: torch.Tensor, *ps: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(stack, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params))


def test_heun_is_closer_to_the_ode_than_euler():
    """On a smooth field both schemes converge; Heun's error at N is far below Euler's (O(1/N^2) vs O(1/N))."""
    x = torch.randn(8, 6)
    fine = ResidualStack(smooth_blocks(2048), rule="heun", scale="depth")(x)
    err = {}
    for rule in ("euler", "heun"):
        err[rule] = [(ResidualStack(smooth_blocks(n), rule=rule, scale="depth")(x) - fine).norm() for n in (16, 64)]
    assert err["euler"][1] < err["euler"][0] / 3  # first order: /4 expected
    assert err["heun"][1] < err["heun"][0] / 10  # second order: /16 expected
    assert err["heun"][1] < err["euler"][1] / 2


# ---------------------------------------------------------------------------------------- adjoint


def adjoint_error(n: int, rule: str) -> float:
    torch.manual_seed(0)
    x = torch.randn(16, 6)
    full = ResidualStack(smooth_blocks(n), rule=rule, scale="depth", memory="full")
    adj = ResidualStack(smooth_blocks(n), rule=rule, scale="depth", memory="adjoint")
    torch.testing.assert_close(adj(x), full(x), rtol=0, atol=0)  # same forward
    g_full = flat(*grads(full, x))
    g_adj = flat(*grads(adj, x))
    return float((g_adj - g_full).norm() / g_full.norm())


def test_adjoint_gradient_error_falls_with_depth_and_heun_beats_euler():
    errors = {rule: [adjoint_error(n, rule) for n in (8, 32, 128)] for rule in ("euler", "heun")}
    for rule, e in errors.items():
        assert e[0] > e[1] > e[2], (rule, e)
        assert e[2] < 0.05 * e[0] if rule == "heun" else e[2] < 0.3 * e[0], (rule, e)
    for i in range(3):
        assert errors["heun"][i] < errors["euler"][i], errors
    assert errors["euler"][0] > 1e-3  # the adjoint is approximate: a zero error would mean we test nothing


class ConstantBlock(nn.Module):
    """f(x) = dropout(c) * t: independent of x, so (A1)/(A2) rebuild the activations exactly."""

    def __init__(self, dim: int, p: float = 0.0):
        super().__init__()
        self.c = nn.Parameter(torch.randn(dim))
        self.drop = nn.Dropout(p)

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, *, power: int = 1) -> torch.Tensor:
        out = self.drop(self.c).expand_as(x) ** power
        return out * t if t is not None else out


@pytest.mark.parametrize("rule", ["euler", "heun"])
def test_adjoint_equals_backprop_when_rebuild_is_exact(rule):
    torch.manual_seed(0)
    blocks = [ConstantBlock(5) for _ in range(4)]
    full = ResidualStack(blocks, rule=rule, scale="depth")
    adj = ResidualStack(copy.deepcopy(blocks), rule=rule, scale="depth", memory="adjoint")
    x = torch.randn(3, 5)
    t = torch.rand(3, 5, requires_grad=True)
    gx_f, gp_f = grads(full, x, t, power=2)
    gt_f, t.grad = t.grad.clone(), None
    gx_a, gp_a = grads(adj, x, t, power=2)
    torch.testing.assert_close(gx_a, gx_f)
    assert gp_a.keys() == gp_f.keys() and len(gp_f) == 4
    for k in gp_f:
        torch.testing.assert_close(gp_a[k], gp_f[k])
    torch.testing.assert_close(t.grad, gt_f)  # gradient of an extra argument


@pytest.mark.parametrize("rule", ["euler", "heun"])
def test_adjoint_replays_dropout(rule):
    """Same dropout masks in the rebuild and the vector-Jacobian products as in the forward."""
    blocks = [ConstantBlock(64, p=0.5) for _ in range(3)]
    full = ResidualStack(blocks, rule=rule, scale="depth")
    adj = ResidualStack(copy.deepcopy(blocks), rule=rule, scale="depth", memory="adjoint")
    no_replay = ResidualStack(
        copy.deepcopy(blocks), rule=rule, scale="depth", memory="adjoint", preserve_rng_state=False
    )
    x = torch.randn(2, 64)
    torch.manual_seed(1)
    ref = flat(*grads(full, x))
    after_full = torch.rand(4)
    torch.manual_seed(1)
    got = flat(*grads(adj, x))
    after_adj = torch.rand(4)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(after_adj, after_full)  # backward leaves the global generator as it found it
    torch.manual_seed(1)
    assert not torch.allclose(flat(*grads(no_replay, x)), ref)  # the test can fail without replay


def test_adjoint_stochastic_depth_in_resnet_blocks_is_replayed():
    """With replayed masks the adjoint's error is the usual (A1) error; with fresh masks it is far larger."""
    import zoo

    kw = dict(depth=8, drop_path_rate=0.5, num_classes=4, zero_init_last=False)
    torch.manual_seed(0)
    full = zoo.depth_scaled_tiny(memory="full", **kw)
    x = torch.randn(6, 3, 12, 12)

    def model_grads(model):
        torch.manual_seed(3)
        model.zero_grad()
        model(x).logsumexp(-1).sum().backward()
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    ref = model_grads(full)
    errors = {}
    for replay in (True, False):
        adj = zoo.depth_scaled_tiny(memory="adjoint", **kw)
        adj.load_state_dict(full.state_dict())
        adj.layer1.preserve_rng_state = replay
        errors[replay] = float((model_grads(adj) - ref).norm() / ref.norm())
    assert errors[True] < errors[False] / 2, errors


def test_adjoint_frozen_parameters_get_no_gradient():
    blocks = smooth_blocks(6)
    for b in blocks[::2]:
        b.w1.requires_grad_(False)
    stack = ResidualStack(blocks, scale="depth", memory="adjoint")
    _, g = grads(stack, torch.randn(4, 6))
    frozen = {n for n, p in stack.named_parameters() if not p.requires_grad}
    assert frozen and not (frozen & g.keys())
    assert len(g) == sum(p.requires_grad for p in stack.parameters())


def test_adjoint_tied_blocks_accumulate_gradients():
    block = smooth_blocks(1)[0]
    x = torch.randn(5, 6)
    errors = []
    for n in (8, 64):
        full = ResidualStack([block] * n, scale="depth")
        adj = ResidualStack([copy.deepcopy(block)] * n, scale="depth", memory="adjoint")
        assert adj.is_tied() and len(list(adj.parameters())) == 3
        gf, ga = flat(*grads(full, x)), flat(*grads(adj, x))
        errors.append(float((ga - gf).norm() / gf.norm()))
    assert errors[1] < errors[0] / 4 and errors[1] < 0.02, errors


def test_adjoint_stores_only_the_output():
    """Saved tensors between forward and backward do not grow with depth (and do with full backprop)."""

    def saved_bytes(memory: str, n: int) -> int:
        stack = ResidualStack(smooth_blocks(n, dim=32, hidden=32), scale="depth", memory=memory)
        x = torch.randn(64, 32, requires_grad=True)
        total, seen = 0, set()

        def pack(t):
            nonlocal total
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen and not isinstance(t, nn.Parameter):
                seen.add(ptr)
                total += t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = stack(x)
        out.sum().backward()
        return total

    adj = [saved_bytes("adjoint", n) for n in (4, 64)]
    full = [saved_bytes("full", n) for n in (4, 64)]
    assert adj[0] == adj[1] <= 64 * 32 * 4
    assert full[1] > 10 * full[0] > 10 * adj[1]


def test_adjoint_does_not_update_batchnorm_twice():
    import zoo

    torch.manual_seed(0)
    full = zoo.depth_scaled_tiny(depth=6, num_classes=5, memory="full", zero_init_last=False)
    adj = zoo.depth_scaled_tiny(depth=6, num_classes=5, memory="adjoint", zero_init_last=False)
    adj.load_state_dict(full.state_dict())
    x = torch.randn(8, 3, 20, 20)
    for m in (full, adj):
        m.train()
        m(x).logsumexp(-1).sum().backward()
    sf, sa = full.state_dict(), adj.state_dict()
    buffers = [k for k in sf if "running" in k or "num_batches" in k]
    assert len(buffers) > 30
    for k in buffers:
        torch.testing.assert_close(sa[k], sf[k], rtol=1e-5, atol=1e-6, msg=k)
    assert int(sa["layer1.0.bn1.num_batches_tracked"]) == 1


def test_adjoint_under_bf16_autocast():
    stack_f = ResidualStack(smooth_blocks(16), scale="depth")
    stack_a = ResidualStack(smooth_blocks(16), scale="depth", memory="adjoint")
    x = torch.randn(8, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gf = flat(*grads(stack_f, x))
        ga = flat(*grads(stack_a, x))
    assert torch.isfinite(ga).all()
    assert float((ga - gf).norm() / gf.norm()) < 0.1


def test_no_grad_and_eval_paths_give_the_same_output():
    stack = ResidualStack(smooth_blocks(4), rule="heun", scale="depth", memory="adjoint")
    x = torch.randn(2, 6)
    with torch.no_grad():
        a = stack(x)
    torch.testing.assert_close(stack(x), a, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------ depth


def test_transition_is_child_zero_and_not_counted():
    t = nn.Linear(3, 6)
    stack = ResidualStack(smooth_blocks(3), scale="depth", transition=t)
    assert stack.depth == 3 and stack.step == pytest.approx(1 / 3)
    assert [n for n, _ in stack.named_children()] == ["0", "1", "2", "3"]
    x = torch.randn(2, 3)
    torch.testing.assert_close(stack(x), ResidualStack(smooth_blocks(3), scale="depth")(t(x)))


def test_indexing_follows_torchvision_numbering():
    t, blocks = nn.Linear(3, 6), smooth_blocks(3)
    stack = ResidualStack(blocks, transition=t)
    assert len(stack) == 4 and stack[0] is t and stack[-1] is blocks[2]
    assert list(stack) == [t, *blocks]
    plain = ResidualStack(blocks)
    assert len(plain) == 3 and plain[0] is blocks[0] and list(plain) == blocks
    with pytest.raises(IndexError, match="out of range"):
        stack[4]


def test_tie_untie_deepen():
    x = torch.randn(4, 6)
    stack = ResidualStack(smooth_blocks(16), scale="depth").tie(3)
    assert stack.is_tied() and len(list(stack.parameters())) == 3
    assert float(stack.smoothness()) == 0.0
    out16 = stack(x)
    stack.deepen(128)  # tied stays tied; with h = 1/N the flow of the same ODE is approximated better
    assert stack.is_tied() and stack.depth == 128 and stack.step == pytest.approx(1 / 128)
    out128 = stack(x)
    fine = ResidualStack([stack.blocks[0]] * 1024, scale="depth")(x)
    assert (out128 - fine).norm() < (out16 - fine).norm() / 4
    stack.untie()
    assert not stack.is_tied() and len({id(b) for b in stack.blocks}) == 128
    torch.testing.assert_close(stack(x), out128)
    stack.blocks[0].w1.data += 1  # untied: other blocks do not move
    assert not torch.equal(stack.blocks[0].w1, stack.blocks[1].w1)


def test_deepen_interpolate_keeps_endpoints_and_averages_midpoints():
    blocks = smooth_blocks(3)
    stack = ResidualStack(copy.deepcopy(blocks), scale="depth").deepen(5, mode="interpolate")
    new = stack.blocks
    torch.testing.assert_close(new[0].w1, blocks[0].w1)
    torch.testing.assert_close(new[4].w1, blocks[2].w1)
    torch.testing.assert_close(new[1].w1, 0.5 * (blocks[0].w1 + blocks[1].w1))
    torch.testing.assert_close(new[2].w1, blocks[1].w1)
    assert float(stack.smoothness()) > 0


# ------------------------------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"rule": "rk4"}, "unknown rule 'rk4'"),
        ({"memory": "checkpoint"}, "unknown memory 'checkpoint'"),
        ({"rule": "momentum", "memory": "adjoint"}, "use memory='reversible'"),
        ({"memory": "reversible"}, "memory='reversible' needs rule='momentum'"),
        ({"rule": "momentum", "memory": "reversible", "gamma": 0.0}, "needs 0 < gamma < 1"),
        ({"rule": "momentum", "gamma": -0.1}, "gamma must lie in [0, 1)"),
        ({"rule": "momentum", "init_velocity": "one"}, "unknown init_velocity 'one'"),
        ({"scale": "width"}, "unknown scale"),
        ({"scale": -1.0}, "positive number"),
        ({"gamma": 1.5}, "gamma"),
        ({"rule": "momentum", "gamma": torch.tensor(0.9)}, "gamma must be a number in [0, 1)"),
        ({"rule": "momentum", "gamma": True}, "gamma must be a number in [0, 1)"),
        ({"scale": True}, "scale must be 'depth' or a finite positive number"),
        ({"rule": "euler", "init_velocity": "f"}, "init_velocity applies to a rule with a velocity"),
        ({"rule": "heun", "init_velocity": nn.Identity()}, "init_velocity applies to a rule with a velocity"),
    ],
)
def test_bad_arguments_raise_one_clear_error(kwargs, message):
    with pytest.raises(ZooError, match=re.escape(message)):
        ResidualStack(smooth_blocks(2), **kwargs)


def test_numpy_scalars_are_numbers():
    """gamma, scale and stored_blocks from a config (NumPy scalars) are numbers: they were refused with an error
    saying that 0.9 does not lie in [0, 1)."""
    np = pytest.importorskip("numpy")
    x = torch.randn(3, 6, dtype=torch.float64)
    for gamma in (np.float64(0.5), np.float32(0.5)):
        stack = ResidualStack(smooth_blocks(3), rule="momentum", gamma=gamma, scale=np.float32(0.5)).double()
        ref = ResidualStack(stack.blocks, rule="momentum", gamma=0.5, scale=0.5)
        assert stack.gamma == 0.5 and stack.step == 0.5
        torch.testing.assert_close(stack(x), ref(x), rtol=0, atol=0)
    stack = ResidualStack(smooth_blocks(3), rule="momentum", memory="reversible", stored_blocks=np.int64(2))
    assert stack.stored_blocks == 2 and type(stack.stored_blocks) is int


class _TupleBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor]:
        return (torch.tanh(x),)


class _NoneBlock(nn.Module):
    def forward(self, x: torch.Tensor) -> None:
        torch.tanh(x)


@pytest.mark.parametrize(
    "rule, memory, init_velocity",
    [
        ("euler", "full", "zero"),
        ("heun", "adjoint", "zero"),
        ("momentum", "full", "f"),
        ("momentum", "reversible", "zero"),
    ],
)
@pytest.mark.parametrize("block", [_TupleBlock, _NoneBlock])
def test_a_block_returning_no_tensor_is_one_clear_error(rule, memory, init_velocity, block):
    """A residual function returning a tuple (a Hugging Face-style layer) or None: one ZooError naming the block
    and the fix, not an AttributeError inside the engine."""
    stack = ResidualStack([block(), block()], rule=rule, memory=memory, init_velocity=init_velocity)
    with pytest.raises(ZooError, match="residual block 0 of a ResidualStack returned a (tuple|NoneType), not a tensor"):
        stack(torch.randn(2, 6, requires_grad=True))
    velocity = ResidualStack(smooth_blocks(2), rule="momentum", init_velocity=block())
    with pytest.raises(ZooError, match="the initial-velocity module of a ResidualStack returned a"):
        velocity(torch.randn(2, 6))


def test_shape_changing_block_and_integer_input_are_refused():
    stack = ResidualStack([nn.Linear(6, 3)])
    with pytest.raises(ZooError, match="must keep the shape"):
        stack(torch.randn(2, 6))
    with pytest.raises(ZooError, match="floating-point"):
        ResidualStack(smooth_blocks(2))(torch.ones(2, 6, dtype=torch.long))


@pytest.mark.parametrize("memory", ["full", "adjoint"])
def test_torch_compile_gives_the_eager_result(memory):
    stack = ResidualStack(smooth_blocks(4), rule="heun", scale="depth", memory=memory)
    x = torch.randn(3, 6)
    eager_x, eager_p = grads(stack, x)
    compiled_x, compiled_p = grads(torch.compile(stack), x)
    compiled_p = {k.removeprefix("_orig_mod."): v for k, v in compiled_p.items()}
    torch.testing.assert_close(compiled_x, eager_x)
    torch.testing.assert_close(compiled_p, eager_p)


@pytest.mark.parametrize("rule, memory", [("heun", "adjoint"), ("momentum", "reversible"), ("momentum", "full")])
def test_torch_compile_of_a_deep_stack_compiles_no_frame_per_block(caplog, rule, memory):
    """A caller's torch.compile of a stack of 12 blocks: a rebuilding strategy's autograd Function runs untraced (one
    graph break), and memory="full"'s fused momentum step is traced into the caller's graph, instead of a graph break
    at every step making Dynamo compile each block's call as a frame of its own, specialised on the block index (which
    hit its recompile limit of 8 and fell back to eager); values and gradients as eager."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    stack = ResidualStack(smooth_blocks(12), rule=rule, scale="depth", memory=memory)
    x = torch.randn(3, 6)
    eager_x, eager_p = grads(stack, x)
    torch._dynamo.reset()
    counters.clear()
    with caplog.at_level("WARNING", logger="torch._dynamo"):
        compiled_x, compiled_p = grads(torch.compile(stack, backend="eager"), x)
    assert "recompile_limit" not in caplog.text
    assert counters["frames"]["total"] < 8, dict(counters["frames"])
    compiled_p = {k.removeprefix("_orig_mod."): v for k, v in compiled_p.items()}
    torch.testing.assert_close(compiled_x, eager_x, rtol=0, atol=0)
    torch.testing.assert_close(compiled_p, eager_p, rtol=0, atol=0)
    torch._dynamo.reset()


@pytest.mark.parametrize("rule", ["euler", "heun"])
def test_adjoint_double_backward_is_one_clear_error(rule):
    """The adjoint's step-by-step gradients have no graph: create_graph=True is refused with its cause and the fix,
    instead of torch's 'element 0 of tensors does not require grad' at the second derivative."""
    stack = ResidualStack(smooth_blocks(3), rule=rule, scale="depth", memory="adjoint")
    x = torch.randn(2, 6, requires_grad=True)
    with pytest.raises(ZooError, match=r"double backward.*create_graph=True.*memory='adjoint'.*memory='full'"):
        torch.autograd.grad(stack(x).pow(2).sum(), x, create_graph=True)
    full = ResidualStack(stack.blocks, rule=rule, scale="depth", memory="full")  # the fix named works
    (gx,) = torch.autograd.grad(full(x).pow(2).sum(), x, create_graph=True)
    assert torch.autograd.grad(gx.sum(), x)[0].abs().sum() > 0


# ------------------------------------------------------------------------------------------- export


@pytest.mark.parametrize(
    "rule, memory", [("momentum", "reversible"), ("euler", "adjoint"), ("heun", "adjoint"), ("momentum", "full")]
)
def test_torch_export_captures_the_plain_forward_of_every_memory_strategy(rule, memory):
    """The exported graph is memory="full"'s function (no rebuild bookkeeping: the rebuilding strategies record
    random states on the host, which export cannot trace), and training still runs the memory strategy."""
    blocks = smooth_blocks(5, seed=3)
    transition = nn.Linear(4, 6)
    stack = ResidualStack(blocks, rule=rule, scale="depth", memory=memory, transition=transition)
    twin = ResidualStack(blocks, rule=rule, scale="depth", memory="full", transition=transition)
    x = torch.randn(3, 4, generator=torch.Generator().manual_seed(4))
    exported = torch.export.export(stack, (x,))
    assert "equal" not in str(exported.graph)
    torch.testing.assert_close(exported.module()(x), twin(x), rtol=0, atol=0)
    out = stack(x.requires_grad_(True))
    strategy = {"reversible": "_ReversibleMomentum", "adjoint": "_AdjointBackprop", "full": ""}[memory]
    assert strategy in type(out.grad_fn).__name__


# ------------------------------------------------------------------------------------------ per-block states


class _ScaledBlock(nn.Module):
    """f(x, c; theta) = c * block(x) * weight: an extra positional and keyword argument reaching every block."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x: torch.Tensor, c: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        return c * self.block(x) * weight


def states_by_definition(rule: str, blocks: list[nn.Module], x: torch.Tensor, h: float, gamma: float = 0.9):
    """x_1 .. x_N by (R1), (H1) (theta_N := theta_{N-1}) or (M1) from v_0 = 0, written out step by step."""
    out, v = [], torch.zeros_like(x)
    thetas = blocks + [blocks[-1]]
    for n in range(len(blocks)):
        fx = thetas[n](x)
        if rule == "euler":
            x = x + h * fx
        elif rule == "heun":
            x = x + h / 2 * (fx + thetas[n + 1](x + h * fx))
        else:
            v = gamma * v + (1 - gamma) * h * fx
            x = x + v
        out.append(x)
    return out


@pytest.mark.parametrize("rule", ["euler", "heun", "momentum"])
@pytest.mark.parametrize("scale", ["depth", 0.7])
def test_states_are_the_rules_steps_and_end_at_forward(rule, scale):
    blocks = smooth_blocks(5)
    stack = ResidualStack(blocks, rule=rule, scale=scale, memory="full")
    x = torch.randn(3, 6, dtype=torch.float64)
    stack.double()
    h = 1 / 5 if scale == "depth" else 0.7
    states = stack.states(x)
    assert len(states) == 5 and all(s.shape == x.shape for s in states)
    assert torch.equal(states[-1], stack(x))  # bit for bit the forward's x_N
    for mine, ref in zip(states, states_by_definition(rule, blocks, x, h)):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)
    # stop early: the first k states of the whole stack (Heun's step k - 1 still evaluates f_k)
    for k in (0, 1, 3):
        early = stack.states(x, steps=k)
        assert len(early) == k and all(torch.equal(a, b) for a, b in zip(early, states))


@pytest.mark.parametrize("init_velocity", ["f", "module"])
def test_momentum_states_start_from_the_initial_velocity(init_velocity):
    blocks = smooth_blocks(4)
    g = nn.Linear(6, 6)
    stack = ResidualStack(blocks, rule="momentum", gamma=0.5, init_velocity=g if init_velocity == "module" else "f")
    x = torch.randn(3, 6)
    v = g(x) if init_velocity == "module" else blocks[0](x)
    xs, expected = x, []
    for f in blocks:
        v = 0.5 * v + 0.5 * f(xs)
        xs = xs + v
        expected.append(xs)
    states = stack.states(x)
    assert torch.equal(states[-1], stack(x))
    for mine, ref in zip(states, expected):
        torch.testing.assert_close(mine, ref, rtol=1e-6, atol=1e-6)


def test_states_take_the_transition_and_the_blocks_arguments():
    t = nn.Linear(3, 6)
    blocks = [_ScaledBlock(b) for b in smooth_blocks(3)]
    stack = ResidualStack(blocks, rule="momentum", transition=t, memory="full")
    x, c = torch.randn(2, 3), torch.tensor(0.5)
    states = stack.states(x, (c,), {"weight": 2.0})
    assert torch.equal(states[-1], stack(x, c, weight=2.0))
    v, xs = torch.zeros(2, 6), t(x)
    for b in blocks:
        v = 0.9 * v + 0.1 * b(xs, c, weight=2.0)
        xs = xs + v
    torch.testing.assert_close(states[-1], xs, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(stack.states(x, (c,))[-1], states[-1])  # the keyword argument reached the blocks


@pytest.mark.parametrize("rule, memory", [("momentum", "reversible"), ("heun", "adjoint"), ("euler", "adjoint")])
def test_states_of_a_rebuilding_stack_are_the_full_forwards_with_autograd(rule, memory):
    """Under memory="reversible" / "adjoint" the states are memory="full"'s: equal to forward without gradients,
    and with autograd, gradients of full backprop (every activation kept)."""
    blocks = smooth_blocks(4)
    stack = ResidualStack(blocks, rule=rule, memory=memory, scale="depth")
    full = ResidualStack(blocks, rule=rule, memory="full", scale="depth")
    x = torch.randn(3, 6)
    with torch.no_grad():
        assert torch.equal(stack.states(x)[-1], stack(x))
    weights = [torch.randn(3, 6, generator=torch.Generator().manual_seed(n)) for n in range(4)]

    def grads_of_states(s: ResidualStack) -> list[torch.Tensor]:
        s.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        sum((w * y).sum() for w, y in zip(weights, s.states(xg))).backward()
        return [xg.grad] + [p.grad for p in s.parameters()]

    ref = grads_of_states(full)
    for a, b in zip(grads_of_states(stack), ref):
        assert torch.equal(a, b)
    stack.grad_checkpointing = True  # each step recomputed in backward: the same gradients
    for a, b in zip(grads_of_states(stack), ref):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda s, x: s.states(x, steps=5), "steps must be an integer in 0 .. 4"),
        (lambda s, x: s.states(x, steps=-1), "steps must be an integer in 0 .. 4"),
        (lambda s, x: s.states(x, steps=True), "steps must be an integer"),
        (lambda s, x: s.states(x, [1.0]), "args must be a tuple"),
        (lambda s, x: s.states(x, (), [1.0]), "kwargs must be a mapping"),
        (lambda s, x: s.states(x.long()), "floating-point"),
    ],
)
def test_states_bad_arguments_are_one_clear_error(call, message):
    with pytest.raises(ZooError, match=re.escape(message)):
        call(ResidualStack(smooth_blocks(4), rule="momentum"), torch.randn(2, 6))


@pytest.mark.parametrize("rule, memory", [("euler", "full"), ("momentum", "full"), ("momentum", "reversible")])
def test_truncate_keeps_the_step_and_the_states_kept(rule, memory):
    """A scale="depth" stack truncated to k steps keeps h = 1/N: x_1 .. x_k do not change (h = 1/k would)."""
    stack = ResidualStack(smooth_blocks(6), rule=rule, memory=memory, scale="depth")
    x = torch.randn(3, 6)
    with torch.no_grad():
        before = stack.states(x)
        assert stack.truncate(4) is stack
        assert stack.depth == 4 and stack.step == pytest.approx(1 / 6) and len(list(stack.children())) == 4
        after = stack.states(x)
        assert len(after) == 4 and all(torch.equal(a, b) for a, b in zip(after, before))
        assert torch.equal(stack(x), before[3])
        assert not torch.allclose(ResidualStack(stack.blocks, rule=rule, scale="depth")(x), before[3])


def test_truncate_refuses_what_would_change_the_states_kept():
    heun = ResidualStack(smooth_blocks(4), rule="heun", scale="depth")
    with pytest.raises(ZooError, match="step 1 evaluates block 2, which truncation drops"):
        heun.truncate(2)
    assert heun.truncate(4).depth == 4  # nothing dropped
    for depth in (0, 5, 2.0, True):
        with pytest.raises(ZooError, match=re.escape("truncate keeps 1 .. 4 steps")):
            heun.truncate(depth)


@pytest.mark.parametrize("init_velocity", ["zero", "f"])
def test_momentum_states_on_the_fused_in_place_path_are_the_unfused_rules(monkeypatch, init_velocity):
    """The compiled fused step (forced for every size) writes x_{n+1} into block n's output and v_{n+1} into v_n, and
    its backward may write into its cotangents: the states handed out are still the unfused rule's, bit for bit,
    with and without gradients, and a loss on every state has the unfused rule's gradients."""
    from zoo.models.resnet import BasicBlock
    from zoo.ops import fixed_point

    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    torch.manual_seed(0)
    stack = ResidualStack([BasicBlock(8, 8) for _ in range(4)], rule="momentum", init_velocity=init_velocity)
    stack = stack.double().eval()
    x = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    weights = [torch.randn(2, 8, 4, 4, dtype=torch.float64) for _ in range(4)]

    def run(fused: bool, grad: bool):
        stack.forward_rule.fuses_tail = fused
        try:
            xg = x.clone().requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                states = stack.states(xg)
                last = stack(xg)
            values = [s.detach().clone() for s in states]
            if not grad:
                return values, last, []
            loss = sum((w * s).sum() for w, s in zip(weights, states))
            return values, last.detach(), torch.autograd.grad(loss, [xg, *stack.parameters()])
        finally:
            del stack.forward_rule.fuses_tail

    want, _, want_grads = run(False, True)
    for grad in (False, True):
        got, last, got_grads = run(True, grad)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert torch.equal(last, got[-1])
        for a, b in zip(got_grads, want_grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
