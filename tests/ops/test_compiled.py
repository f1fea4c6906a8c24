"""CompiledKernels (zoo/ops/compiled.py): kernels with bound compile-time constants, eager or compiled."""

from __future__ import annotations

import warnings

import pytest
import torch

from zoo.ops.compiled import CompiledKernels, _bind_constants


def scaled_floor_div(t: torch.Tensor, *, d: int, scale: float) -> torch.Tensor:
    return torch.div(t, d, rounding_mode="floor") * scale


def test_bound_constants_are_keyword_defaults_of_a_separate_function() -> None:
    a = _bind_constants(scaled_floor_div, {"d": 3, "scale": 2.0}, 0)
    b = _bind_constants(scaled_floor_div, {"d": 5, "scale": 1.0}, 1)
    t = torch.arange(-7, 8)
    assert torch.equal(a(t), torch.div(t, 3, rounding_mode="floor") * 2.0)
    assert torch.equal(b(t), torch.div(t, 5, rounding_mode="floor") * 1.0)
    # each variant has its own code object (torch.compile keeps one cache per code object)
    assert a.__code__ is not b.__code__ and a.__code__ is not scaled_floor_div.__code__
    assert scaled_floor_div.__kwdefaults__ is None  # the original is untouched
    assert _bind_constants(scaled_floor_div, {}, 2) is scaled_floor_div


