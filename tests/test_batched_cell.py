"""supernet/batched_cell.py (issue 10): the same numbers as the DARTS-layout reference and the per-edge path,
within float64-derived tolerances, the same batch-norm running statistics, and the same search bitwise in two
processes (its algorithm choices are fixed rules, not timings)."""

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from supernet import SearchNetwork, batched_cell, cpu_convs
from supernet.compat.darts import _to_ours, from_darts
from tests.darts_reference import Network

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _levers_restored():
    saved = dict(batched_cell.LEVERS), batched_cell.ENABLED
    yield
    batched_cell.LEVERS.update(saved[0])
    batched_cell.ENABLED = saved[1]


def _pair(C=4, layers=3, seed=0):
    torch.manual_seed(seed)
    ref = Network(C, 5, layers)
    ref.alphas_normal = torch.randn(14, 8)
    ref.alphas_reduce = torch.randn(14, 8)
    net = from_darts(ref.state_dict(), ref.alphas_normal, ref.alphas_reduce)
    return ref.train(), net.train()


def _grads(model, x, dtype, darts_layout):
    """(logits, {our parameter name: grad}, {our buffer name: value}) after one forward + backward."""
    model = copy.deepcopy(model).to(dtype)
    if darts_layout:
        model.alphas_normal = model.alphas_normal.to(dtype).requires_grad_()
        model.alphas_reduce = model.alphas_reduce.to(dtype).requires_grad_()
    out = model(x.to(dtype))
    loss = out.square().mean() + out[:, 0].sum()
    loss.backward()
    name = _to_ours if darts_layout else (lambda k: k)
    grads = {name(k): p.grad.double() for k, p in model.named_parameters() if p.grad is not None}
    if darts_layout:
        grads["alphas_normal"] = model.alphas_normal.grad.double()
        grads["alphas_reduce"] = model.alphas_reduce.grad.double()
    buffers = {name(k): b.double() for k, b in model.named_buffers()}
    return out.double(), grads, buffers


def _err(a, b):
    return (a - b).abs().max().item()


def _assert_same(got, expected):
    assert _err(got[0], expected[0]) < 1e-10
    assert set(got[1]) == set(expected[1])
    for k in expected[1]:
        assert _err(got[1][k], expected[1][k]) < 1e-9 * (1 + expected[1][k].abs().max().item()), k


@pytest.mark.parametrize("seed", [0, 1])
def test_fp32_error_within_a_small_multiple_of_the_reference_networks(seed):
    ref, net = _pair(seed=seed)
    x = torch.randn(6, 3, 8, 8)
    truth = _grads(ref, x, torch.float64, True)
    ref32 = _grads(ref, x, torch.float32, True)
    ours32 = _grads(net, x, torch.float32, False)
    ours64 = _grads(net, x, torch.float64, False)
    _assert_same(ours64, truth)  # float64: equal to rounding
    # float32: the error against float64 is within a small multiple of the reference's own float32 error
    assert _err(ours32[0], truth[0]) <= 4 * _err(ref32[0], truth[0]) + 1e-6
    for k in truth[1]:
        scale = truth[1][k].abs().max().item()
        assert _err(ours32[1][k], truth[1][k]) <= 4 * _err(ref32[1][k], truth[1][k]) + 1e-6 * (1 + scale), k


def _buffers_after(momentum, enabled, steps=3):
    ref, net = _pair()
    for m in list(ref.modules()) + list(net.modules()):
        if isinstance(m, torch.nn.BatchNorm2d) and momentum != "default":
            m.momentum = momentum
    ref, net = ref.double(), net.double()
    batched_cell.ENABLED = enabled
    torch.manual_seed(1)
    for _ in range(steps):
        x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
        ref(x).sum().backward()
        net(x).sum().backward()
    batched_cell.ENABLED = True
    return {_to_ours(k): v.double() for k, v in ref.state_dict().items()}, net.state_dict()


@pytest.mark.parametrize("momentum", ["default", None])
def test_running_statistics_are_updated_as_every_edge_own_batch_norm(momentum):
    theirs, ours = _buffers_after(momentum, True)
    _, per_edge = _buffers_after(momentum, False)
    for k, v in ours.items():
        if k in theirs:
            # as the per-edge path; the per-edge path itself differs from the DARTS-layout oracle by up to
            # ~4e-8 (float64) in one pool's running variance
            assert torch.allclose(v.double(), per_edge[k].double(), rtol=1e-10, atol=1e-12), k
            assert torch.allclose(v.double(), theirs[k], rtol=1e-5, atol=1e-6), k


