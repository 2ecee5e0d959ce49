"""Strategies: the ask/tell protocol, finding known optima, evolution vs random, the Q-learning update,
exact resumption, and clear errors."""

import itertools
import math
import random
import statistics

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from strategies import STRATEGIES, DecisionSpace, Evaluation, QLearning, list_strategies, make_strategy, restore, search
from supernet import get_space
from supernet.spaces import DartsSpace, NB201Space

ALL = ["random", "evolution", "reinforce", "qlearning", "bananas"]


class TinyCell(NB201Space):
    """NAS-Bench-201's cell shrunk to 2 nodes (3 edges) and 3 ops: 27 architectures."""

    name = "tinycell"
    ops = ("none", "skip_connect", "nor_conv_3x3")
    num_nodes = 2


class TinyDarts(DartsSpace):
    """A DARTS cell with 2 nodes and 2 real ops: nodes pick 2 inputs, so input edges are searched too."""

    name = "tinydarts"
    ops = ("none", "skip_connect", "sep_conv_3x3")
    num_nodes = 2


def additive_benchmark(space, seed):
    """Reward = sum over edges of a random score per (edge, op)."""
    rng = random.Random(seed)
    scores = [[rng.random() for _ in space.ops] for _ in space.edges]

    def reward(genotype):
        path = space.to_paths(genotype)["cell"]
        return sum(scores[e][k] for e, k in enumerate(path))

    return reward


def all_paths(space):
    """Every architecture of an all-inputs cell space, enumerated independently of the strategies."""
    return [space.from_paths({"cell": p}) for p in itertools.product(range(len(space.ops)), repeat=space.num_edges)]


def run(name, space, budget, seed, reward, **options):
    return search(make_strategy(name, space, budget, seed, **options), lambda g: Evaluation(reward(g), {}))


def test_registry_lists_every_strategy():
    assert set(list_strategies()) == set(ALL)


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("seed", [0, 1])
def test_every_strategy_finds_the_optimum_of_a_small_additive_benchmark(name, seed):
    space = TinyCell()
    reward = additive_benchmark(space, seed=1)
    optimum = max(reward(g) for g in all_paths(space))
    strategy = run(name, space, 80, seed, reward)
    assert strategy.best().reward == pytest.approx(optimum, abs=1e-12)
    assert len(strategy.history) == 80


def darts_target_benchmark():
    space = TinyDarts()  # 2,304 architectures
    target = space.random_genotype(random.Random(7))

    def reward(g):  # (op, input) pairs equal to the target's, slot by slot: only the target scores 6
        return (sum(a == b for a, b in zip(g.normal, target.normal))
                + 0.5 * sum(a == b for a, b in zip(g.reduce, target.reduce)))

    return space, target, reward


@pytest.mark.parametrize("name, seed", [("evolution", 0), ("evolution", 1), ("reinforce", 0)])
def test_evolution_and_reinforce_find_a_known_darts_cell_with_input_edges(name, seed):
    space, target, reward = darts_target_benchmark()
    strategy = run(name, space, 200, seed, reward)
    assert strategy.best().arch == space.format(target)


@pytest.mark.parametrize("seed", range(4))
def test_qlearning_finds_a_known_darts_cell_by_editing_ops_and_input_edges(seed):
    space, target, reward = darts_target_benchmark()
    strategy = run("qlearning", space, 300, seed, reward)
    assert strategy.best().arch == space.format(target)
    archs = [t.arch for t in strategy.history]
    assert len(set(archs)) == len(archs)  # an edit back to an evaluated cell reuses its stored reward


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**31), space_name=st.sampled_from(["darts", "nb201"]))
def test_qlearning_edits_change_one_op_or_move_one_input_edge(seed, space_name):
    q = QLearning(space_name, budget=5)
    space = q.space
    state = q.state_of(space.random_genotype(random.Random(seed)))
    edits = q.actions(state)
    for edit in edits:
        after = q.apply(state, edit)
        assert q.state_of(q.genotype_of(after)) == after  # a valid architecture of the space
        changed = [(i, e) for i, (old, new) in enumerate(zip(state, after)) for e in range(space.num_edges)
                   if old[e] != new[e]]
        node_of = {space.edges[e][0] for _, e in changed}
        assert len(node_of) == 1 and len({i for i, _ in changed}) == 1  # one node of one cell
        if len(changed) == 2:  # an input edge moved: its op goes along, onto a free input of the node
            (i, e), (_, f) = changed
            old, new = state[i], after[i]
            assert {old[e], new[e]} - {None} == {old[f], new[f]} - {None}
            assert (old[e] is None) != (old[f] is None)
        else:
            assert len(changed) == 1
    none = space.ops.index("none")
    if space_name == "nb201":  # every edge to every other op: `none` removes an edge, and adds one back
        assert len(edits) == space.num_edges * (len(space.ops) - 1)
        removed = q.apply(state, next(a for a in edits if a.op == none))
        assert any(q.apply(removed, a) == state for a in q.actions(removed))
    else:  # picked edges: another real op, or another input of the node
        assert all(a.op != none for a in edits)
        assert len(edits) == len(space.cell_types) * sum(
            (len(space.ops) - 2) + (node - 2) for node in range(2, 2 + space.num_nodes) for _ in range(2))


