"""Perturbation-based selection (DARTS-PT): projected edges, a left-out candidate, the selection rule, its
schedule, and the tuning epochs of a search (optimizer, schedules, resume, run folder, command line)."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from test_search import TINY, assert_same_end, whole_and_resumed

import supernet
from supernet import cli, data, selection
from supernet.mixing import AuxSkip, Dirichlet, RandomSmoothing, Softmax, _dense_plan
from supernet.search_config import SearchConfig
from supernet.search_loop import Searcher
from supernet.search_network import SearchNetwork, preserved_batchnorm
from supernet.spaces import get_space

PT = dict(method="darts", space="nb201", C=4, layers=1, epochs=2, batch_size=16, steps_per_epoch=2,
          max_train=TINY["max_train"], retrain_epochs=0, selection="perturbation", projection_interval=1)
MIXINGS = {"softmax": Softmax, "aux-skip": lambda: AuxSkip(0.5), "random-smoothing": RandomSmoothing,
           "dirichlet": Dirichlet}


@pytest.fixture(scope="module")
def split():
    return data.load_split("digits", seed=0, max_train=TINY["max_train"])


def _network(mixing) -> SearchNetwork:
    torch.manual_seed(0)
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1, mixing=MIXINGS[mixing]()).double()
    with torch.no_grad():
        net.alphas("cell").normal_()
    return net


def _forward(net, x: torch.Tensor, plans=None) -> torch.Tensor:
    with torch.no_grad(), preserved_batchnorm(net):
        return net(x) if plans is None else net.forward_plans(x, plans)


@pytest.mark.parametrize("mixing", list(MIXINGS))
def test_a_fully_projected_supernet_is_the_projected_cell(mixing):
    net = _network(mixing)
    genotype = net.space.random_genotype(random.Random(3))
    for e, k in enumerate(net.space.to_paths(genotype)["cell"]):
        net.project_edge("cell", e, k)
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    assert net.derive() == genotype
    torch.testing.assert_close(_forward(net, x), _forward(net.subnet(genotype), x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("mixing", list(MIXINGS))
def test_projected_edges_and_a_left_out_candidate_reweight_the_mixture(mixing):
    """Projected rows become one-hot (the auxiliary skip of DARTS- included), the left-out candidate's weight
    0, every other weight stays what the rule gives (not renormalised), as DARTS-PT's masks do."""
    net = _network(mixing)
    x = torch.randn(16, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        weights = net.mixing.plan(net.space, net.architecture())
    rule_weights = _dense_weights(net, weights["cell"])
    net.project_edge("cell", 1, net.space.ops.index("nor_conv_3x3"))
    net.project_edge("cell", 4, net.space.ops.index("none"))
    expected = rule_weights.clone()
    expected[1] = F.one_hot(torch.tensor(3), 5)
    expected[4] = F.one_hot(torch.tensor(0), 5)
    expected[2, net.space.ops.index("skip_connect")] = 0.0
    with net.without_candidate("cell", 2, net.space.ops.index("skip_connect")):
        ours = _forward(net, x)
    reference = _forward(net, x, {"cell": _dense_plan(net.space, expected)})
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert not torch.allclose(ours, _forward(net, x))  # and the candidate is back outside the block


def _dense_weights(net: SearchNetwork, plan) -> torch.Tensor:
    """The (edges, ops) weights of a dense plan (`none` at 0)."""
    out = torch.zeros(net.space.num_edges, len(net.space.ops), dtype=torch.float64)
    for node in plan:
        for (e, k), w in zip(node.pairs, node.weights, strict=True):
            out[e, k] = w
    return out


def test_projected_edges_pass_no_gradient_to_their_alphas():
    net = _network("softmax")
    net.project_edge("cell", 0, 2)
    net(torch.randn(8, 1, 8, 8, dtype=torch.float64)).logsumexp(1).sum().backward()
    grad = net.alphas("cell").grad
    assert torch.all(grad[0] == 0) and torch.all(grad[1:].abs().sum(dim=1) > 0)


def test_projections_are_state_and_load_back():
    net = _network("softmax")
    net.project_edge("cell", 5, 1)
    net.drop_edge("cell", 2)
    fresh = _network("softmax")
    fresh.load_state_dict(net.state_dict())
    assert fresh.projected_edges() == {"cell": {5: 1}} and fresh.dropped_edges() == {"cell": {2}}
    assert fresh.derive() == net.derive()


@pytest.mark.parametrize("call, message", [
    (lambda net: net.project_edge("cell", 6, 0), "edge 6 out of range: the nb201 cell has 6 edges"),
    (lambda net: net.project_edge("cell", 0, 5), "op 5 out of range: an edge has 5 candidates"),
    (lambda net: net.project_edge("normal", 0, 1), "unknown cell type 'normal'"),
    (lambda net: (net.project_edge("cell", 0, 1), net.project_edge("cell", 0, 2)), "edge 0 of the cell cell is "
                                                                                   "projected already"),
    (lambda net: (net.drop_edge("cell", 0), net.drop_edge("cell", 0)), "edge 0 of the cell cell is dropped already"),
    (lambda net: (net.drop_edge("cell", 0), net.project_edge("cell", 0, 1)), "is dropped already"),
])
def test_bad_projections_are_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call(_network("softmax"))


def test_projection_needs_a_weighted_supernet():
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1, mixing="gumbel")
    with pytest.raises(ValueError, match="projecting edges needs softmax-weighted or dirichlet mixing"):
        net.project_edge("cell", 0, 1)


