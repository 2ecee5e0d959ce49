"""One edge's candidates on the fused path (pools from one pass, one shared ReLU) against each candidate run on its
own, both measured from a float64 run."""

import copy

import pytest
import torch
from torch import nn

from supernet import dispatch
from supernet.ops import ReLUSequential, build_op
from tests.compare import assert_error_bounded

DARTS_OPS = ["max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5", "dil_conv_3x3",
             "dil_conv_5x5"]
NB201_OPS = ["skip_connect", "nor_conv_1x1", "nor_conv_3x3", "avg_pool_3x3"]


@pytest.mark.parametrize("names, stride, pool_bn", [(DARTS_OPS, 1, True), (DARTS_OPS, 2, True),
                                                    (NB201_OPS, 1, False), (DARTS_OPS[3:6], 2, True)])
def test_fused_edge_outputs_equal_the_candidates_run_one_by_one(implementation, names, stride, pool_bn):
    torch.manual_seed(0)
    c = 6
    ops = nn.ModuleDict({name: build_op(name, c, stride, affine=False, pool_batchnorm=pool_bn) for name in names})
    leading_relus = []
    for module in ops.modules():
        if isinstance(module, ReLUSequential):
            module[0].register_forward_hook(lambda *_: leading_relus.append(1))
    twins = copy.deepcopy(ops)
    exact_ops = copy.deepcopy(ops).double()
    x = torch.randn(2, c, 7, 9, requires_grad=True)
    x64 = x.detach().double().requires_grad_()
    fused = dispatch.edge_outputs(ops, x, names, fused=True)
    assert not leading_relus, "the fused edge computes ReLU(x) once, for every candidate that starts with one"
    ref = dispatch.edge_outputs(twins, x, names, fused=False)
    exact = dispatch.edge_outputs(exact_ops, x64, names, fused=False)
    for name, a, r, e in zip(names, fused, ref, exact):
        assert_error_bounded(a, r, e, name)
    got = torch.autograd.grad(sum(o.square().sum() for o in fused), [x, *ops.parameters()])
    want = torch.autograd.grad(sum(o.square().sum() for o in ref), [x, *twins.parameters()])
    want64 = torch.autograd.grad(sum(o.square().sum() for o in exact), [x64, *exact_ops.parameters()])
    param_names = ["x", *(n for n, _ in ops.named_parameters())]
    for name, a, r, e in zip(param_names, got, want, want64):
        assert_error_bounded(a, r, e, f"gradient of {name}")
    for (name, a), r, e in zip(ops.named_buffers(), twins.buffers(), exact_ops.buffers()):
        if a.is_floating_point():
            assert_error_bounded(a, r, e, name)
        else:
            assert torch.equal(a, r), name
