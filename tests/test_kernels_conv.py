"""Horizontal fusion of an edge's candidates: fused convolutions, concatenated batch norm, whole-edge outputs."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from kernels import fused_conv
from supernet import dispatch
from supernet.ops import build_op


def grads(out, inputs, seed=0):
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, inputs, g)


@settings(max_examples=10, deadline=None)
@given(n=st.integers(1, 2), c=st.integers(1, 6), h=st.integers(3, 9), w=st.integers(3, 9),
       stride=st.sampled_from([1, 2]), kinds=st.lists(st.sampled_from([(3, 1), (5, 1), (3, 2)]), min_size=1,
                                                      max_size=4), seed=st.integers(0, 2**16))
def test_footprint_depthwise_pointwise_equals_separate_convolutions(n, c, h, w, stride, kinds, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, generator=gen, requires_grad=True)
    dws = [torch.randn(c, 1, k, k, generator=gen, requires_grad=True) for k, _ in kinds]
    pws = [torch.randn(c + 1, c, 1, 1, generator=gen, requires_grad=True) for _ in kinds]
    dils = [d for _, d in kinds]
    fused = fused_conv.depthwise_pointwise_fused(x, dws, dils, pws, stride)
    ref = fused_conv.depthwise_pointwise_reference(x, dws, dils, pws, stride)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads(fused, [x, *dws, *pws]), grads(ref, [x, *dws, *pws])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_grouped_second_stage_equals_separate_convolutions():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, 7, generator=gen, requires_grad=True)  # two candidates of 3 channels
    dws = [torch.randn(3, 1, 3, 3, generator=gen), torch.randn(3, 1, 5, 5, generator=gen)]
    pws = [torch.randn(3, 3, 1, 1, generator=gen), torch.randn(3, 3, 1, 1, generator=gen)]
    fused = fused_conv.grouped_depthwise_pointwise(x, dws, [1, 1], pws)
    ref = fused_conv.grouped_depthwise_pointwise_reference(x, dws, [1, 1], pws)
    torch.testing.assert_close(fused, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads(fused, x)[0], grads(ref, x)[0], atol=1e-5, rtol=1e-5)


def test_kernels_that_do_not_fit_the_footprint_are_refused():
    with pytest.raises(ValueError, match="dilation 2 does not fit"):
        fused_conv.footprint_kernel(torch.zeros(4, 1, 5, 5), 2)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_concatenated_batch_norm_updates_each_module_as_its_own_forward(momentum, training):
    torch.manual_seed(0)
    bns = nn.ModuleList([nn.BatchNorm2d(c, affine=False, momentum=momentum) for c in (3, 4, 2)])
    for bn in bns:
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2)
    bns.train(training)
    twins = copy.deepcopy(bns)
    y = torch.randn(2, 9, 4, 5, requires_grad=True)
    fused = dispatch.batch_norm_concat(y, list(bns))
    ref = torch.cat([bn(part) for bn, part in zip(twins, y.split([3, 4, 2], dim=1))], dim=1)
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(grads(fused, y)[0], grads(ref, y)[0])
    for a, b in zip(bns.buffers(), twins.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


DARTS_OPS = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
             "dil_conv_5x5"]
NB201_OPS = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


@pytest.mark.parametrize("mode", ["horizontal", "shared_relu"])
@pytest.mark.parametrize("names, stride, pool_bn", [(DARTS_OPS, 1, True), (DARTS_OPS, 2, True),
                                                    (NB201_OPS, 1, False), (DARTS_OPS[3:6], 2, True)])
def test_fused_edge_outputs_equal_the_candidates_run_one_by_one(monkeypatch, mode, names, stride, pool_bn):
    monkeypatch.setitem(dispatch.CONV_FUSION, "cpu", mode)
    calls = []
    original = fused_conv.depthwise_pointwise_fused
    monkeypatch.setattr(fused_conv, "depthwise_pointwise_fused", lambda *a: calls.append(1) or original(*a))
    torch.manual_seed(0)
    c = 6
    ops = nn.ModuleDict({name: build_op(name, c, stride, affine=False, pool_batchnorm=pool_bn) for name in names})
    twins = copy.deepcopy(ops)
    x = torch.randn(2, c, 7, 9, requires_grad=True)
    fused = dispatch.edge_outputs(ops, x, names, fused=True)
    ref = dispatch.edge_outputs(twins, x, names, fused=False)
    assert len(calls) == (1 if mode == "horizontal" and "sep_conv_3x3" in names else 0)
    for name, a, b in zip(names, fused, ref):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    total_fused = sum(o.square().sum() for o in fused)
    total_ref = sum(o.square().sum() for o in ref)
    got = torch.autograd.grad(total_fused, [x, *ops.parameters()])
    want = torch.autograd.grad(total_ref, [x, *twins.parameters()])
    scale = max(g.abs().max().item() for g in want)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5 * scale, rtol=1e-4)
    for a, b in zip(ops.buffers(), twins.buffers()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
