"""Each mixing rule against its definition, written out as an explicit loop."""

import pytest
import torch
import torch.nn.functional as F

from supernet import MIXING, SearchNetwork
from supernet.mixing import Fixed, channel_shuffle
from supernet.ops import build_op


def _net(space, mixing, **kw):
    torch.manual_seed(0)
    layers = 3 if space == "darts" else 1
    net = SearchNetwork(space, 4, layers, 5, in_channels=2, mixing=mixing, **kw)
    with torch.no_grad():
        for p in net.arch_parameters():
            p.normal_()  # spread weights so that mistakes show
    return net


def _cell_inputs(net, cell_index):
    """The inputs the network feeds cell `cell_index`, captured with a hook."""
    captured = {}
    handle = net.cells[cell_index].register_forward_pre_hook(lambda m, args: captured.setdefault("args", args))
    net(torch.randn(3, 2, 8, 8))
    handle.remove()
    return captured["args"][0]


def _explicit_cell(cell, inputs, weights, op_output):
    """Node j = sum over inputs i and ops k of weights[e, k] * op_output(e, k, state_i)."""
    space = cell.space
    states = [getattr(cell, f"preprocess{i}", lambda x: x)(x) for i, x in enumerate(inputs)]
    for node in range(space.num_input_nodes, space.num_input_nodes + space.num_nodes):
        total = 0
        for e in space.node_edges(node):
            for k in range(len(space.ops)):
                total = total + weights[e, k] * op_output(e, k, states[space.edges[e][1]])
        states.append(total)
    return states[-1] if space.num_input_nodes == 1 else torch.cat(states[space.num_input_nodes:], dim=1)


def _op_output(cell):
    def run(e, k, x):
        name = cell.space.ops[k]
        if name == "none":
            return build_op("none", x.shape[1], cell.edges[e].stride, affine=False)(x)
        return cell.edges[e].ops[name](x)
    return run


def test_registry_lists_the_rules():
    assert MIXING.names() == ["softmax", "gumbel", "sample", "partial", "aux-skip", "random-smoothing", "dirichlet", "fixed"]
    with pytest.raises(ValueError, match=r"unknown mixing rule 'snas'"):
        SearchNetwork("darts", 4, 3, 5, mixing="snas")


@pytest.mark.parametrize("space, cell_index", [("darts", 1), ("darts", 2), ("nb201", 0)])
def test_softmax_equals_the_explicit_weighted_sum_over_all_candidates(space, cell_index):
    net = _net(space, "softmax")
    net.eval()
    cell = net.cells[cell_index]
    inputs = _cell_inputs(net, cell_index)
    weights = F.softmax(net.alphas(cell.cell_type), dim=-1)
    with torch.no_grad():
        expected = _explicit_cell(cell, inputs, weights, _op_output(cell))
        got = cell(list(inputs), net.plans()[cell.cell_type], fused=False)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert all("none" not in edge.ops for edge in cell.edges)  # `none` has no module and costs nothing


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_hard_gumbel_forward_equals_the_chosen_ops_and_gradients_reach_every_alpha(space):
    net = _net(space, "gumbel", tau=0.5)
    net.eval()
    x = torch.randn(3, 2, 8, 8)
    torch.manual_seed(7)
    plans = net.plans()
    chosen = {ct: [None] * net.space.num_edges for ct in net.space.cell_types}
    for ct, plan in plans.items():
        for node_plan in plan:
            for e, k in node_plan.pairs:
                chosen[ct][e] = k
            assert node_plan.residual.item() == 0.0
            if node_plan.weights is not None:
                assert torch.equal(node_plan.weights, torch.ones_like(node_plan.weights))
    logits = net.forward_plans(x, plans)
    only_chosen = net.forward_plans(x, Fixed(chosen).plan(net.space, {}))
    assert torch.equal(logits, only_chosen)
    logits.square().sum().backward()
    for p in net.arch_parameters():
        assert p.grad is not None and (p.grad != 0).all(dim=1).all()


