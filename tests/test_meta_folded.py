"""The folded forward's parts: its forward against vmap over functional_call, and its custom autograd
Functions (whose backward passes second-order MAML differentiates) against finite differences."""

import pytest
import torch
from torch.func import functional_call, vmap

from supernet import SearchNetwork
from supernet.meta.folded import AddScaled, BatchNorm, TaskFoldedNetwork, grouped_conv, unsupported
from supernet.meta.learner import task_buffers


@pytest.mark.parametrize("C, side", [(2, 8), (4, 7)])  # 7: odd sizes through the reductions and the pool counts
def test_folded_forward_equals_vmap_over_the_module(C, side):
    torch.manual_seed(0)
    net = SearchNetwork("nb201", C=C, layers=1, num_classes=5, in_channels=1, fused=False).double().train()
    tasks = 3
    # every task its own parameters, as after the inner loop
    params = {k: v.detach() + 0.1 * torch.randn(tasks, *v.shape, dtype=v.dtype) for k, v in net.named_parameters()}
    x = torch.randn(tasks, 6, 1, side, side, dtype=torch.float64)
    buffers = task_buffers(dict(net.named_buffers()), tasks)
    expected = vmap(lambda p, b, xx: functional_call(net, (p, b), (xx,)))(params, buffers, x)
    torch.testing.assert_close(TaskFoldedNetwork(net)(params, x), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_batch_norm_gradients_and_their_gradients_are_exact(bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 4, 5, 3, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()
    inputs = (x, weight, torch.randn(4, dtype=torch.float64, generator=g).requires_grad_()) if bias else (x, weight)

    def f(x, weight, bias=None):
        return BatchNorm.apply(x, weight, bias, 1e-5)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    expected = torch.nn.functional.batch_norm(x, None, None, *inputs[1:], training=True)
    torch.testing.assert_close(f(*inputs), expected)


@pytest.mark.parametrize("stride, kernel, groups", [(1, 3, 2), (2, 3, 2), (1, 1, 1), (2, 1, 4)])
def test_grouped_conv_gradients_and_their_gradients_are_exact(stride, kernel, groups):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, generator=g).requires_grad_()
    weight = torch.randn(8, 4 // groups, kernel, kernel, dtype=torch.float64, generator=g).requires_grad_()
    bias = torch.randn(8, dtype=torch.float64, generator=g).requires_grad_()

    def f(x, weight, bias):
        return grouped_conv(x, weight, bias, (stride, stride), (kernel // 2,) * 2, (1, 1), groups)

    assert torch.autograd.gradcheck(f, (x, weight, bias))
    assert torch.autograd.gradgradcheck(f, (x, weight, bias))


@pytest.mark.parametrize("with_acc", [True, False])
def test_add_scaled_gradients_and_their_gradients_are_exact(with_acc):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64, generator=g).requires_grad_()
    scale = torch.randn(1, 3, 1, 1, 1, dtype=torch.float64, generator=g).requires_grad_()
    acc = torch.randn(2, 3, 2, 4, 4, dtype=torch.float64, generator=g).requires_grad_()
    inputs = (acc, y, scale) if with_acc else (y, scale)

    def f(*args):
        return AddScaled.apply(*args) if with_acc else AddScaled.apply(None, *args)

    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)
    torch.testing.assert_close(f(*inputs), acc + y * scale if with_acc else y * scale)


def test_unsupported_names_what_the_folded_path_does_not_cover():
    assert unsupported(SearchNetwork("nb201", C=4, layers=1, num_classes=3)) is None
    assert unsupported(SearchNetwork("nb201", C=4, layers=1, num_classes=3, mixing="partial")) == "mixing 'partial'"
    assert unsupported(SearchNetwork("darts", C=4, layers=2, num_classes=3)) == "cells with input preprocessing"
    with pytest.raises(ValueError, match="does not cover mixing 'gumbel'"):
        TaskFoldedNetwork(SearchNetwork("nb201", C=4, layers=1, num_classes=3, mixing="gumbel"))
