"""memory="full" momentum runs each step (M1) as one fused step (zoo.ops.fixed_point.momentum_float_step): the same
values as the rule written with tensor ops, gradients of that rule, and under autograd it keeps only what a plain
ResNet keeps plus the ReLU's sign mask per step: one bit per element where the step is compiled, one byte where it
runs eagerly."""

from __future__ import annotations

import pytest
import torch
import torchvision

import zoo
from zoo.nn import ResidualStack
from zoo.ops import fixed_point
from zoo.ops.fixed_point import momentum_float_step


def unfused_step(x, v, g, tail, c, gamma):
    """(M1) written with tensor ops, as the rule was before fusing: f = relu(x + g) - x or g."""
    f = torch.relu(x + g) - x if tail == "relu" else g
    v = gamma * v + c * f
    return x + v, v


@pytest.fixture(params=["eager", "compiled"])
def kernel_path(request, monkeypatch):
    """Both paths of the step: eager (small tensors) and the compiled kernel (forced for every size)."""
    if request.param == "compiled":
        monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    return request.param


@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 4, 8)])  # 105 elements: a bool mask; 64: the packed mask
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tail", ["relu", "identity"])
def test_fused_step_values_are_the_unfused_rule_bit_for_bit(kernel_path, dtype, tail, shape):
    gen = torch.Generator().manual_seed(0)
    x, v, g = (torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(3))
    c, gamma = (1.0 - 0.9) * 0.5, 0.9
    got = momentum_float_step(x, v, g, tail, c=c, gamma=gamma)
    want = unfused_step(x, v, g, tail, c, gamma)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    # with autograd the same values
    got_g = momentum_float_step(x.requires_grad_(True), v, g, tail, c=c, gamma=gamma)
    assert torch.equal(got_g[0], want[0]) and torch.equal(got_g[1], want[1])


@pytest.mark.parametrize("tail", ["relu", "identity"])
@pytest.mark.parametrize("uses", ["both", "x only", "v only"])
def test_fused_step_gradients_are_the_unfused_rule_gradients(kernel_path, tail, uses):
    """float64: the fused vector-Jacobian product equals autograd through the unfused rule to float rounding, for
    every input, whichever outputs the loss uses (the stack's last step uses x' only)."""
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(3)]
    wx, wv = (torch.randn(4, 6, generator=gen, dtype=torch.float64) for _ in range(2))

    def loss(step):
        leaves = [t.clone().requires_grad_(True) for t in inputs]
        xn, vn = step(*leaves)
        total = {"both": (wx * xn).sum() + (wv * vn).sum(), "x only": (wx * xn).sum(), "v only": (wv * vn).sum()}
        grads = torch.autograd.grad(total[uses], leaves, allow_unused=True)  # v' does not depend on x for identity
        return [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)]

    got = loss(lambda x, v, g: momentum_float_step(x, v, g, tail, c=0.1, gamma=0.9))
    want = loss(lambda x, v, g: unfused_step(x, v, g, tail, 0.1, 0.9))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    assert not torch.equal(got[2], torch.zeros_like(got[2]))


