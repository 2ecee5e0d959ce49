"""pool_candidates: the Triton kernels (interpreted without a GPU) through their custom ops and autograd wrappers
against PyTorch's pools, the CPU implementation of the same ops, and the pools' batch-norm statistics from the
same pass against nn.BatchNorm2d(affine=False)."""

import copy
import os

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from kernels import pool_candidates as kernel
from kernels.pool_candidates import pool_candidates_reference, pool_stats_reference
from supernet import dispatch
from supernet.batch_norm import batch_norm_with_stats
from supernet.ops import build_op
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


@pytest.mark.usefixtures("triton_on_cpu")
@settings(max_examples=14, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 5), h=st.integers(1, 9), w=st.integers(1, 9),
       stride=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       ties=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_matches_reference_forward_and_backward(n, c, h, w, stride, dtype, ties, seed):
    x = make_input((n, c, h, w), dtype, seed, ties)
    atol, rtol = TOLERANCES[dtype]
    avg, mx = kernel.pool_candidates(x, stride)
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
def test_backward_with_one_pool_unused(implementation, which):
    x = make_input((2, 3, 5, 7), torch.float32, 0, ties=True)
    avg, mx = kernel.pool_candidates(x, 2)
    ref_avg, ref_mx = pool_candidates_reference(x, 2)
    used, ref_used = (avg, ref_avg) if which == "avg" else (mx, ref_mx)
    got = torch.autograd.grad(used.square().sum(), x)[0]
    want = torch.autograd.grad(ref_used.square().sum(), x)[0]
    assert_close(got, want, 1e-6, 1e-6, f"only {which} used")


def test_nan_propagates_through_max_pool_as_pytorch_does(implementation):
    x = torch.randn(1, 1, 4, 5, device=DEVICE)
    x[0, 0, 1, 2] = float("nan")
    x.requires_grad_()
    avg, mx = kernel.pool_candidates(x, 1)
    ref_avg, ref_mx = pool_candidates_reference(x, 1)
    assert torch.equal(mx.isnan(), ref_mx.isnan())
    got = torch.autograd.grad(mx, x, torch.ones_like(mx))[0]
    want = torch.autograd.grad(ref_mx, x, torch.ones_like(ref_mx))[0]
    assert torch.equal(got, want)


@pytest.mark.parametrize("stride", [1, 2])
def test_custom_op_matches_reference_and_passes_opcheck(monkeypatch, implementation, stride):
    x = make_input((2, 3, 7, 5), torch.float32, 4, ties=True)
    calls = []
    for name in ("pool_candidates_forward", "pool_candidates_backward"):
        original = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, name=name, original=original: calls.append(name) or original(*a))
    avg, mx = kernel.pool_candidates(x, stride)
    got = torch.autograd.grad((avg, mx), x, (torch.ones_like(avg), 2 * torch.ones_like(mx)))[0]
    assert calls == (["pool_candidates_forward", "pool_candidates_backward"] if implementation == "triton" else [])
    ref_avg, ref_mx = pool_candidates_reference(x, stride)
    assert_close(avg, ref_avg, 1e-6, 1e-6, "avg")
    assert torch.equal(mx, ref_mx)
    want = torch.autograd.grad((ref_avg, ref_mx), x, (torch.ones_like(avg), 2 * torch.ones_like(mx)))[0]
    assert_close(got, want, 1e-6, 1e-6, "dL/dx")
    # the ops are forward-only (the wrappers are their autograd): checked on an input that does not require grad
    torch.library.opcheck(torch.ops.supernet.pool_candidates.default, (x.detach(), stride))
    grads = (torch.randn_like(avg), torch.randn_like(mx))
    torch.library.opcheck(torch.ops.supernet.pool_candidates_backward.default, (x.detach(), stride, *grads))


@pytest.mark.parametrize("bad, message", [
    (lambda: kernel.pool_candidates(torch.zeros(3, 4, 5), 1), r"shape \(N, C, H, W\), got \(3, 4, 5\)"),
    (lambda: kernel.pool_candidates(torch.zeros(1, 1, 4, 4), 3), "stride must be 1 or 2, got 3"),
])
def test_bad_input_is_refused_with_the_value_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()


