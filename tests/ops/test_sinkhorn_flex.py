"""The FlexAttention Sinkhorn path (zoo.ops.sinkhorn_flex) against the chunked kernel: its forward on CPU (the
unfused FlexAttention reference runs there), its backward and the automatic selection on CUDA only."""

from __future__ import annotations

import pytest
import torch

import zoo.ops.sinkhorn as sk
import zoo.ops.sinkhorn_flex as sf

pytestmark = pytest.mark.skipif(sf.flex_attention is None, reason="torch without flex_attention")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention's backward needs CUDA")


def rand(*shape, seed=0, device="cpu"):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def case(mask, n_iter, device="cpu", N=3, L=13, S=11):
    """Flattened q, k, v, compact bias + index, output factor of one test case."""
    q, k, v = rand(N, L, 4, seed=1), rand(N, S, 4, seed=2), rand(N, S, 5, seed=3)
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


def test_not_selected_on_cpu():
    assert not sf.flex_available(torch.device("cpu"))
    assert sk.kernel_path(torch.device("cpu"), 4096, 4096) == "tiled"


@needs_cuda
def test_selected_on_cuda():
    assert sk.kernel_path(torch.device("cuda"), 4096, 4096) == "flex"
    assert sk.kernel_path(torch.device("cuda"), 64, 64, dropout_p=0.1) == "chunked"


@needs_cuda
@pytest.mark.parametrize("n_iter", [2, 3, 4, 5])
@pytest.mark.parametrize("mask", ["none", "padding", "dense"])
def test_backward_on_cuda_equals_chunked_kernel(mask, n_iter):
    q, k, v, bias, idx, factor = case(mask, n_iter, "cuda", N=4, L=128, S=96)
    dout = rand(4, 128, 5, seed=6, device="cuda")
    results = []
    for flex in (True, False):
        ins = [t.clone().requires_grad_() for t in (q, k, v)]
        if flex:
            out = sf.flex_sinkhorn(*ins, bias, idx, factor, n_iter, 0.5)
        else:
            out = sk._SinkhornFunction.apply(*ins, bias, idx, None, n_iter, 0.5, factor, 4)
        results.append([out.detach(), *torch.autograd.grad((out * dout).sum(), ins)])
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, atol=2e-4, rtol=2e-4)
