import pytest
import torch
import torch.nn.functional as F
from torch import nn

from supernet.ops import OPS, DilConv, FactorizedReduce, Identity, PoolBN, SepConv, StartsWithReLU, build_op, pool_parts


def test_registry_holds_both_spaces_ops():
    for name in ("none", "max_pool_3x3", "avg_pool_3x3", "skip_connect", "sep_conv_3x3", "sep_conv_5x5",
                 "dil_conv_3x3", "dil_conv_5x5", "sep_conv_7x7", "conv_7x1_1x7", "nor_conv_1x1", "nor_conv_3x3"):
        assert name in OPS
    with pytest.raises(ValueError, match=r"unknown candidate op 'conv_9x9'; expected one of \["):
        build_op("conv_9x9", 4, 1, affine=False)
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 3"):
        build_op("sep_conv_3x3", 4, 3, affine=False)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("size", [7, 8])
def test_every_op_keeps_channels_and_strides_the_resolution(stride, size):
    x = torch.randn(2, 6, size, size)
    for name in OPS:
        y = build_op(name, 6, stride, affine=False)(x)
        assert y.shape == (2, 6, -(-size // stride), -(-size // stride)), name


def test_average_pooling_does_not_count_padding():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    y = build_op("avg_pool_3x3", 1, 1, affine=True)(x)
    assert y[0, 0, 0, 0] == (0 + 1 + 4 + 5) / 4  # corner: 4 real pixels, not 9
    assert y[0, 0, 1, 1] == x[0, 0, :3, :3].mean()


def test_separable_conv_is_applied_twice_and_strides_only_first():
    op = build_op("sep_conv_5x5", 4, 2, affine=False)
    convs = [m for m in op.modules() if isinstance(m, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == 4]
    assert isinstance(op, SepConv) and len(convs) == 4 and len(depthwise) == 2
    assert [c.stride for c in depthwise] == [(2, 2), (1, 1)] and depthwise[0].kernel_size == (5, 5)
    relus = [m for m in op.op if isinstance(m, nn.ReLU)]
    assert len(relus) == 2 and isinstance(op.op[0], nn.ReLU)  # ReLU-Conv-BN order


def test_dilated_conv_uses_dilation_two():
    op = build_op("dil_conv_3x3", 1, 1, affine=False)
    assert isinstance(op, DilConv) and op.op[1].dilation == (2, 2)
    with torch.no_grad():
        op.op[1].weight.fill_(1.0)
        op.op[2].weight.fill_(1.0)
    x = torch.zeros(1, 1, 9, 9, requires_grad=True)
    op.op[:3](x + 1)[0, 0, 4, 4].backward()  # before BN: receptive field of one output pixel
    assert x.grad[0, 0].nonzero().tolist() == [[r, c] for r in (2, 4, 6) for c in (2, 4, 6)]


def test_strided_skip_is_a_factorized_reduce_equal_to_darts_on_even_sizes():
    assert isinstance(build_op("skip_connect", 4, 1, affine=False), Identity)
    op = build_op("skip_connect", 4, 2, affine=False)
    assert isinstance(op, FactorizedReduce)
    x = torch.randn(2, 4, 8, 8)
    r = F.relu(x)
    darts = torch.cat([op.conv_1(r), op.conv_2(r[:, :, 1:, 1:])], dim=1)  # DARTS's slicing
    torch.testing.assert_close(op(x), op.bn(darts))
    assert op(torch.randn(2, 4, 7, 7)).shape == (2, 4, 4, 4)


def test_search_pools_get_a_non_affine_batch_norm():
    op = build_op("max_pool_3x3", 4, 1, affine=False, pool_batchnorm=True)
    assert isinstance(op[1], nn.BatchNorm2d) and not op[1].affine
    assert not isinstance(build_op("sep_conv_3x3", 4, 1, affine=False, pool_batchnorm=True), nn.Sequential)


def test_nb201_convs_have_a_bias_exactly_when_batch_norm_has_no_affine_shift():
    search, final = build_op("nor_conv_3x3", 4, 1, affine=False), build_op("nor_conv_3x3", 4, 1, affine=True)
    assert search[1].bias is not None and not search[2].affine
    assert final[1].bias is None and final[2].affine


def test_none_is_zero_at_the_strided_resolution():
    y = build_op("none", 3, 2, affine=False)(torch.randn(1, 3, 5, 5))
    assert y.shape == (1, 3, 3, 3) and not y.any()


RELU_FIRST = ("sep_conv_3x3", "sep_conv_5x5", "sep_conv_7x7", "dil_conv_3x3", "dil_conv_5x5", "conv_7x1_1x7",
              "nor_conv_1x1", "nor_conv_3x3")


@pytest.mark.parametrize("stride", [1, 2])
def test_candidates_that_start_with_a_relu_declare_it_and_run_the_rest_from_relu_x(stride):
    # the fused path shares one ReLU(x) between these: their declared stages must give their own output
    x = torch.randn(2, 4, 7, 7)
    for name in OPS:
        op = build_op(name, 4, stride, affine=False)
        assert isinstance(op, StartsWithReLU) == (name in RELU_FIRST), name
        if name in RELU_FIRST:
            torch.testing.assert_close(op.after_relu(torch.relu(x)), op(x), msg=name)


def test_pool_candidates_declare_their_pool_and_batch_norm():
    pool, bn = pool_parts(build_op("avg_pool_3x3", 4, 2, affine=False, pool_batchnorm=True))
    assert isinstance(pool, nn.AvgPool2d) and pool.stride == 2 and isinstance(bn, nn.BatchNorm2d)
    pool, bn = pool_parts(build_op("max_pool_3x3", 4, 1, affine=False))
    assert isinstance(pool, nn.MaxPool2d) and bn is None
    op = build_op("max_pool_3x3", 4, 1, affine=False, pool_batchnorm=True)
    assert isinstance(op, PoolBN) and list(op.state_dict()) == ["1.running_mean", "1.running_var",
                                                                 "1.num_batches_tracked"]