def test_gumbel_samples_follow_the_alphas_and_are_exactly_one_hot():
    net = _net("nb201", "gumbel")
    with torch.no_grad():
        net.alphas_cell.zero_()
        net.alphas_cell[:, 3] = 3.0
    counts = torch.zeros(5)
    torch.manual_seed(0)
    for _ in range(200):
        _, index = net.mixing.hard_sample(net.alphas_cell)
        counts += F.one_hot(index, 5).sum(0)
    assert counts.argmax() == 3 and counts[3] > 0.6 * counts.sum()
    for tau in (10.0, 0.1):
        net.mixing.tau = tau
        hard, index = net.mixing.hard_sample(torch.randn(6, 5))
        assert torch.equal(hard, F.one_hot(index, 5).float())  # values exactly one-hot at any temperature


@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_sample_runs_only_the_chosen_op_of_each_edge(space):
    net = _net(space, "sample")
    calls = []
    for c, cell in enumerate(net.cells):
        for e, edge in enumerate(getattr(cell, "edges", [])):
            for name, op in edge.ops.items():
                op.register_forward_hook(lambda m, i, o, key=(c, e, name): calls.append(key))
    import random
    genotype = net.space.random_genotype(random.Random(3))
    net.set_active(genotype)
    net(torch.randn(2, 2, 8, 8))
    paths = net.space.to_paths(genotype)
    expected = {(c, e, net.space.ops[k]) for c, cell in enumerate(net.cells) if hasattr(cell, "edges")
                for e, k in enumerate(paths[cell.cell_type]) if k is not None and net.space.ops[k] != "none"}
    assert sorted(calls) == sorted(expected)
    calls.clear()
    net.set_active(None)  # a fresh architecture per forward
    torch.manual_seed(1)
    net(torch.randn(2, 2, 8, 8))
    first = list(calls)
    calls.clear()
    net(torch.randn(2, 2, 8, 8))
    assert first != calls
    assert not any(p.requires_grad and p.grad is not None for p in net.arch_parameters())