def test_projections_per_cell_type_are_its_edges_then_its_nodes_where_nodes_choose_inputs():
    assert selection.projection_events(get_space("nb201")) == 6
    assert selection.projection_events(get_space("darts")) == 14 + 4
    assert [get_space("darts").ops[k] for k in selection.op_candidates(get_space("darts"))] == \
        [op for op in get_space("darts").ops if op != "none"]  # a DARTS genotype never holds `none`
    assert selection.op_candidates(get_space("nb201")) == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("interval", [1, 2, 5])
def test_the_schedule_projects_every_edge_by_the_last_tuning_epoch(interval):
    epochs = selection.tuning_epochs(6, interval)
    assert epochs == interval * 5
    due = [selection.projections_due(t, 6, interval) for t in range(epochs)]
    # DARTS-PT's loop: a projection where epoch % proj_intv == 0 or at the last epoch; at interval 1 both
    # rules meet at the last epoch, which then projects the last two edges
    darts_pt = [sum(1 for s in range(t + 1) if s % interval == 0 or s == epochs - 1) for t in range(epochs)]
    assert due == (darts_pt if interval > 1 else [1, 2, 3, 4, 6])
    assert due[-1] == 6


# What a removal costs, recomputed from the scores: the sort key whose smallest value costs the most.
COSTLIEST_FIRST = {"accuracy": lambda s: (s["accuracy"], -s["loss"]), "loss": lambda s: (-s["loss"], s["accuracy"])}


@pytest.mark.parametrize("criterion", list(selection.CRITERIA))
def test_selection_removes_the_candidate_whose_loss_costs_the_most(criterion, split):
    net = _network("softmax").float()
    pair = split.val
    n = len(pair[1])
    assert n > 32  # several batches
    before = {k: v.clone() for k, v in net.state_dict().items()}
    chosen, scores = selection.select_operation(net, "cell", 2, pair, 32, torch.device("cpu"), criterion=criterion)
    for k, name in enumerate(net.space.ops):  # each score: the supernet with that weight zeroed, batch by batch
        w = _dense_weights(net, net.mixing.plan(net.space, net.architecture())["cell"]).float()
        w[2, k] = 0.0
        correct, loss = 0, 0.0
        for i in range(0, 96, 32):
            logits = _forward(net, pair[0][i:i + 32], {"cell": _dense_plan(net.space, w)})
            correct += int((logits.argmax(1) == pair[1][i:i + 32]).sum())
            loss += float(F.cross_entropy(logits, pair[1][i:i + 32], reduction="sum"))
        assert scores[k]["op"] == name and scores[k]["accuracy"] == correct / n
        assert scores[k]["loss"] == pytest.approx(loss / n, rel=1e-5)
    assert chosen == min(range(5), key=lambda k: (*COSTLIEST_FIRST[criterion](scores[k]), k))
    # leaving `none` out changes nothing: its scores are the whole supernet's
    assert (scores[0]["accuracy"], scores[0]["loss"]) == selection.supernet_scores(net, pair, 32, torch.device("cpu"))
    for k, v in net.state_dict().items():  # batch-norm statistics and all else untouched
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("method", ["darts", "darts-minus", "drnas", "sdarts"])
def test_a_search_with_perturbation_selection_projects_every_edge_while_tuning(method, split):
    config = SearchConfig(**dict(PT, method=method))
    seen = []  # per step: (epoch, weight learning rate, alphas)
    searcher = Searcher(config, split, callback=lambda s: seen.append(
        (s.epoch, s.w_opt.param_groups[0]["lr"], s.net.alphas("cell").detach().clone())))
    genotype = searcher.run()
    assert config.total_epochs == 2 + 5
    records = searcher.history["epochs"]
    assert [r["projected_edges"] for r in records] == [0, 0, 1, 2, 3, 4, 6]
    projections = searcher.history["projections"]
    assert sorted(p["edge"] for p in projections) == list(range(6))
    path = searcher.net.space.to_paths(genotype)["cell"]
    for p in projections:  # each edge took the candidate whose removal cost the most, and the genotype has it
        best = min(p["scores"], key=lambda s: (s["accuracy"], -s["loss"]))
        assert p["op"] == best["op"] == searcher.net.space.ops[path[p["edge"]]]
    assert genotype == searcher.net.derive()
    (tuning_lr,) = {lr for epoch, lr, _ in seen if epoch >= 2}
    assert tuning_lr == pytest.approx(config.w_lr / 10)
    # the alphas of open edges still move while tuning; the schedules stay where the search leaves them:
    # DARTS-'s auxiliary skip gone, SDARTS-RS's noise bound at its full value
    first_tuning = [a for epoch, _, a in seen if epoch == 2]
    assert not torch.equal(first_tuning[0], first_tuning[-1])
    for key, value in (("aux_skip", 0.0), ("sdarts_epsilon", config.sdarts_epsilon)):
        if key in records[1]:
            assert 0 < records[1][key] != value
            assert all(r[key] == pytest.approx(value) for r in records[2:])


