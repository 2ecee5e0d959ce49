import pytest
import torch

from supernet import Genotype, SearchNetwork
from supernet.compat.darts import from_darts, to_darts
from tests.darts_reference import Network


def _reference(seed=0, C=2, layers=4, in_channels=3, classes=7):
    torch.manual_seed(seed)
    ref = Network(C, classes, layers, in_channels)
    ref.alphas_normal = torch.randn(14, 8)  # spread out, so derivation has clear winners
    ref.alphas_reduce = torch.randn(14, 8)
    ref.train()
    with torch.no_grad():  # non-trivial BN running statistics
        for _ in range(2):
            ref(torch.randn(4, in_channels, 8, 8))
    return ref


@pytest.mark.parametrize("training", [False, True])
def test_loaded_darts_network_gives_the_same_logits(training):
    ref = _reference()
    net = from_darts(ref.state_dict(), ref.alphas_normal, ref.alphas_reduce)
    ref.train(training)
    net.train(training)
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), atol=1e-5, rtol=1e-5)


def test_loaded_darts_network_derives_the_darts_genotype():
    ref = _reference(seed=3)
    net = from_darts(ref.state_dict(), ref.alphas_normal, ref.alphas_reduce)
    normal, reduce = ref.genotype_lists()
    assert net.derive() == Genotype(normal, [2, 3, 4, 5], reduce, [2, 3, 4, 5])


def test_alphas_may_travel_inside_the_state_dict():
    ref = _reference(C=2, layers=3, in_channels=1, classes=3)
    state = dict(ref.state_dict(), alphas_normal=ref.alphas_normal, alphas_reduce=ref.alphas_reduce)
    net = from_darts(state)
    assert (net.C, net.layers, net.in_channels, net.num_classes) == (2, 3, 1, 3)
    assert torch.equal(net.alphas_reduce, ref.alphas_reduce)


def test_export_round_trips_to_the_darts_layout():
    ref = _reference()
    state, a_normal, a_reduce = to_darts(from_darts(ref.state_dict(), ref.alphas_normal, ref.alphas_reduce))
    expected = ref.state_dict()
    assert set(state) == set(expected)
    assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert "cells.0._ops.0._ops.4.op.1.weight" in state
    assert torch.equal(a_normal, ref.alphas_normal) and torch.equal(a_reduce, ref.alphas_reduce)


def test_bad_darts_states_are_refused_with_the_key_named():
    ref = _reference(C=2, layers=3)
    state = ref.state_dict()
    with pytest.raises(ValueError, match="missing alphas_normal"):
        from_darts(state)
    broken = {k: v for k, v in state.items() if k != "cells.1._ops.2._ops.4.op.1.weight"}
    with pytest.raises(ValueError, match=r"cells\.1\._ops\.2\._ops\.4\.op\.1\.weight"):
        from_darts(broken, ref.alphas_normal, ref.alphas_reduce)
    with pytest.raises(ValueError, match=r"alphas_normal has shape \(3, 8\)"):
        from_darts(state, ref.alphas_normal[:3], ref.alphas_reduce)
    with pytest.raises(ValueError, match="only a darts network with softmax mixing"):
        to_darts(SearchNetwork("nb201", 4, 1, 3))


def test_alphas_given_as_nested_lists_are_accepted_and_garbage_is_named():
    ref = _reference(C=2, layers=3)
    state = ref.state_dict()
    from_lists = from_darts(state, ref.alphas_normal.tolist(), ref.alphas_reduce.tolist())
    torch.testing.assert_close(from_lists.alphas_normal.detach(), ref.alphas_normal)
    with pytest.raises(ValueError, match="alphas_normal must be a tensor or a nested list of numbers, got str"):
        from_darts(state, "alphas", ref.alphas_reduce)
    with pytest.raises(ValueError, match="alphas_reduce must be a tensor or a nested list"):
        from_darts(state, ref.alphas_normal, [[1.0, 2.0], [3.0]])  # ragged
    with pytest.raises(ValueError, match="entry 'stem.0.weight' is a list; expected a tensor"):
        from_darts({**state, "stem.0.weight": state["stem.0.weight"].tolist()}, ref.alphas_normal, ref.alphas_reduce)