def test_fused_edge_runs_pytorchs_pools_on_the_cpu(monkeypatch):
    # one op computing both pools is slower on the CPU than PyTorch's two pools (bench/README.md)
    monkeypatch.setattr(kernel, "pool_candidates", lambda *a: pytest.fail("the kernel's wrapper ran on the CPU"))
    ops = pool_edge(2, 1, 0.1, list(dispatch.POOLS))
    x = torch.randn(2, 2, 5, 5)
    got = dispatch.edge_outputs(ops, x, list(dispatch.POOLS), fused=True)
    want = [bn(y) for bn, y in zip((ops[p][1] for p in dispatch.POOLS), pool_candidates_reference(x, 1))]
    assert all(torch.equal(a, b) for a, b in zip(got, want))


# --- batch-norm statistics from the same pass -----------------------------------------------------
def relative_rms(actual, expected, floor):
    """||actual - expected|| / ||expected||, with ||expected|| taken as at least an RMS of `floor` (a constant
    channel normalises to zeros, against which any rounding is infinitely large)."""
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(floor * e.numel() ** 0.5)).item()


def check_pool_batch_norm(x, stride, momentum, tolerance):
    """Triton pools + their statistics + batch_norm_with_stats against PyTorch's pools + BatchNorm2d."""
    dtype = x.dtype
    c = x.shape[1]
    # eps 1e-3 rather than 1e-5: a constant channel (frequent in small planes) multiplies rounding noise by
    # 1/sqrt(eps), in nn.BatchNorm2d as here; the module's eps is what both paths use
    bns = [nn.BatchNorm2d(c, eps=1e-3, affine=False, momentum=momentum).to(DEVICE) for _ in range(2)]
    for bn in bns:  # running statistics away from their initial values, so the update is seen
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    ref_bns = copy.deepcopy(bns)
    avg, mx, mean, var = kernel.pool_stats(x, stride)
    got = [batch_norm_with_stats(y, mean[k], var[k], bns[k]) for k, y in enumerate((avg, mx))]
    # reference: PyTorch's pools from the fp32 input, rounded as the kernel stores them, batch norm in fp32
    x32 = x.detach().float().requires_grad_()
    ref_pools = [y.to(dtype).float() for y in pool_candidates_reference(x32, stride)]
    want = [bn(y) for bn, y in zip(ref_bns, ref_pools)]
    atol, rtol = TOLERANCES[dtype]
    for k, (what, y) in enumerate(zip(("avg", "max"), (avg, mx))):
        assert_close(y, ref_pools[k].to(dtype).detach(), atol, rtol, f"{what} pool")
        # the statistics are of the stored outputs: exact up to the fp32 sum order
        var_ref, mean_ref = torch.var_mean(y.detach().float(), dim=(0, 2, 3), correction=0)
        assert_close(mean[k], mean_ref, 1e-5, 1e-5, f"{what} batch mean")
        assert_close(var[k], var_ref, 1e-5, 1e-4, f"{what} batch variance")
        assert relative_rms(got[k], want[k].to(dtype), 1.0) < tolerance, f"{what}: normalised output"
        assert torch.isfinite(got[k]).all()
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            b, r = getattr(bns[k], name), getattr(ref_bns[k], name)
            torch.testing.assert_close(b, r, atol=max(atol, 1e-6), rtol=max(rtol, 1e-5),
                                       msg=lambda m, n=f"{what} {name}": f"{n}: {m}")
    g = torch.Generator().manual_seed(7)
    grads = [torch.randn(avg.shape, generator=g).to(DEVICE) for _ in range(2)]
    dx = torch.autograd.grad(got, x, [gr.to(dtype) for gr in grads])[0]
    dx_ref = torch.autograd.grad(want, x32, grads)[0]
    assert torch.isfinite(dx).all()
    # dL/dx scales as 1/sqrt(var + eps): at least that RMS, so a constant channel's rounding noise is relative to it
    floor = torch.rsqrt(var.detach().min() + bns[0].eps).item()
    assert relative_rms(dx, dx_ref, floor) < tolerance, "dL/dx through both batch norms"


RMS_TOLERANCES = {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 3e-2}