@pytest.mark.parametrize("interrupt_after, checkpoint_every, position", [
    (5, 0, (2, 0)),  # the search's end: tuning not started, nothing projected
    (6, 1, (2, 1)),  # inside the first tuning epoch, one edge projected
    (13, 1, (6, 1)),  # inside the last tuning epoch, every edge projected
])
def test_perturbation_selection_resumes_bit_identically(interrupt_after, checkpoint_every, position, split, tmp_path):
    config = SearchConfig(**dict(PT, checkpoint_every=checkpoint_every))
    whole, resumed = whole_and_resumed(config, split, tmp_path, interrupt_after)
    assert (resumed.epoch, resumed.step) == position
    resumed.run()
    assert_same_end(resumed, whole)


@pytest.mark.parametrize("options, message", [
    (dict(method="gdas"), "selection='perturbation' masks candidates of a weighted supernet; it works with "
                          r"\['darts', 'darts-2nd', 'drnas', 'beta-darts', 'darts-minus', 'sdarts'\], not 'gdas'"),
    (dict(method="spos"), "not 'spos'"),
    (dict(method="drnas", drnas_progressive=True), "cannot follow drnas_progressive"),
    (dict(projection_interval=0), "projection_interval must be a positive integer"),
    (dict(selection="pt"), r"unknown selection 'pt'; expected one of \['argmax', 'perturbation'\]"),
    (dict(projection_criterion="ppl"), r"unknown projection_criterion 'ppl'; expected one of \['accuracy', 'loss'\]"),
])
def test_perturbation_selection_refuses_what_it_does_not_apply_to(options, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**dict(PT, **options))


def test_the_search_projects_by_its_criterion(split):
    choices = {}
    for criterion in selection.CRITERIA:
        searcher = Searcher(SearchConfig(**dict(PT, projection_criterion=criterion)), split)
        searcher.run()
        projections = searcher.history["projections"]
        for p in projections:
            assert p["op"] == min(p["scores"], key=COSTLIEST_FIRST[criterion])["op"]
        choices[criterion] = [p["op"] for p in projections]
    assert choices["accuracy"] != choices["loss"]  # on this seed the two criteria pick differently


def test_perturbation_selection_on_the_command_line_and_its_run_folder(tmp_path):
    args = ["search", "--out", str(tmp_path), "--space", "nb201", "--C", "4", "--layers", "1", "--epochs", "1",
            "--batch-size", "16", "--steps-per-epoch", "1", "--max-train", "64", "--retrain-epochs", "0",
            "--threads", "1", "--quiet", "--selection", "perturbation", "--projection-interval", "1",
            "--projection-criterion", "loss"]
    assert cli.main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["selection"] == "perturbation" and len(results["history"]) == 1 + 5
    assert results["config"]["projection_criterion"] == "loss"
    assert "(validation loss without each candidate: " in (run_dir / "log.txt").read_text()  # what it compared
    run = supernet.search_run.load_run(run_dir)
    assert run.network.projected_edges()["cell"] == {p["edge"]: run.network.space.ops.index(p["op"])
                                                     for p in results["projections"]}
    assert run.network.derive() == run.genotype


