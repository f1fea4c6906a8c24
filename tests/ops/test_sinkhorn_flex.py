"""The FlexAttention Sinkhorn path (zoo.ops.sinkhorn_flex) against the chunked kernel: its forward on CPU (the
unfused FlexAttention reference runs there), its backward through FlexAttention's own autograd on CPU (the dense
reference backward, with FlexAttention's CPU device check lifted), its fused CUDA kernels only with a GPU."""

from __future__ import annotations

import pytest
import torch

import zoo.ops.sinkhorn as sk
import zoo.ops.sinkhorn_flex as sf

pytestmark = pytest.mark.skipif(sf.flex_attention is None, reason="torch without flex_attention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's fused kernels need CUDA")


def rand(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def case(mask, n_iter, device="cpu", N=3, L=13, S=11, E=4, Ev=5):
    """Flattened q, k, v, compact bias + index, output factor of one test case."""
    q, k, v = rand(N, L, E, seed=1), rand(N, S, E, seed=2), rand(N, S, Ev, seed=3)
    bias = idx = None
    if mask == "padding":  # keys of slice 1 padded, shared over rows: (Nb, 1, S)
        bias = torch.zeros(N, 1, S).masked_fill(
            (torch.arange(S) >= 8) & (torch.arange(N) == 1)[:, None, None], -torch.inf
        )
        idx = torch.arange(N)
    if mask == "dense":  # one (L, S) mask shared by every slice, an empty row and column, a finite bias
        bias = rand(1, L, S, seed=4).masked_fill(rand(1, L, S, seed=5) > 1.0, -torch.inf)
        bias[:, 2, :] = -torch.inf
        bias[:, :, 3] = -torch.inf
        idx = torch.zeros(N, dtype=torch.long)
    factor = torch.full((N, 1, 1), L / S) if n_iter % 2 == 0 else None
    move = [t if t is None else t.to(device) for t in (q, k, v, bias, idx, factor)]
    return move


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")  # the unfused reference, on purpose
@pytest.mark.parametrize("n_iter", [2, 3, 5])
@pytest.mark.parametrize("mask", ["none", "padding", "dense"])
def test_forward_on_cpu_equals_chunked_kernel(mask, n_iter):
    q, k, v, bias, idx, factor = case(mask, n_iter)
    with torch.no_grad():
        out = sf.flex_sinkhorn(q, k, v, bias, idx, factor, n_iter, 0.7, compiled=False)
        ref = sk._SinkhornFunction.apply(q, k, v, bias, idx, None, n_iter, 0.7, factor, 2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def assert_flex_gradients_equal_chunked(inputs, n_iter, tol, compiled):
    """The flex path's output and gradients of q, k, v (a fixed random cotangent) equal the chunked kernel's, and
    are finite. ``inputs``: a ``case``."""
    q, k, v, bias, idx, factor = inputs
    dout = rand(q.shape[0], q.shape[1], v.shape[2], seed=6, device=q.device)
    results = []
    for flex in (True, False):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        if flex:
            out = sf.flex_sinkhorn(*ins, bias, idx, factor, n_iter, 0.5, compiled=compiled)
        else:
            out = sk._SinkhornFunction.apply(*ins, bias, idx, None, n_iter, 0.5, factor, 4)
        results.append([out.detach(), *torch.autograd.grad((out * dout).sum(), ins)])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=tol, rtol=tol)


@pytest.fixture
def flex_reference_backward_on_cpu(monkeypatch):
    """Lift FlexAttention's refusal of CPU inputs that require grad. Its autograd function is the one the CUDA path
    runs; without torch.compile (or under the "eager" backend) its backward is the dense reference that its fused
    CUDA kernels are generated to equal, and that math runs on any device."""
    import torch.nn.attention.flex_attention as fa

    if not hasattr(fa, "_validate_device"):
        pytest.skip("this torch checks FlexAttention's device elsewhere")
    monkeypatch.setattr(fa, "_validate_device", lambda *args, **kwargs: None)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("traced", [False, True], ids=["eager", "traced"])
@pytest.mark.parametrize("n_iter", [2, 3, 4, 5])
@pytest.mark.parametrize("mask", ["none", "padding", "dense"])
def test_backward_through_flexattention_autograd_equals_chunked_kernel(
    flex_reference_backward_on_cpu, monkeypatch, mask, n_iter, traced
):
    """Gradients of q, k, v through FlexAttention's autograd (the log-sum-exps the potentials come from, the
    potentials captured by score_mod, the closing call's lse factor) equal the chunked kernel's closed-form
    backward; the dense mask's empty row and column give finite gradients. ``traced``: through the path's own
    torch.compile settings (Dynamo, the "eager" backend), as the CUDA path calls it."""
    if traced:
        monkeypatch.setitem(sf._COMPILED, "flex", sf.compile_flex(backend="eager"))
    assert_flex_gradients_equal_chunked(case(mask, n_iter), n_iter, tol=1e-5, compiled=traced)


def test_not_selected_on_cpu():
    assert not sf.flex_available(torch.device("cpu"))
    assert sk.kernel_path(torch.device("cpu"), 4096, 4096) == "tiled"


def test_selected_on_cuda_where_its_kernels_run():
    # a device object is enough: the choice needs no GPU
    cuda = torch.device("cuda")
    assert sk.kernel_path(cuda, 4096, 4096) == "flex"
    assert sk.kernel_path(cuda, 64, 64, qk_dim=16, v_dim=24) == "flex"
    assert sk.kernel_path(cuda, 64, 64, dropout_p=0.1) == "chunked"
    # Triton's matrix product needs head dims of at least 16; FlexAttention's log-sum-exp is float32
    assert sk.kernel_path(cuda, 64, 64, qk_dim=8) == "chunked"
    assert sk.kernel_path(cuda, 4096, 4096, qk_dim=64, v_dim=15) == "tiled"
    assert sk.kernel_path(cuda, 64, 64, dtype=torch.float64) == "chunked"


def test_under_a_callers_compile_flex_on_cuda_chunked_elsewhere(monkeypatch):
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert sk.kernel_path(torch.device("cuda"), 4096, 4096) == "flex"  # its calls join the caller's graph
    assert sk.kernel_path(torch.device("cuda"), 4096, 4096, qk_dim=8) == "chunked"
    assert sk.kernel_path(torch.device("cpu"), 4096, 4096) == "chunked"  # not the tiled kernel's per-tile calls


@pytest.mark.parametrize("n_iter", [2, 3])
@pytest.mark.parametrize("mask", ["none", "padding", "dense"])
def test_traces_as_one_graph_inside_a_callers_compile(mask, n_iter):
    """Inside a caller's torch.compile the path calls flex_attention itself, traced into the caller's graph
    (fullgraph: no graph break; the "eager" backend runs FlexAttention's reference forward on CPU)."""
    q, k, v, bias, idx, factor = case(mask, n_iter, E=16, Ev=16)
    traced = torch.compile(
        lambda q, k, v: sf.flex_sinkhorn(q, k, v, bias, idx, factor, n_iter, 0.3), backend="eager", fullgraph=True
    )
    with torch.no_grad():
        out = traced(q, k, v)
        ref = sk._SinkhornFunction.apply(q, k, v, bias, idx, None, n_iter, 0.3, factor, 2)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_attention_passes_its_head_dims_and_dtype(monkeypatch):
    seen = []
    real = sk.kernel_path

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sk, "kernel_path", spy)
    for dtype, working in ((torch.bfloat16, torch.float32), (torch.float64, torch.float64)):
        q, k, v = rand(2, 3, 7, 12).to(dtype), rand(2, 3, 5, 12).to(dtype), rand(2, 3, 5, 20).to(dtype)
        sk.attention(q, k, v, None, n_iter=3)
        assert seen.pop() == {"dtype": working, "qk_dim": 12, "v_dim": 20}


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("mask", ["none", "padding"])
def test_row_steps_and_column_steps_compile_once_each(monkeypatch, mask):
    """Every call adds the same terms (zero vectors where a step has no potential): the row steps and the closing
    call of an even n_iter share one compiled graph, the column steps another, for n_iter 3 and 4 alike."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(sf._COMPILED, "flex", sf.compile_flex(backend="eager"))
    before = counters["frames"]["ok"]
    with torch.no_grad():
        for n_iter in (3, 4):
            q, k, v, bias, idx, factor = case(mask, n_iter, L=24, S=24, E=16, Ev=16)
            sf.flex_sinkhorn(q, k, v, bias, idx, factor, n_iter, 0.3)
    assert counters["frames"]["ok"] - before == 2


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_compiled_calls_follow_new_lengths_and_batches_without_recompiling(monkeypatch):
    """The path's torch.compile settings, traced on CPU (the "eager" backend: Dynamo's guards and recompilations,
    FlexAttention's reference forward). After two sizes every further sequence length and batch size reuses the
    dynamic compilations: with static shapes and torch's shared budget of 8, the third length fell back to the
    unfused path."""
    from torch._dynamo.utils import counters

    monkeypatch.setitem(sf._COMPILED, "flex", sf.compile_flex(backend="eager"))

    def run(sizes):
        for N, L in sizes:
            for mask in ("none", "padding"):
                for n_iter in (3, 4):
                    q, k, v, bias, idx, factor = case(mask, n_iter, N=N, L=L, S=L, E=16, Ev=16)
                    out = sf.flex_sinkhorn(q, k, v, bias, idx, factor, n_iter, 0.3)
                    ref = sk._SinkhornFunction.apply(q, k, v, bias, idx, None, n_iter, 0.3, factor, 2)
                    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)

    with torch.no_grad():
        limit_hits = sum(v for key, v in counters["unimplemented"].items() if "recompile limit" in key)
        run([(3, 24), (4, 40)])  # static, then dynamic compilations
        compiled = counters["frames"]["ok"]
        run([(5, 56), (2, 72), (6, 88)])
        assert counters["frames"]["ok"] == compiled  # nothing compiled for new lengths and batch sizes
        assert sum(v for key, v in counters["unimplemented"].items() if "recompile limit" in key) == limit_hits


@needs_cuda
@pytest.mark.parametrize("n_iter", [2, 3, 4, 5])
@pytest.mark.parametrize("mask", ["none", "padding", "dense"])
def test_backward_on_cuda_equals_chunked_kernel(mask, n_iter):
    # head dims of at least 16 (FlexAttention's CUDA kernels); 24: not a power of two
    inputs = case(mask, n_iter, "cuda", N=4, L=128, S=96, E=16, Ev=24)
    assert_flex_gradients_equal_chunked(inputs, n_iter, tol=2e-4, compiled=True)


def attention_against_the_cpu(device, mask_kind, n_iter, L, S, B=2, H=3, E=64):
    """(results on ``device``, the same call on the CPU) of ``sk.attention`` with a typed mask: [out, dq, dk, dv],
    float32. Sequence 1 (and on) padded to 5/8 of its keys (and queries)."""
    from zoo.ops import CausalMask, PaddingMask

    q, k, v, dout = rand(B, H, L, E, seed=7), rand(B, H, S, E, seed=8), rand(B, H, S, E, seed=9), rand(B, H, L, E)
    keys = torch.arange(S) >= torch.tensor([S] + [5 * S // 8] * (B - 1))[:, None]
    queries = torch.arange(L) >= torch.tensor([L] + [5 * L // 8] * (B - 1))[:, None]
    results = []
    for where in (device, "cpu"):
        mask = {
            "padding": PaddingMask(keys=keys.to(where), queries=queries.to(where)),
            "causal+padding": CausalMask() & PaddingMask(keys=keys.to(where), queries=queries.to(where)),
            "keys": PaddingMask(keys=keys.to(where)),
        }[mask_kind]
        ins = [t.to(where).requires_grad_() for t in (q, k, v)]
        out = sk.attention(*ins, mask, n_iter=n_iter)
        results.append([out.detach().cpu(), *(g.cpu() for g in torch.autograd.grad((out * dout.to(where)).sum(), ins))])
    return results


@needs_cuda
def test_attention_with_masks_on_cuda_equals_the_cpu_op():
    """The op as the models and the GPU suite call it (typed masks: key and query padding, causal with padding at
    an even n_iter, cross-attention with key padding), on FlexAttention, against the same call on the CPU (the
    chunked kernel): output and gradients, at a first and a second set of lengths (the second runs the dynamic
    recompilation), lengths not multiples of FlexAttention's 128-token blocks."""
    cuda = torch.device("cuda")
    cases = [("padding", 3, 96, 96), ("causal+padding", 4, 96, 96), ("keys", 3, 96, 96)]
    cases += [("padding", 3, 200, 200), ("keys", 3, 72, 136)]  # new lengths: the dynamic compilations
    for mask_kind, n_iter, L, S in cases:
        assert sk.kernel_path(cuda, L, S, qk_dim=64) == "flex"
        got, want = attention_against_the_cpu(cuda, mask_kind, n_iter, L, S)
        for a, b in zip(got, want):  # a wrong iteration count (n_iter 5 for 3) is off by 2e-2 of the largest entry
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b, atol=2e-4 * b.abs().max().item(), rtol=0)