@pytest.mark.parametrize("lever", list(batched_cell.LEVERS))
def test_each_lever_alone_off_gives_the_same_numbers(lever):
    _, net = _pair()
    net = net.double()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    on = _grads(net, x, torch.float64, False)
    batched_cell.LEVERS[lever] = False
    off = _grads(net, x, torch.float64, False)
    batched_cell.ENABLED = False
    today = _grads(net, x, torch.float64, False)
    _assert_same(on, today)
    _assert_same(off, today)


@pytest.mark.parametrize("space, side", [("darts", 9), ("nb201", 8), ("nb201", 9)])
def test_other_spaces_and_odd_sizes_match_the_per_edge_path(space, side):
    # darts on odd sizes: FactorizedReduce pads; nb201: one input node, unnormalised pools, conv biases,
    # the last node as the cell's output (its space's declarations)
    torch.manual_seed(0)
    net = SearchNetwork(space, C=4, layers=3 if space == "darts" else 1, num_classes=5).double().train()
    x = torch.randn(3, 3, side, side, dtype=torch.float64)
    on = _grads(net, x, torch.float64, False)
    batched_cell.ENABLED = False
    off = _grads(net, x, torch.float64, False)
    _assert_same(on, off)


@pytest.mark.parametrize("k,dilation,stride,side", [(3, 1, 1, 8), (5, 1, 1, 8), (3, 2, 1, 8), (5, 2, 1, 8),
                                                    (5, 2, 1, 7), (3, 1, 2, 8), (5, 2, 2, 8),
                                                    (5, 1, 2, 8), (5, 1, 2, 7),
                                                    (5, 1, 1, 32)])  # 32: the NCHW input of `grad_weight_as_conv`
