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


@pytest.mark.parametrize("overwrite", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_step_from_rest_is_the_step_from_a_zero_velocity(kernel_path, dtype, overwrite):
    """v None (a stack's first step with v_0 = 0, no zeros filled) gives the values of the step from a zero tensor
    and the same gradients for x and g; its v' is a tensor of its own, so the next step can overwrite it."""
    gen = torch.Generator().manual_seed(3)
    x0, w = (torch.randn(2, 4, 8, generator=gen, dtype=dtype) for _ in range(2))
    wx, wv = (torch.randn(2, 4, 8, generator=gen, dtype=dtype) for _ in range(2))

    def run(v_first):
        x = x0.clone().requires_grad_(True)
        p = w.clone().requires_grad_(True)
        x1, v1 = momentum_float_step(x, v_first(x), x * p, "relu", c=0.1, gamma=0.9, overwrite=overwrite)
        # a second step, overwriting v1 (what a stack does), from a g that depends on p again
        x2, v2 = momentum_float_step(x1, v1, x1 * p, "relu", c=0.1, gamma=0.9, overwrite=True)
        grads = torch.autograd.grad((wx * x2).sum() + (wv * v2).sum(), [x, p])
        return x2.detach(), v2.detach(), grads

    got = run(lambda x: None)
    want = run(lambda x: torch.zeros_like(x))
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(got[2], want[2]):
        assert torch.equal(a, b)
    # and both are the unfused rule's values
    x1, v1 = unfused_step(x0, torch.zeros_like(x0), x0 * w, "relu", 0.1, 0.9)
    assert torch.equal(got[0], unfused_step(x1, v1, x1 * w, "relu", 0.1, 0.9)[0])


def _reuse_case(shape, forward_layout, gen):
    x0, v0, w = (torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(3))
    x0, v0, w = (t.contiguous(memory_format=forward_layout) for t in (x0, v0, w))
    cot = [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(2)]  # contiguous cotangents
    return x0, v0, w, cot


def _step_grads(step, x0, v0, w, grad_outputs):
    """(dL/dx, dL/dv, dL/dw) of one step with g = 2 w, from the cotangents ``grad_outputs`` of (x', v')."""
    x, v, p = (t.clone().requires_grad_(True) for t in (x0, v0, w))
    xn, vn = step(x, v, 2.0 * p)
    return torch.autograd.grad((xn, vn), [x, v, p], grad_outputs=grad_outputs)


def test_backward_writes_its_gradients_into_cotangents_no_one_else_holds(monkeypatch):
    """reuse_cotangents=True on the compiled path: dL/dx is written into dL/dx' and dL/dv into dL/dv' (the same
    storage comes back), with the values of the step that allocates them and of the unfused rule."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    x0, v0, w, cot = _reuse_case((2, 8, 4, 4), torch.contiguous_format, torch.Generator().manual_seed(4))
    given = [t.clone() for t in cot]
    got = _step_grads(
        lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9, reuse_cotangents=True), x0, v0, w, given
    )
    assert got[0].data_ptr() == given[0].data_ptr() and got[1].data_ptr() == given[1].data_ptr()
    fresh = [t.clone() for t in cot]
    allocated = _step_grads(lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9), x0, v0, w, fresh)
    assert torch.equal(fresh[0], cot[0]) and torch.equal(fresh[1], cot[1])  # without reuse: the cotangents kept
    want = _step_grads(lambda x, v, g: unfused_step(x, v, g, "relu", 0.1, 0.9), x0, v0, w, cot)
    for a, b, c in zip(got, allocated, want):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, c, rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("case", ["one tensor for both", "another layout than the forward's"])
def test_backward_keeps_cotangents_it_cannot_write_into(monkeypatch, case):
    """reuse_cotangents=True, but the cotangents are one tensor, or come in a layout other than the forward's
    (channels-last state, contiguous cotangents, so the kernel needs a copy in the mask's order): they are left as
    they were and the gradients are the unfused rule's."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    layout = torch.contiguous_format if case == "one tensor for both" else torch.channels_last
    x0, v0, w, cot = _reuse_case((2, 8, 3, 5), layout, torch.Generator().manual_seed(5))
    if case == "one tensor for both":
        cot = [cot[0], cot[0]]
    given = [t.clone() for t in cot] if cot[0] is not cot[1] else [cot[0].clone()] * 2
    got = _step_grads(
        lambda x, v, g: momentum_float_step(x, v, g, "relu", c=0.1, gamma=0.9, reuse_cotangents=True), x0, v0, w, given
    )
    assert torch.equal(given[0], cot[0]) and torch.equal(given[1], cot[1])
    want = _step_grads(lambda x, v, g: unfused_step(x, v, g, "relu", 0.1, 0.9), x0, v0, w, cot)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)


class _SharedGradientBlock(zoo.models.resnet.BasicBlock):
    """A BasicBlock whose g adds x itself: autograd hands one gradient tensor to both terms of that sum."""

    def branch(self, x: torch.Tensor) -> torch.Tensor:
        return super().branch(x) + 0.5 * x


@pytest.mark.parametrize("init_velocity", ["zero", "f"])
@pytest.mark.parametrize("block", [zoo.models.resnet.BasicBlock, _SharedGradientBlock])
def test_full_stack_writing_into_cotangents_has_the_unfused_rule_gradients(monkeypatch, init_velocity, block):
    """A memory="full" momentum stack on the compiled path: every step but the last writes its gradients into its
    cotangents (counted), the stack's output gradient is used twice by the loss, and the input and parameter
    gradients equal the unfused rule's in float64; with v_0 = f(x_0) too (whose outputs, views of the kernel's
    result before, could not be overwritten by the next step)."""
    monkeypatch.setattr(fixed_point, "FLOAT_STEP_COMPILE_MIN_NUMEL", 0)
    torch.manual_seed(0)
    depth = 4
    stack = ResidualStack(
        [block(8, 8) for _ in range(depth)], rule="momentum", gamma=0.9, memory="full", init_velocity=init_velocity
    )
    stack = stack.double().train()
    x0 = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    w = torch.randn(2, 8, 4, 4, dtype=torch.float64)
    written = []
    get = fixed_point._KERNELS.get

    def counting_get(name, **static):
        if name == "float_step_backward_packed_into":
            written.append(static["grad_v"])
        return get(name, **static)

    monkeypatch.setattr(fixed_point._KERNELS, "get", counting_get)

    def grads(fused: bool):
        stack.forward_rule.fuses_tail = fused
        try:
            x = x0.clone().requires_grad_(True)
            out = stack(x)
            loss = (w * out).sum() + (out + out).square().sum()  # the output's gradient summed from three uses
            return torch.autograd.grad(loss, [x, *stack.parameters()])
        finally:
            del stack.forward_rule.fuses_tail

    got = grads(True)
    # every step but the last wrote into its cotangents; the first step's v_0 = 0 needs no gradient
    assert written == [True] * (depth - 2) + [init_velocity != "zero"]
    written.clear()
    want = grads(False)
    assert written == []
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