def test_double_backward_through_the_fused_step_matches_the_unfused_rule():
    """memory='full' is what the reversible engine's error names for create_graph=True: a gradient penalty through
    a momentum stack of ResNet blocks equals the unfused rule's."""
    torch.manual_seed(0)
    blocks = [zoo.models.resnet.BasicBlock(4, 4) for _ in range(3)]
    stack = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="full").double().eval()
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)

    def penalty(fused: bool) -> tuple[torch.Tensor, ...]:
        rule = stack.forward_rule
        original = type(rule).fuses_tail
        rule.fuses_tail = fused  # the instance attribute hides the class's: the unfused step with tensor ops
        try:
            xi = x.clone().requires_grad_(True)
            (gx,) = torch.autograd.grad(stack(xi).square().sum(), xi, create_graph=True)
            return torch.autograd.grad(gx.square().sum(), [xi, *stack.parameters()], allow_unused=True)
        finally:
            rule.fuses_tail = original

    got, want = penalty(True), penalty(False)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or torch.equal(a, torch.zeros_like(a))
        else:
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def saved_bytes(model: torch.nn.Module, x: torch.Tensor) -> tuple[int, int, int]:
    """(bytes of the distinct tensors autograd saves for backward in one forward, of which bool, of which uint8)."""
    seen: dict[tuple[int, int], tuple[int, torch.dtype]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.numel():
            storage = t.untyped_storage()
            seen[(storage.data_ptr(), storage.nbytes())] = (storage.nbytes(), t.dtype)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x).sum()
    by_dtype = {dt: sum(n for n, d in seen.values() if d == dt) for dt in (torch.bool, torch.uint8)}
    return sum(n for n, _ in seen.values()), by_dtype[torch.bool], by_dtype[torch.uint8]