@pytest.mark.usefixtures("triton_on_cpu")
@settings(max_examples=12, deadline=None)
@given(n=st.integers(1, 3), c=st.sampled_from([1, 3, 5, 6]), h=st.integers(1, 9), w=st.integers(1, 9),
       stride=st.sampled_from([1, 2]), dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
       momentum=st.sampled_from([0.1, None]), ties=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_statistics_give_batch_norm_after_the_pools(n, c, h, w, stride, dtype, momentum, ties, seed):
    assume(n * ((h - 1) // stride + 1) * ((w - 1) // stride + 1) > 1)  # batch norm needs two values a channel
    x = make_input((n, c, h, w), dtype, seed, ties)
    check_pool_batch_norm(x, stride, momentum, RMS_TOLERANCES[dtype])


@pytest.mark.usefixtures("triton_on_cpu")
@pytest.mark.parametrize("stride", [1, 2])
def test_triton_statistics_merge_several_programs_per_plane(stride):
    # 35x33 at stride 1 is 1155 outputs a plane: two programs, merged by the second stage; a shifted
    # input (mean 10, pooled variance about 0.1) checks that the variance does not lose its digits to
    # cancellation (E[y^2] - E[y]^2 in fp32 would be off by about 1e-3 relative here)
    x = (make_input((2, 3, 35, 33), torch.float32, 11, ties=False).detach() + 10).requires_grad_()
    check_pool_batch_norm(x, stride, 0.1, 1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_statistics_wrapper_matches_reference_and_passes_opcheck(implementation, stride):
    x = make_input((2, 3, 7, 5), torch.float32, 5, ties=True)
    got = kernel.pool_stats(x, stride)
    want = pool_stats_reference(x, stride)
    for a, b, what in zip(got, want, ("avg", "max", "mean", "var")):
        assert_close(a, b, 1e-6, 1e-6, what)
    grads = [torch.randn_like(t) for t in want]
    dx = torch.autograd.grad(got, x, grads)[0]
    dx_ref = torch.autograd.grad(want, x, grads)[0]
    assert_close(dx, dx_ref, 1e-5, 1e-5, "dL/dx through the statistics")
    torch.library.opcheck(torch.ops.supernet.pool_candidates_stats.default, (x.detach(), stride))


def pool_edge(c, stride, momentum, names):
    ops = nn.ModuleDict({name: build_op(name, c, stride, affine=False, pool_batchnorm=True) for name in names})
    for name in dispatch.POOLS:
        ops[name][1].momentum = momentum
    return ops


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("stride, momentum", [(1, 0.1), (2, None)])
def test_edge_outputs_with_fused_pool_statistics_equal_the_modules(monkeypatch, triton_on_cpu, stride, momentum,
                                                                   training):
    # POOL_BN_FUSION on for the CPU sends edge_outputs through the statistics kernel (interpreted here)
    monkeypatch.setitem(dispatch.POOL_BN_FUSION, "cpu", True)
    names = [*dispatch.POOLS, "skip_connect"] if stride == 1 else list(dispatch.POOLS)  # skip: identity at stride 1
    ops = pool_edge(5, stride, momentum, names).train(training)
    ref_ops = copy.deepcopy(ops)
    x = make_input((3, 5, 9, 7), torch.float32, 3, ties=False)
    calls = []
    original = kernel.pool_stats_forward
    monkeypatch.setattr(kernel, "pool_stats_forward", lambda *a: calls.append(a) or original(*a))
    got = dispatch.edge_outputs(ops, x, names, fused=True)
    assert len(calls) == (1 if training else 0), "training uses the one-pass statistics, eval the running ones"
    want = dispatch.edge_outputs(ref_ops, x, names, fused=False)
    grads = [torch.randn_like(o) for o in want]
    dx = torch.autograd.grad(got, x, grads)[0]
    dx_ref = torch.autograd.grad(want, x, grads)[0]
    for a, b, name in zip(got, want, names):
        assert_close(a, b, 1e-5, 1e-5, name)
    assert_close(dx, dx_ref, 1e-5, 1e-5, "dL/dx")
    for (name, a), b in zip(ref_ops.named_buffers(), ops.buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_batch_norm_with_stats_refuses_an_affine_batch_norm():
    y = torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match="non-affine batch norm"):
        batch_norm_with_stats(y, y.mean((0, 2, 3)), y.var((0, 2, 3)), nn.BatchNorm2d(3))