def test_depthwise_backward_alternatives_equal_the_conv_gradients(k, dilation, stride, side):
    torch.manual_seed(0)
    c, pad = 3, dilation * (k - 1) // 2
    x = torch.randn(2, c, side, side, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(c, 1, k, k, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.conv2d(xr, wr, None, stride, pad, dilation, c)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, (xr, wr), g)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = torch.autograd.grad(cpu_convs.Depthwise.apply(xb, wb, stride, pad, dilation), (xb, wb), g)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    # each alternative on its own, whatever the rule picks for this shape
    if stride == 1:
        flipped = F.conv2d(g, w.flip(2, 3), None, 1, pad, dilation, c)
        torch.testing.assert_close(flipped, expected[0], rtol=1e-10, atol=1e-10)
        if dilation == 1 or side % 2 == 0:
            split = cpu_convs.grad_weight_split(x, g, k, dilation)
            torch.testing.assert_close(split, expected[1], rtol=1e-10, atol=1e-10)
    as_conv = cpu_convs.grad_weight_as_conv(x, g, k, dilation, stride)
    torch.testing.assert_close(as_conv, expected[1], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("copies,stride,dilation", [(3, 1, 1), (2, 1, 2), (4, 2, 1)])
def test_depthwise_conv_of_input_copies_equals_the_conv_of_the_repeated_input(copies, stride, dilation):
    torch.manual_seed(0)
    c, k = 3, 5
    pad = dilation * (k - 1) // 2
    x = torch.randn(2, c, 8, 8, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(copies * c, 1, k, k, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = F.conv2d(xr.repeat(1, copies, 1, 1), wr, None, stride, pad, dilation, copies * c)
    g = torch.randn_like(y)
    expected = torch.autograd.grad(y, (xr, wr), g)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    out = cpu_convs.Depthwise.apply(xb, wb, stride, pad, dilation, copies)
    torch.testing.assert_close(out, y.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (xb, wb), g), expected):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("edges, o, c", [(1, 2, 3), (3, 5, 4), (4, 8, 8)])
def test_block_diagonal_equals_torch_block_diag(edges, o, c):
    blocks = torch.randn(edges, o, c, dtype=torch.float64)
    assert torch.equal(cpu_convs.block_diagonal(blocks), torch.block_diag(*blocks))
    # two pixels a row (`pointwise_mm`): the same weight twice, given as an expanded view
    assert torch.equal(cpu_convs.block_diagonal(blocks[0].expand(2, -1, -1)), torch.block_diag(blocks[0], blocks[0]))


def test_block_diagonal_pointwise_equals_each_edges_conv():
    torch.manual_seed(0)
    edges, c, o = 3, 4, 5
    y = torch.randn(2, edges * c, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    weights = torch.randn(edges, o, c, dtype=torch.float64)
    yr, wr = y.clone().requires_grad_(), weights.clone().requires_grad_()
    expected = torch.cat([F.conv2d(part, w[:, :, None, None]) for part, w in zip(yr.chunk(edges, 1), wr)], 1)
    g = torch.randn_like(expected)
    want = torch.autograd.grad(expected, (yr, wr), g)
    yb, wb = y.clone().requires_grad_(), weights.clone().requires_grad_()
    out = cpu_convs.BlockDiagonalPointwise.apply(yb, wb)
    assert out.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(out, expected.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(torch.autograd.grad(out, (yb, wb), g), want):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_edges_are_stacked_only_on_small_states_and_give_the_per_edge_numbers(monkeypatch):
    """The stacked chains run (a spy counts them) on the small states and not above STACK_MAX_ELEMENTS, and the
    network's logits, gradients and running statistics equal the per-edge path's in float64."""
    ref, net = _pair(C=4, layers=3)
    x = torch.randn(4, 3, 8, 8)
    calls = []
    stacked = batched_cell._stacked_chains
    monkeypatch.setattr(batched_cell, "_stacked_chains", lambda *a: calls.append(a[1].shape) or stacked(*a))
    got = _grads(net, x, torch.float64, False)
    assert calls and all(s.numel() <= batched_cell.STACK_MAX_ELEMENTS for s in calls)
    batched_cell.LEVERS["stack_edges"] = False
    expected = _grads(net, x, torch.float64, False)
    _assert_same(got, expected)
    for k in expected[2]:
        assert _err(got[2][k], expected[2][k]) < 1e-12, k
    batched_cell.LEVERS["stack_edges"] = True
    calls.clear()
    monkeypatch.setattr(batched_cell, "STACK_MAX_ELEMENTS", 4 * 16 * 2 * 2)  # the last stage (N 4, C 16, 2x2) only
    _grads(net, x, torch.float64, False)
    assert calls and all(s[2] < 4 for s in calls)


def test_algorithm_rules_read_only_shapes():
    rule = cpu_convs.split_weight_grad
    assert not rule(3, 1, 1, (32, 8, 16, 16))  # oneDNN's own fast case
    assert rule(3, 1, 2, (64, 16, 32, 32)) and not rule(3, 1, 2, (2, 3, 7, 7))  # polyphase needs even sides
    assert rule(5, 1, 2, (32, 16, 8, 8)) and not rule(5, 1, 2, (32, 8, 16, 16))
    assert rule(5, 1, 1, (64, 32, 16, 16)) and not rule(5, 1, 1, (32, 16, 8, 8))
    assert not rule(5, 2, 1, (32, 16, 8, 8))  # strided: oneDNN's
    assert cpu_convs.flip_input_grad(5, 1, 2) and not cpu_convs.flip_input_grad(3, 2, 1)
    as_conv = cpu_convs.gradient_as_kernel
    assert as_conv(5, 1, 1, (32, 8, 16, 16)) and not as_conv(5, 1, 1, (64, 32, 16, 16))
    assert as_conv(5, 1, 2, (32, 8, 16, 16)) and as_conv(5, 1, 2, (64, 16, 32, 32))
    assert not as_conv(3, 1, 1, (32, 8, 16, 16)) and not as_conv(3, 2, 1, (32, 8, 16, 16))
    assert as_conv(5, 2, 1, (32, 8, 16, 16)) and not as_conv(5, 2, 1, (64, 16, 32, 32))  # stride 2: sides <= 16
    assert as_conv(3, 1, 2, (32, 32, 4, 4)) and not as_conv(3, 1, 2, (32, 16, 8, 8))
    assert cpu_convs.subsampled_depthwise(2, 4, 2) and not cpu_convs.subsampled_depthwise(2, 2, 1)
    pixels = cpu_convs.pointwise_pixels_per_row
    assert pixels(32, 16, 8, 8) == 1 and pixels(64, 16, 32, 32) == 0
    assert pixels(32, 8, 16, 16) == 2 and pixels(1, 8, 65, 65) == 0  # an odd pixel count: oneDNN's conv
    assert not hasattr(batched_cell, "_CHOICES")  # no timed, cached choices


@pytest.mark.parametrize("pixels", [1, 2])
def test_pointwise_matmul_equals_the_conv(pixels):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 5, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    conv = torch.nn.Conv2d(6, 4, 1, bias=False).double()
    xr = x.clone().requires_grad_()
    y = cpu_convs.pointwise_mm(xr, conv.weight, pixels)
    assert y.is_contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, (xr, conv.weight), g)
    xr2 = x.clone().requires_grad_()
    expected = torch.autograd.grad(conv(xr2), (xr2, conv.weight), g)
    torch.testing.assert_close(y, conv(x))
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


def test_cells_stay_channels_last_and_other_paths_keep_theirs(monkeypatch):
    torch.manual_seed(0)
    net = SearchNetwork("darts", C=4, layers=3, num_classes=5).train()
    plans = net.plans()
    cell = net.cells[0]
    states = [torch.randn(2, 12, 8, 8)] * 2
    monkeypatch.setattr("kernels.backend.TRITON_ON_CPU", True)
    assert not batched_cell.applies(cell, plans[cell.cell_type], states[0])  # the Triton kernels' tensors
    monkeypatch.setattr("kernels.backend.TRITON_ON_CPU", False)
    assert batched_cell.applies(cell, plans[cell.cell_type], states[0])
    out = cell(states, plans[cell.cell_type], True)
    assert out.is_contiguous(memory_format=torch.channels_last)
    for mixing in ("gumbel", "partial", "sample"):
        other = SearchNetwork("darts", C=4, layers=3, num_classes=5, mixing=mixing).train()
        p = other.plans()
        assert not batched_cell.applies(other.cells[0], p[other.cells[0].cell_type], states[0])
    assert not batched_cell.applies(cell.eval(), plans[cell.cell_type], states[0])


def test_fewer_bytes_saved_for_backward():
    ref, net = _pair(C=4, layers=3)
    x = torch.randn(4, 3, 8, 8)

    def saved(model):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(x)
        return sum(seen.values())

    ref.alphas_normal.requires_grad_()
    ref.alphas_reduce.requires_grad_()
    assert saved(net) <= 0.6 * saved(ref)


# A short DARTS search (softmax mixing: the batched cells, with every algorithm rule on 8x8 images), its
# alphas written as bytes; the batched cell's use is counted so the test cannot pass on the per-edge path.
SEARCH = """
import sys, torch
torch.set_num_threads(1)
from supernet import batched_cell, data
from supernet.search_config import SearchConfig
from supernet.search_loop import Searcher
calls = [0]
nodes = batched_cell.cell_nodes
def counted(*args):
    calls[0] += 1
    return nodes(*args)
batched_cell.cell_nodes = counted
config = SearchConfig(method="darts", C=4, layers=3, epochs=1, batch_size=16, steps_per_epoch=3, max_train=96,
                      retrain_epochs=0)
searcher = Searcher(config, data.load_split("digits", seed=0, max_train=96))
before = [a.detach().clone() for a in searcher.net.arch_parameters()]
searcher.run()
assert calls[0] > 0, "the batched cell did not run"
assert not any(torch.equal(a, b) for a, b in zip(searcher.net.arch_parameters(), before)), "alphas did not move"
with open(sys.argv[1], "wb") as f:
    for a in searcher.net.arch_parameters():
        f.write(a.detach().contiguous().numpy().tobytes())
"""


def test_the_same_search_gives_bitwise_the_same_alphas_in_two_processes(tmp_path):
    outs = []
    for i in range(2):
        out = tmp_path / f"alphas{i}.bin"
        subprocess.run([sys.executable, "-c", SEARCH, str(out)], cwd=ROOT, check=True, timeout=300)
        outs.append(out.read_bytes())
    assert len(outs[0]) > 0 and outs[0] == outs[1]


@pytest.mark.parametrize("k", [3, 5])
@pytest.mark.parametrize("side", [7, 8, 9])
def test_strided_dilated_depthwise_is_a_conv_of_the_subsampled_input(k, side):
    # the reduction cells' dil_conv (stride 2, dilation 2) runs as a stride-1 conv of every other pixel
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 3, k, stride=2, padding=k - 1, dilation=2, groups=3, bias=False).double()
    assert cpu_convs.subsampled_depthwise(2, k - 1, 2)
    x = torch.randn(2, 3, side, side, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 3, (side + 1) // 2, (side + 1) // 2, dtype=torch.float64)
    ours = batched_cell._layer(conv, batched_cell.to_channels_last(x))
    theirs = conv(x)
    assert ours.shape == theirs.shape
    ours_grads = torch.autograd.grad(ours, (x, conv.weight), g)
    theirs_grads = torch.autograd.grad(theirs, (x, conv.weight), g)
    assert torch.allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    for a, b in zip(ours_grads, theirs_grads):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("incoming", ["channels_last", "contiguous"])  # from the next cell / from the classifier
def test_cell_output_hands_each_node_a_channels_last_gradient(incoming):
    space = SearchNetwork("darts", C=4, layers=2, num_classes=3).space
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=g).contiguous(memory_format=batched_cell.CL)
              .requires_grad_() for _ in range(space.num_input_nodes + space.num_nodes)]
    out = batched_cell.cell_output(space, states)
    torch.testing.assert_close(out, space.cell_output(states), rtol=0, atol=0)
    grad = torch.randn(out.shape, dtype=torch.float64, generator=g)
    if incoming == "channels_last":
        grad = grad.contiguous(memory_format=batched_cell.CL)
    got = torch.autograd.grad(out, states, grad, allow_unused=True)
    expected = torch.autograd.grad(space.cell_output(states), states, grad, allow_unused=True)
    for n, (a, b) in enumerate(zip(got, expected, strict=True)):
        if n in space.output_nodes:
            assert a.is_contiguous(memory_format=batched_cell.CL)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        else:
            assert a is None and b is None