def test_regularized_evolution_beats_random_search_on_a_structured_benchmark():
    space = get_space("nb201")
    target = space.to_paths(space.random_genotype(random.Random(3)))["cell"]

    def reward(g):  # edges that agree with a hidden cell: a smooth landscape mutations can climb
        return float(sum(a == b for a, b in zip(space.to_paths(g)["cell"], target)))

    seeds = range(12)
    evolution = [run("evolution", space, 100, s, reward).best().reward for s in seeds]
    random_search = [run("random", space, 100, s, reward).best().reward for s in seeds]
    assert statistics.mean(evolution) > statistics.mean(random_search)


def test_qlearning_update_matches_the_formula_on_a_hand_computed_example():
    q = QLearning("nb201", budget=5, alpha=0.5, gamma=0.9)
    s, s_next = (2, 1), (3, 4)
    q.q[(s, 3)] = 1.0
    q.q[(s_next, 0)] = 2.0
    q.q[(s_next, 1)] = 5.0
    q.q[(s_next, 2)] = 7.0  # not allowed in s_next: must not enter the max
    # 1 + 0.5 * (0.25 + 0.9 * max(2, 5) - 1) = 2.875
    assert q.update(s, 3, 0.25, s_next, (0, 1)) == pytest.approx(2.875)
    assert q.q[(s, 3)] == pytest.approx(2.875)
    # Terminal: no future term. 2.875 + 0.5 * (4 - 2.875) = 3.4375
    assert q.update(s, 3, 4.0, None, ()) == pytest.approx(3.4375)
    # An unseen pair starts from q_init.
    fresh = QLearning("nb201", budget=5, alpha=0.25, gamma=1.0, q_init=2.0)
    assert fresh.update((0, None), 1, 10.0, None, ()) == pytest.approx(2.0 + 0.25 * 8.0)


def test_qlearning_explores_less_as_the_budget_is_spent():
    q = QLearning("nb201", budget=10, epsilon_start=1.0, epsilon_end=0.1, explore_fraction=0.5)
    reward = additive_benchmark(get_space("nb201"), 0)
    epsilons = []
    for _ in range(10):
        epsilons.append(q.epsilon())
        g = q.ask()
        q.tell(g, reward(g))
    assert epsilons[0] == 1.0 and epsilons[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(epsilons, epsilons[1:]))


@pytest.mark.parametrize("name", ALL)
def test_a_resumed_search_equals_an_uninterrupted_one(name, tmp_path):
    space = get_space("nb201")
    reward = additive_benchmark(space, 5)
    full = run(name, space, 30, 11, reward)

    checkpoint = tmp_path / f"{name}.json"
    evaluate = lambda g: Evaluation(reward(g), {"size": 1.0})  # noqa: E731
    search(make_strategy(name, space, 30, 11), evaluate, checkpoint, checkpoint_every=4, max_evaluations=13)
    resumed = restore(checkpoint)
    assert len(resumed.history) == 13
    search(resumed, evaluate)
    assert [t.arch for t in resumed.history] == [t.arch for t in full.history]
    assert [t.reward for t in resumed.history] == [t.reward for t in full.history]
    assert resumed.history[0].metrics == {"size": 1.0}


@pytest.mark.parametrize("name", ALL)
def test_same_seed_same_search_and_different_seeds_differ(name):
    reward = additive_benchmark(get_space("nb201"), 2)
    a, b, c = (run(name, "nb201", 15, seed, reward) for seed in (4, 4, 5))
    assert [t.arch for t in a.history] == [t.arch for t in b.history]
    assert [t.arch for t in a.history] != [t.arch for t in c.history]


@pytest.mark.parametrize("name", ALL)
def test_strategies_propose_valid_genotypes_of_the_full_darts_space(name):
    space = get_space("darts")
    strategy = make_strategy(name, space, 6, 0)
    for _ in range(6):
        g = strategy.ask()
        assert space.validate(g) == g
        assert all(op != "none" for op, _ in g.normal + g.reduce)
        strategy.tell(g, float(sum(op == "sep_conv_3x3" for op, _ in g.normal)))
    assert strategy.done


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**31), space_name=st.sampled_from(["darts", "nb201"]))
def test_decisions_round_trip_and_respect_their_valid_sets(seed, space_name):
    decisions = DecisionSpace(space_name)
    genotype = decisions.space.random_genotype(random.Random(seed))
    choices = decisions.encode(genotype)
    assert decisions.decode(choices) == genotype
    for t, c in enumerate(choices):
        assert c in decisions.valid(choices[:t])


