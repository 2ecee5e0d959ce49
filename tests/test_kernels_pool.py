"""pool_candidates: the Triton kernels (interpreted without a GPU) and the dispatch custom op against PyTorch's pools."""

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.pool_candidates import pool_candidates_reference, pool_candidates_triton
from supernet import dispatch
from tests.compare import assert_close

pytestmark = pytest.mark.usefixtures("nan_fill")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def make_input(shape, dtype, seed, ties):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if ties:  # few distinct values: many windows hold their maximum twice
        x = (x * 2).round() / 2
    return x.to(dtype).to(DEVICE).requires_grad_()


@settings(max_examples=14, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
       stride=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_matches_reference_forward_and_backward(n, c, h, w, stride, dtype, ties, seed):
    x = make_input((n, c, h, w), dtype, seed, ties)
    atol, rtol = TOLERANCES[dtype]
    avg, mx = pool_candidates_triton(x, stride)
    # the reference in fp32: the kernel accumulates in fp32; max pool is exact in any dtype
    x32 = x.detach().float().requires_grad_()
    ref_avg, ref_mx = pool_candidates_reference(x32, stride)
    assert_close(avg, ref_avg.to(dtype), atol, rtol, "avg pool")
    assert torch.equal(mx, ref_mx.to(dtype)), "max pool is a selection: exact"
    g = torch.Generator().manual_seed(seed + 1)
    g_avg, g_max = torch.randn(avg.shape, generator=g).to(dtype), torch.randn(avg.shape, generator=g).to(dtype)
    got = torch.autograd.grad((avg, mx), x, (g_avg.to(DEVICE), g_max.to(DEVICE)))[0]
    want = torch.autograd.grad((ref_avg, ref_mx), x32, (g_avg.float().to(DEVICE), g_max.float().to(DEVICE)))[0]
    assert_close(got, want.to(dtype), atol, rtol, "dL/dx (argmax recomputed)")


@pytest.mark.parametrize("which", ["avg", "max"])
def test_backward_with_one_pool_unused(which):
    x = make_input((2, 3, 5, 7), torch.float32, 0, ties=True)
    avg, mx = pool_candidates_triton(x, 2)
    ref_avg, ref_mx = pool_candidates_reference(x, 2)
    used, ref_used = (avg, ref_avg) if which == "avg" else (mx, ref_mx)
    got = torch.autograd.grad(used.square().sum(), x)[0]
    want = torch.autograd.grad(ref_used.square().sum(), x)[0]
    assert_close(got, want, 1e-6, 1e-6, f"only {which} used")


def test_nan_propagates_through_max_pool_as_pytorch_does():
    x = torch.randn(1, 1, 4, 5, device=DEVICE)
    x[0, 0, 1, 2] = float("nan")
    x.requires_grad_()
    avg, mx = pool_candidates_triton(x, 1)
    ref_avg, ref_mx = pool_candidates_reference(x, 1)
    assert torch.equal(mx.isnan(), ref_mx.isnan())
    got = torch.autograd.grad(mx, x, torch.ones_like(mx))[0]
    want = torch.autograd.grad(ref_mx, x, torch.ones_like(ref_mx))[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("stride", [1, 2])
def test_dispatch_custom_op_matches_reference_and_passes_opcheck(stride):
    x = make_input((2, 3, 7, 5), torch.float32, 4, ties=True)
    avg, mx = torch.ops.supernet.pool_candidates(x, stride)
    ref_avg, ref_mx = pool_candidates_reference(x, stride)
    assert_close(avg, ref_avg, 1e-6, 1e-6, "avg")
    assert torch.equal(mx, ref_mx)
    got = torch.autograd.grad((avg, mx), x, (torch.ones_like(avg), 2 * torch.ones_like(mx)))[0]
    want = torch.autograd.grad((ref_avg, ref_mx), x, (torch.ones_like(avg), 2 * torch.ones_like(mx)))[0]
    assert_close(got, want, 1e-6, 1e-6, "dL/dx")
    torch.library.opcheck(torch.ops.supernet.pool_candidates.default, (x, stride))


@pytest.mark.parametrize("bad, message", [
    (lambda: pool_candidates_triton(torch.zeros(3, 4, 5), 1), r"shape \(N, C, H, W\), got \(3, 4, 5\)"),
    (lambda: pool_candidates_triton(torch.zeros(1, 1, 4, 4), 3), "stride must be 1 or 2, got 3"),
])
def test_bad_input_is_refused_with_the_value_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_dispatch_runs_the_reference_on_the_cpu():
    x = torch.randn(1, 2, 5, 5)
    avg, mx = dispatch.pool_candidates(x, 1)
    assert torch.equal(avg, pool_candidates_reference(x, 1)[0]) and torch.equal(mx, pool_candidates_reference(x, 1)[1])