def test_many_constant_sets_compile_without_exhausting_the_recompile_limit() -> None:
    """More variants than torch._dynamo's per-code recompile limit (8): each compiled once, the eager values."""
    kernels = CompiledKernels(
        {"k": scaled_floor_div},
        env="ZOO_TEST_UNUSED",
        what="test kernels",
        fullgraph=True,
        options={"k": {"cpp.simdlen": 1}},
    )
    t = torch.arange(-50, 50, dtype=torch.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed compilation falls back with a warning: fail instead
        for d in range(2, 11):  # 9 variants
            k = kernels.get("k", d=d, scale=0.5)
            assert k is kernels.get("k", d=d, scale=0.5)  # cached per set of constants
            assert torch.equal(k(t), torch.div(t, d, rounding_mode="floor") * 0.5)
    assert kernels.enabled
    kernels.set_enabled(False)
    assert kernels.get("k", d=3, scale=1.0)(t).equal(torch.div(t, 3, rounding_mode="floor") * 1.0)


def test_a_kernel_keeps_compiling_past_torchs_shared_recompile_limit() -> None:
    """Sizes 0 and 1 stay specialised under dynamic shapes, and dtypes are guarded: mixed uses of one kernel (a
    chunk of one slice, a broadcast mask dim, float32 and float64) make more variants than torch's default budget
    of 8 per code object, past which every call would run eagerly. Each kernel has a budget of its own."""
    from torch._dynamo.utils import counters

    def scaled(t: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return t * s + 1

    kernels = CompiledKernels({"k": scaled}, env="ZOO_TEST_UNUSED", what="test kernels", backend="eager")
    limit_hits = sum(v for key, v in counters["unimplemented"].items() if "recompile limit" in key)
    shapes = [(1, 5), (2, 5), (3, 5), (1, 1), (2, 1), (1, 5, 1), (2, 5, 1), (2, 1, 5)]
    for dtype in (torch.float32, torch.float64):
        for shape in shapes:  # 16 calls, each a new variant (1-sized dims, ranks, dtypes)
            t = torch.randn(shape, dtype=dtype)
            torch.testing.assert_close(kernels["k"](t, torch.tensor(2.0, dtype=dtype)), t * 2 + 1)
    assert sum(v for key, v in counters["unimplemented"].items() if "recompile limit" in key) == limit_hits


def test_elementwise_kernels_run_on_one_dimensional_views_of_contiguous_arguments() -> None:
    """``elementwise=True``: the compiled kernel receives 1-D views of the arguments of the first argument's size
    when all are contiguous (other tensors and scalars as they are), and its results of that size come back in the
    first argument's shape; a non-contiguous argument keeps every argument as it is."""
    from zoo.ops.compiled import _flat_call

    seen: list[tuple[tuple[int, ...], ...]] = []

    def kernel(x: torch.Tensor, y: torch.Tensor, small: torch.Tensor, scalar: torch.Tensor):
        seen.append(tuple(tuple(t.shape) for t in (x, y, small, scalar)))
        return x * y + scalar, (x * y).amax(), small * 2

    flat = _flat_call(kernel)
    x, y = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    small, scalar = torch.randn(3), torch.tensor(0.5)
    out, top, small2 = flat(x, y, small, scalar)
    assert seen[-1] == ((24,), (24,), (3,), ())
    assert out.shape == (2, 3, 4) and torch.equal(out, x * y + 0.5)
    assert top.shape == () and torch.equal(top, (x * y).amax())
    assert small2.shape == (3,)
    flat(x, y.transpose(0, 1).contiguous().transpose(0, 1), small, scalar)  # y not contiguous
    assert seen[-1] == ((2, 3, 4), (2, 3, 4), (3,), ())

    kernels = CompiledKernels({"k": kernel}, env="ZOO_TEST_UNUSED", what="test kernels", elementwise=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for shape in [(2, 3, 4), (4, 5, 6), (3, 3, 3)]:  # a third shape: compiled with dynamic shapes
            a, b = torch.randn(shape), torch.randn(shape)
            got, got_top, _ = kernels.get("k")(a, b, small, scalar)
            assert got.shape == shape and torch.equal(got, a * b + 0.5) and torch.equal(got_top, (a * b).amax())
    assert kernels.enabled


def test_shaped_kernels_of_an_elementwise_set_get_their_arguments_as_given() -> None:
    """``shaped``: a kernel of an ``elementwise`` set that is called on its arguments as they are (here (2, 12)
    views, which the set's other kernels would see as 1-D), compiled and with the eager values; its in-place
    writes land in the given tensors."""
    seen: list[tuple[int, ...]] = []

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        y.copy_(y + x)
        return x * 2

    kernels = CompiledKernels(
        {"flat": kernel, "shaped": kernel},
        env="ZOO_TEST_UNUSED",
        what="test kernels",
        elementwise=True,
        shaped=("shaped",),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        x, y = torch.randn(2, 12), torch.randn(2, 12)
        want_y = y + x
        assert torch.equal(kernels.get("shaped")(x, y), x * 2) and torch.equal(y, want_y)
        assert seen[-1] == (2, 12)
        kernels.get("flat")(x, y)
        assert seen[-1] == (24,) and torch.equal(y, want_y + x)
    assert kernels.enabled


def test_elementwise_kernels_flatten_channels_last_arguments_in_memory_order() -> None:
    """Arguments sharing a channels-last layout are viewed as 1-D in memory order, and the results come back in
    the first argument's shape and layout with the eager values."""
    from zoo.ops.compiled import _flat_call, inverse_order, memory_order

    seen: list[tuple[int, ...]] = []

    def kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(x.shape))
        return x * 2 + y

    x, y = (torch.randn(2, 3, 4, 5).to(memory_format=torch.channels_last) for _ in range(2))
    assert memory_order(x) == (0, 2, 3, 1) and inverse_order((0, 2, 3, 1)) == (0, 3, 1, 2)
    out = _flat_call(kernel)(x, y)
    assert seen[-1] == (120,)
    assert out.shape == x.shape and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, x * 2 + y)
    _flat_call(kernel)(x, y.contiguous())  # mixed layouts: called as they are
    assert seen[-1] == (2, 3, 4, 5)


def test_out_of_memory_in_a_compiled_kernel_is_raised_and_other_failures_fall_back(monkeypatch) -> None:
    """An out-of-memory error is the step not fitting, not the compiler failing: it reaches the caller (a batch-size
    search sees it) and the kernels stay compiled; any other failure of the compiled kernel runs it eagerly."""
    failure: list[Exception] = []

    def compile_that_fails(fn, **options):
        def run(*args):
            raise failure[0]

        return run

    monkeypatch.setattr(torch, "compile", compile_that_fails)
    kernels = CompiledKernels({"double": lambda t: 2 * t}, env="ZOO_TEST_KERNELS", what="the test kernels")
    failure.append(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    with pytest.raises(torch.OutOfMemoryError):
        kernels["double"](torch.ones(3))
    assert kernels.enabled
    failure[0] = RuntimeError("no C compiler")
    with pytest.warns(UserWarning, match="did not compile .*no C compiler.*running them eagerly"):
        assert torch.equal(kernels["double"](torch.ones(3)), torch.full((3,), 2.0))
    assert not kernels.enabled