def test_partial_channels_match_pc_darts():
    net = _net("darts", "partial", partial_k=2)
    net.eval()
    for cell_index in (0, 1):  # a normal cell and a reduction cell
        cell = net.cells[cell_index]
        inputs = _cell_inputs(net, cell_index)
        ct = cell.cell_type
        alphas_w = F.softmax(net.alphas(ct), dim=-1)
        space = net.space
        states = [cell.preprocess0(inputs[0]), cell.preprocess1(inputs[1])]
        with torch.no_grad():
            for node in range(2, 6):
                rows = list(space.node_edges(node))
                betas = F.softmax(net.betas(ct)[rows], dim=-1)
                total = 0
                for b, e in zip(betas, rows):
                    edge, x = cell.edges[e], states[space.edges[e][1]]
                    part, rest = x[:, : x.shape[1] // 2], x[:, x.shape[1] // 2:]
                    mixed = sum(alphas_w[e, k] * edge.ops[space.ops[k]](part) for k in range(1, 8))
                    rest = rest if edge.stride == 1 else F.max_pool2d(rest, 2, 2)
                    total = total + b * channel_shuffle(torch.cat([mixed, rest], dim=1), 2)
                states.append(total)
            expected = torch.cat(states[2:], dim=1)
            got = cell(list(inputs), net.plans()[ct], fused=False)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_partial_derivation_weighs_edges_by_their_normalised_betas():
    net = _net("darts", "partial")
    with torch.no_grad():
        net.alphas_normal.zero_()
        net.alphas_normal[:, 4] = 1.0  # every edge prefers sep_conv_3x3 equally
        net.betas_normal.zero_()
        net.betas_normal[1] = 5.0  # node 2: input 1 dominates
        net.betas_normal[4] = 5.0  # node 3: input 2 dominates
    g = net.derive()
    assert g.normal[0][1] == 1 and g.normal[2][1] == 2


def test_partial_needs_channels_divisible_by_k():
    with pytest.raises(ValueError, match="k=4 cannot divide C=6 channels"):
        SearchNetwork("darts", 6, 3, 5, mixing="partial")
    with pytest.raises(ValueError, match="positive integer"):
        SearchNetwork("darts", 8, 3, 5, mixing="partial", partial_k=0)


def test_fixed_runs_the_genotype_and_derives_it():
    import random
    for space in ("darts", "nb201"):
        genotype = _net(space, "softmax").space.random_genotype(random.Random(5))
        net = _net(space, "fixed", genotype=genotype)
        assert net.derive() == genotype
        x = torch.randn(2, 2, 8, 8)
        torch.testing.assert_close(net(x), net.subnet(genotype)(x))
    with pytest.raises(ValueError, match="needs a genotype"):
        SearchNetwork("nb201", 4, 1, 5, mixing="fixed")
    with pytest.raises(ValueError, match="only taken with mixing='fixed'"):
        SearchNetwork("nb201", 4, 1, 5, genotype=genotype)


def test_rules_declare_the_properties_the_search_loop_and_meta_learner_read():
    props = {name: (MIXING.get(name).learns_alphas, MIXING.get(name).differentiable,
                    MIXING.get(name).anneals_temperature) for name in MIXING.names()}
    assert props == {"softmax": (True, True, False), "gumbel": (True, False, True), "sample": (False, False, False),
                     "partial": (True, True, False), "aux-skip": (True, True, False), "random-smoothing": (True, False, False),
                     "dirichlet": (True, False, False),
                     "fixed": (False, False, False)}
    assert set(_net("darts", "partial").architecture()) == {"alphas", "betas"}
    assert set(_net("darts", "softmax").architecture()) == {"alphas"}


@pytest.mark.parametrize("tau", [0, -1, float("inf"), float("nan"), "1", True])
def test_gumbel_temperature_must_be_a_positive_finite_number(tau):
    # tau=0 used to hang forever in hard_sample's retry loop.
    with pytest.raises(ValueError, match=r"gumbel temperature tau must be a positive finite number"):
        SearchNetwork("darts", C=4, layers=2, num_classes=10, mixing="gumbel", tau=tau)
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, mixing="gumbel")
    with pytest.raises(ValueError, match=r"gumbel temperature tau must be a positive finite number"):
        net.mixing.tau = tau
    assert net.mixing.tau == 10.0


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_gumbel_names_non_finite_alphas_instead_of_looping(bad):
    net = SearchNetwork("darts", C=4, layers=2, num_classes=10, mixing="gumbel")
    with torch.no_grad():
        net.alphas_reduce[3, 2] = bad
    with pytest.raises(ValueError, match="non-finite alphas_reduce"):
        net(torch.randn(2, 3, 8, 8))


def test_gumbel_with_a_temperature_too_small_for_floats_is_named():
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, mixing="gumbel", tau=1e-300)
    with torch.no_grad():
        net.alphas_cell.normal_()
    with pytest.raises(ValueError, match="tau=1e-300 gives non-finite probabilities for alphas_cell"):
        net(torch.randn(2, 3, 8, 8))


def test_gumbel_draws_stay_finite_when_the_exponential_draw_is_zero(monkeypatch):
    # An exponential draw of exactly 0 gives an infinite Gumbel; it is clamped, not retried.
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self: self.zero_())
    hard, index = MIXING.get("gumbel")(tau=1.0).hard_sample(torch.randn(6, 5))
    assert torch.isfinite(hard).all() and torch.equal(hard, F.one_hot(index, 5).float())


def test_channel_shuffle_interleaves_the_groups():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0.0, 3.0, 1.0, 4.0, 2.0, 5.0]
    assert channel_shuffle(x, 3).flatten().tolist() == [0.0, 2.0, 4.0, 1.0, 3.0, 5.0]