def test_full_momentum_saves_what_torchvision_saves_plus_one_bit_per_element_and_step():
    """A momentum ResNet-50 under memory='full' keeps for backward exactly the tensors torchvision's ResNet-50 keeps
    (the same blocks; the ReLU output a plain block keeps is its next block's input, kept anyway), plus the ReLU's
    sign mask per momentum step: packed to a bit per element in the compiled step (stages 1 and 2 here, from 65,536
    elements), a bool per element in the eager one (stages 3 and 4); no copy of x, of v or of the tail's
    intermediates (the unfused rule kept a float ReLU output per step, 32 times the packed mask)."""
    torch.manual_seed(0)
    tv = torchvision.models.resnet50().train()
    mom = zoo.momentum_resnet50(memory="full", gamma=0.9).train()
    x = torch.randn(2, 3, 64, 64)
    plain_total, plain_bool, plain_uint8 = saved_bytes(tv, x)
    total, bool_masks, packed_masks = saved_bytes(mom, x)
    steps = sum(stage.depth for stage in mom.stages)
    # one mask per momentum step, of the stage's state size: ResNet-50 at 64 x 64, batch 2
    state_numel = {1: 2 * 256 * 16 * 16, 2: 2 * 512 * 8 * 8, 3: 2 * 1024 * 4 * 4, 4: 2 * 2048 * 2 * 2}
    compiled = {i for i, n in state_numel.items() if n >= fixed_point.FLOAT_STEP_COMPILE_MIN_NUMEL}
    assert compiled == {1, 2} and steps == 12 and plain_bool == plain_uint8 == 0
    depth = {i + 1: stage.depth for i, stage in enumerate(mom.stages)}
    assert packed_masks == sum(state_numel[i] // 8 * depth[i] for i in compiled)
    assert bool_masks == sum(state_numel[i] * depth[i] for i in state_numel if i not in compiled)
    masks = packed_masks + bool_masks
    # torchvision's last in-place ReLU also keeps the network's final feature map (for its own backward); the
    # momentum stack's last state feeds only the pooling, which keeps no input
    final_features = state_numel[4] * 4
    assert total - masks == plain_total - final_features


def test_full_momentum_resnet_keeps_its_values_and_trains(kernel_path):
    """The whole model: forward bit for bit the unfused rule's, parameter gradients equal to float rounding."""
    torch.manual_seed(0)
    model = zoo.momentum_resnet18(memory="full", num_classes=3, zero_init_last=False).train()
    x = torch.randn(2, 3, 32, 32)

    def run(fused: bool):
        for stage in model.stages:
            stage.forward_rule.fuses_tail = fused
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    (out_f, grad_f), (out_u, grad_u) = run(True), run(False)
    assert torch.equal(out_f, out_u)
    for k, g in grad_u.items():
        scale = g.abs().max().clamp_min(1e-30)
        torch.testing.assert_close(grad_f[k], g, rtol=0, atol=1e-5 * scale, msg=k)


def test_torch_compile_of_a_full_momentum_stack_of_resnet_blocks_gives_the_eager_result():
    """The fused step (an autograd Function with the ReLU-tail mask) traced by a caller's torch.compile."""
    torch.manual_seed(0)
    blocks = [zoo.models.resnet.BasicBlock(4, 4) for _ in range(2)]
    stack = ResidualStack(blocks, rule="momentum", gamma=0.9, memory="full").eval()
    x = torch.randn(2, 4, 5, 5)

    def run(module):
        xi = x.clone().requires_grad_(True)
        out = module(xi)
        grads = torch.autograd.grad(out.square().sum(), [xi, *stack.parameters()])
        return out.detach(), grads

    eager_out, eager_grads = run(stack)
    got_out, got_grads = run(torch.compile(stack, backend="aot_eager"))
    torch.testing.assert_close(got_out, eager_out, rtol=0, atol=0)
    for a, b in zip(got_grads, eager_grads):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overwriting_step_writes_x_into_g_and_v_into_v_with_the_unfused_values_and_gradients(monkeypatch, dtype):
    """overwrite=True on the compiled, packed path: x' lands in g's storage and v' in v's (so no fresh stage-sized
    outputs), with the unfused rule's values bit for bit and its gradients for x, v and g's producers."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(2)
    x0, v0, w = (torch.randn(2, 4, 8, generator=gen, dtype=dtype) for _ in range(3))
    wx, wv = (torch.randn(2, 4, 8, generator=gen, dtype=dtype) for _ in range(2))

    def run(step):
        x = x0.clone().requires_grad_(True)
        p = w.clone().requires_grad_(True)
        v_in, g_in = v0 * x.tanh(), x * p  # non-leaf v and g, as a stack's v and a block's last output are
        v_ptr, g_ptr = v_in.data_ptr(), g_in.data_ptr()
        xn, vn = step(x, v_in, g_in)
        grads = torch.autograd.grad((wx * xn).sum() + (wv * vn).sum(), [x, p])
        return xn.detach(), vn.detach(), grads, (xn.data_ptr() == g_ptr, vn.data_ptr() == v_ptr)

    got_x, got_v, got_grads, written = run(
        lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9, overwrite=True)
    )
    want_x, want_v, want_grads, _ = run(lambda x, v, g: unfused_step(x, v, g, "relu", 0.1, 0.9))
    assert written == (True, True)
    assert torch.equal(got_x, want_x) and torch.equal(got_v, want_v)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-13, "atol": 1e-14}
    for a, b in zip(got_grads, want_grads):
        torch.testing.assert_close(a, b, **tol)
    # without overwrite the inputs keep their values and the outputs are fresh tensors
    _, _, _, written = run(lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9))
    assert written == (False, False)


@pytest.mark.parametrize("shape", [(8,), (2, 4, 8), (16, 3, 5, 5)])
def test_packed_mask_round_trips_with_zero_not_positive(shape):
    """One bit per element, eight segments per byte: unpacking gives s > 0 element for element (0 and -0 are not
    positive, as relu's derivative at 0), whatever the shape."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(shape, generator=gen)
    s.view(-1)[::5] = 0.0
    s.view(-1)[1::7] = -0.0
    packed = fixed_point._pack_positive(s)
    assert packed.dtype == torch.uint8 and packed.numel() == s.numel() // 8
    assert torch.equal(fixed_point._unpack_mask(packed, s.shape), s > 0)
    # bit k of byte j is element k * numel/8 + j of the flattened tensor
    flat, m = (s > 0).reshape(-1), s.numel() // 8
    for j in (0, m - 1):
        for k in range(8):
            assert bool((int(packed[j]) >> k) & 1) == bool(flat[k * m + j])


def test_compiled_step_gradients_over_several_stage_shapes_are_the_unfused_rule_gradients(monkeypatch):
    """The compiled kernels see one stage shape after another, as in a ResNet (so torch.compile turns their shapes
    dynamic, and the element-wise kernels run on 1-D views): each shape's values and gradients stay those of the
    unfused rule, and a channels-last state (called on its N-d layout) too."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(4)
    shapes = [(2, 8, 6, 6), (2, 16, 3, 3), (2, 4, 12, 12), (3, 8, 2, 4)]
    for shape, channels_last in [(s, False) for s in shapes] + [(shapes[0], True)]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        x0, v0, g0, wx, wv = (
            torch.randn(shape, generator=gen, dtype=torch.float64).to(memory_format=fmt) for _ in range(5)
        )

        def run(step, inputs, wx, wv):
            leaves = [t.clone().requires_grad_(True) for t in inputs]
            xn, vn = step(*leaves)
            grads = torch.autograd.grad((wx * xn).sum() + (wv * vn).sum(), leaves)
            return xn.detach(), vn.detach(), grads

        fused = lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9)  # noqa: E731
        got = run(fused, (x0, v0, g0), wx, wv)
        want = run(lambda x, v, g: unfused_step(x, v, g, "relu", 0.1, 0.9), (x0, v0, g0), wx, wv)
        assert got[0].shape == shape and got[1].shape == shape
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for a, b in zip(got[2], want[2]):
            assert a.shape == shape
            torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overwriting_step_without_gradients_writes_in_place_with_the_unfused_values(monkeypatch, dtype):
    """Evaluation (no autograd): overwrite=True on the compiled path writes x' into g's storage and v' into v's, the
    unfused rule's values bit for bit; overwrite=False and the identity tail return fresh tensors."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(5)
    x, v, g = (torch.randn(2, 4, 8, generator=gen, dtype=dtype) for _ in range(3))
    want = unfused_step(x, v, g, "relu", 0.1, 0.9)
    for overwrite, tail in [(True, "relu"), (False, "relu"), (True, "identity")]:
        v_in, g_in = v.clone(), g.clone()
        with torch.no_grad():
            xn, vn = momentum_float_step(x, v_in, g_in, tail, c=0.1, gamma=0.9, overwrite=overwrite)
        in_place = (xn.data_ptr() == g_in.data_ptr(), vn.data_ptr() == v_in.data_ptr())
        if tail == "relu":
            assert torch.equal(xn, want[0]) and torch.equal(vn, want[1])
        else:
            assert torch.equal(vn, unfused_step(x, v, g, "identity", 0.1, 0.9)[1])
        assert in_place == ((True, True) if overwrite and tail == "relu" else (False, False))


def test_channels_last_step_with_gradients_in_another_layout_and_double_backward(monkeypatch):
    """A channels-last state runs the compiled kernels on its memory order, the mask packed in that order: gradients
    arriving contiguous (another layout than the forward's), and the double backward's eager unpacking, both read the
    mask in the forward's order and match the unfused rule."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    gen = torch.Generator().manual_seed(6)
    shape = (2, 8, 3, 5)
    x0, v0, g0 = (
        torch.randn(shape, generator=gen, dtype=torch.float64).to(memory_format=torch.channels_last) for _ in range(3)
    )
    wx, wv = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2))  # contiguous

    def grads(step, create_graph: bool):
        leaves = [t.clone().requires_grad_(True) for t in (x0, v0, g0)]
        xn, vn = step(*leaves)
        assert xn.is_contiguous(memory_format=torch.channels_last)
        # a loss quadratic in x', so that the first gradients depend on the leaves and have a gradient themselves
        first = torch.autograd.grad((wx * xn * xn).sum() + (wv * vn).sum(), leaves, create_graph=create_graph)
        if not create_graph:
            return first
        return torch.autograd.grad(sum((gr * gr).sum() for gr in first), leaves, allow_unused=True)

    fused = lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9)  # noqa: E731
    unfused = lambda x, v, g: unfused_step(x, v, g, "relu", 0.1, 0.9)  # noqa: E731
    for create_graph in (False, True):
        for a, b in zip(grads(fused, create_graph), grads(unfused, create_graph)):
            if b is None:
                assert a is None or not a.any()
            else:
                torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-14)