def test_all_genotypes_lists_every_cell_of_a_small_space_once_and_refuses_a_large_one():
    tiny = TinyCell()
    assert sorted(map(tiny.format, DecisionSpace(tiny).all_genotypes(27))) == sorted(map(tiny.format, all_paths(tiny)))
    darts = DecisionSpace(TinyDarts()).all_genotypes(5000)
    per_cell = 1 * 2 ** 2 * 3 * 2 ** 2  # node 2: inputs {0, 1}; node 3: 3 input pairs; 2 real ops per input
    assert len({TinyDarts().format(g) for g in darts}) == len(darts) == per_cell ** 2
    assert DecisionSpace(tiny).all_genotypes(26) is None  # one more cell than the limit
    assert DecisionSpace("darts").all_genotypes(20_000) is None
    with pytest.raises(ValueError, match="limit must be an integer >= 0"):
        DecisionSpace(tiny).all_genotypes(-1)


def test_reinforce_raises_the_probability_of_a_rewarded_architecture():
    strategy = make_strategy("reinforce", TinyCell(), 60, 0, lr=0.05)
    good = TinyCell().from_paths({"cell": [2, 2, 2]})
    choices = strategy.decisions.encode(good)
    before = strategy.probabilities(choices)
    search(strategy, lambda g: Evaluation(1.0 if g == good else 0.0, {}))
    assert strategy.probabilities(choices) > before


def test_evolution_keeps_only_the_latest_population():
    strategy = run("evolution", "nb201", 25, 0, additive_benchmark(get_space("nb201"), 0), population=5, sample_size=2)
    assert [get_space("nb201").format(g) for g, _ in strategy.population] == [t.arch for t in strategy.history[-5:]]


# --- bad input -------------------------------------------------------------------------------------
@pytest.mark.parametrize("budget", [0, -3, 2.5, True])
def test_a_budget_that_is_not_a_positive_integer_is_a_clear_error(budget):
    with pytest.raises(ValueError, match="budget must be a positive integer"):
        make_strategy("random", "nb201", budget)


def test_unknown_strategy_and_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="unknown strategy 'annealing'"):
        make_strategy("annealing", "nb201", 10)
    with pytest.raises(ValueError, match="bad options for strategy 'random'"):
        make_strategy("random", "nb201", 10, population=3)
    with pytest.raises(ValueError, match="sample_size must be an integer in"):
        make_strategy("evolution", "nb201", 10, population=3, sample_size=4)
    with pytest.raises(ValueError, match="alpha must be a non-negative finite number at most 1.0"):
        make_strategy("qlearning", "nb201", 10, alpha=1.5)


@pytest.mark.parametrize("name, options, message", [
    ("reinforce", {"lr": math.inf}, "lr must be a positive finite number"),
    ("reinforce", {"lr": 0}, "lr must be a positive finite number"),
    ("reinforce", {"baseline_decay": math.nan}, "baseline_decay must be a number in"),
    ("reinforce", {"entropy_weight": -1e-3}, "entropy_weight must be a non-negative finite number"),
    ("reinforce", {"hidden": 0}, "hidden must be a positive integer"),
    ("qlearning", {"gamma": math.nan}, "gamma must be a non-negative finite number at most 1.0"),
    ("qlearning", {"q_init": math.inf}, "q_init must be a finite number"),
    ("qlearning", {"replay": True}, "replay must be a positive integer"),
    ("evolution", {"population": 2.5}, "population must be a positive integer"),
])
def test_non_finite_or_out_of_range_strategy_options_are_clear_errors(name, options, message):
    with pytest.raises(ValueError, match=message):
        make_strategy(name, "nb201", 10, **options)


def test_a_type_error_inside_a_strategy_constructor_is_not_reported_as_bad_options(monkeypatch):
    # Known option names pass the signature check; the bug inside the constructor surfaces as itself.
    class Broken(STRATEGIES.get("random")):
        name = "broken-test"

        def __init__(self, space, budget, seed=0, width=1):
            super().__init__(space, budget, seed)
            len(width)  # a TypeError from inside the constructor

    monkeypatch.setitem(STRATEGIES._items, "broken-test", Broken)
    with pytest.raises(TypeError, match="has no len"):
        make_strategy("broken-test", "nb201", 10, width=3)
    with pytest.raises(ValueError, match="bad options for strategy 'broken-test'.*depth"):
        make_strategy("broken-test", "nb201", 10, depth=3)