# --- the DARTS space: op projection without `none`, then each node's two inputs --------------------------------
def _darts_network() -> SearchNetwork:
    torch.manual_seed(0)
    net = SearchNetwork("darts", C=4, layers=2, num_classes=10, in_channels=1).double()
    with torch.no_grad():
        for ct in net.space.cell_types:
            net.alphas(ct).normal_()
    return net


def test_a_projected_darts_supernet_whose_nodes_dropped_inputs_is_the_derived_cell():
    net = _darts_network()
    genotype = net.space.random_genotype(random.Random(5))
    paths = net.space.to_paths(genotype)
    rng = random.Random(0)
    for ct in net.space.cell_types:
        for e, k in enumerate(paths[ct]):  # chosen edges take the genotype's op, the others any op, then go
            net.project_edge(ct, e, k if k is not None else rng.choice(selection.op_candidates(net.space)))
        for e, k in enumerate(paths[ct]):
            if k is None:
                net.drop_edge(ct, e)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    assert net.derive() == genotype
    torch.testing.assert_close(_forward(net, x), _forward(net.subnet(genotype), x), rtol=1e-10, atol=1e-10)


def test_leaving_a_whole_edge_out_zeroes_its_row_and_dropped_edges_stay_out():
    net = _darts_network()
    net.drop_edge("normal", 3)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        plans = net.mixing.plan(net.space, net.architecture())
    weights = {ct: _dense_weights(net, plan) for ct, plan in plans.items()}
    weights["normal"][3] = 0.0
    weights["reduce"][6] = 0.0
    with net.without_candidate("reduce", 6, None):
        ours = _forward(net, x)
    reference = _forward(net, x, {ct: _dense_plan(net.space, w) for ct, w in weights.items()})
    torch.testing.assert_close(ours, reference, rtol=1e-10, atol=1e-10)
    assert torch.all(net.edge_strengths()["normal"][3] == 0)


@pytest.mark.parametrize("criterion", list(selection.CRITERIA))
def test_a_node_drops_the_inputs_whose_removal_costs_least_until_two_are_left(criterion, split):
    net = _darts_network().float()
    node = 5  # inputs 0..4: edges 9..13
    dropped, rounds = selection.select_inputs(net, "normal", node, split.val, 32, torch.device("cpu"),
                                              criterion=criterion)
    assert [len(r) for r in rounds] == [5, 4, 3] and len(dropped) == 3
    left = list(net.space.node_edges(node))
    for scores, edge in zip(rounds, dropped, strict=True):
        assert [s["edge"] for s in scores] == left
        cheapest = max(scores, key=COSTLIEST_FIRST[criterion])
        assert edge == cheapest["edge"]
        left.remove(edge)
    assert net.dropped_edges() == {}  # select_inputs only chooses; the searcher drops


def test_a_darts_space_search_projects_every_op_then_every_node(split):
    config = SearchConfig(**dict(PT, space="darts", layers=2, max_train=64, epochs=1, steps_per_epoch=1))
    searcher = Searcher(config, split)
    genotype = searcher.run()
    space = searcher.net.space
    assert config.total_epochs == 1 + 17
    projections = searcher.history["projections"]
    for ct in space.cell_types:
        ops = [p for p in projections if p["cell_type"] == ct and "edge" in p]
        nodes = [p for p in projections if p["cell_type"] == ct and "node" in p]
        assert sorted(p["edge"] for p in ops) == list(range(14)) and all(p["op"] != "none" for p in ops)
        assert sorted(p["node"] for p in nodes) == list(space.intermediate_nodes)
        assert len(searcher.net.dropped_edges()[ct]) == 14 - 2 * 4
        paths = space.to_paths(genotype)[ct]
        for p in ops:  # a kept edge runs the op its projection chose
            dropped = p["edge"] in searcher.net.dropped_edges()[ct]
            assert (paths[p["edge"]] is None) == dropped
            assert dropped or space.ops[paths[p["edge"]]] == p["op"]
    assert genotype == searcher.net.derive()