def test_protocol_misuse_is_a_clear_error():
    space = get_space("nb201")
    strategy = make_strategy("random", space, 1, 0)
    with pytest.raises(ValueError, match="without a pending ask"):
        strategy.tell(space.random_genotype(random.Random(0)), 1.0)
    g = strategy.ask()
    with pytest.raises(ValueError, match="before asking again"):
        strategy.ask()
    with pytest.raises(ValueError, match="reward must be a finite number"):
        strategy.tell(g, float("nan"))
    other = space.mutate(g, random.Random(0))
    with pytest.raises(ValueError, match="expected the pending"):
        strategy.tell(other, 1.0)
    strategy.tell(g, 1.0)
    with pytest.raises(ValueError, match="budget of 1 evaluations is spent"):
        strategy.ask()


def test_a_checkpoint_from_another_seed_or_space_is_rejected(tmp_path):
    reward = additive_benchmark(get_space("nb201"), 0)
    path = tmp_path / "evolution.json"
    run("evolution", "nb201", 12, 0, reward).save(path)
    state = __import__("json").loads(path.read_text())
    state["seed"] = 1
    with pytest.raises(ValueError, match="checkpoint does not match evolution with seed 1"):
        restore(state)
    with pytest.raises(ValueError, match="written for space 'nb201', not 'darts'"):
        restore(path, space="darts")
    with pytest.raises(ValueError, match="below the 12 evaluations"):
        restore(path, budget=5)
    with pytest.raises(ValueError, match="does not exist"):
        restore(tmp_path / "missing.json")


# --- zero-cost warm start (random, evolution, bananas; `supernet sample --warm-start`) ---------------
WARM = {"warm_start": "params", "warm_pool": 6, "proxy_options": {"C": 4, "layers": 1}}


def params_ranked_pool(seed, pool=6):
    """The warm start's pool for `seed`, redrawn independently, largest cell (by parameters) first."""
    from supernet.proxies import score

    space, rng, cells = get_space("nb201"), random.Random(seed), []
    while len(cells) < pool:
        g = space.random_genotype(rng)
        if space.format(g) not in {space.format(c) for c in cells}:
            cells.append(g)
    scores = [score("params", g, space, input_shape=(1, 8, 8), C=4, layers=1) for g in cells]
    return [space.format(cells[i]) for i in sorted(range(pool), key=lambda i: (-scores[i], i))]


@pytest.mark.parametrize("name, first", [("random", 6), ("evolution", 3)])
def test_warm_start_evaluates_the_proxys_best_of_the_pool_first_and_resumes(name, first):
    options = {**WARM, "population": 3} if name == "evolution" else WARM
    reward = additive_benchmark(get_space("nb201"), 0)
    strategy = run(name, "nb201", 10, 7, reward, **options)
    assert [t.arch for t in strategy.history[:first]] == params_ranked_pool(7)[:first]
    assert strategy.warm.seconds > 0 and len(strategy.history) == 10  # the proxy costs no evaluation
    assert [t.arch for t in restore(strategy.state()).history] == [t.arch for t in strategy.history]


def test_warm_start_with_an_unknown_proxy_or_a_bad_pool_is_a_clear_error():
    for name in ("random", "evolution", "bananas"):
        with pytest.raises(ValueError, match="unknown zero-cost proxy 'nope'"):
            make_strategy(name, "nb201", 10, warm_start="nope")
    with pytest.raises(ValueError, match="warm_pool must be a positive integer"):
        make_strategy("random", "nb201", 10, warm_start="params", warm_pool=0)


def test_sample_command_warm_start_reports_the_proxy_seconds_and_checks_its_strategies(tmp_path, capsys):
    import json

    from supernet.cli import main as cli_main

    out = tmp_path / "s"
    args = ["sample", "--benchmark", "nb201", "--budget", "4", "--warm-start", "params", "--warm-pool", "5",
            "--out", str(out)]
    assert cli_main(args + ["--strategy", "random", "evolution"]) == 0
    assert "random: zero-cost warm start (params, pool of 5)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["warm_start"]) == {"random", "evolution"}
    assert all(w["seconds"] > 0 and w["proxy"] == "params" for w in summary["warm_start"].values())
    history = json.loads((out / "random.json").read_text())["history"]
    assert len(history) == 4  # proxy scores are not evaluations
    assert cli_main(["sample", "--benchmark", "nb201", "--budget", "6", "--strategy", "random", "--resume",
                     "--out", str(out), "--warm-start", "synflow"]) == 2
    assert "searched with warm_start='params', not 'synflow'" in capsys.readouterr().err
    assert cli_main(args[:-2] + ["--strategy", "random", "reinforce", "--out", str(tmp_path / "r")]) == 2
    assert "--warm-start applies to" in capsys.readouterr().err and not (tmp_path / "r").exists()
