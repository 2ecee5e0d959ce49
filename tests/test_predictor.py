"""The predictor-guided strategy (BANANAS): seeded, resumable, never repeats a cell, beats random search."""

import itertools
import random
import statistics

import numpy as np
import pytest

import strategies.predictor
from strategies import DecisionSpace, Evaluation, make_strategy, restore, search
from strategies.predictor import MLPEnsemble, PathEncoder
from supernet import get_space
from tests.test_strategies import TinyCell, params_ranked_pool

FAST = {"initial": 8, "batch": 4, "local_search": 2, "epochs": 60, "refit_epochs": 10, "members": 3,
        "random_candidates": 100}


def interaction_benchmark(space, seed):
    """Reward = per-(edge, op) scores plus pairwise interactions between edges: structured, not additive."""
    rng = random.Random(seed)
    unary = [[rng.gauss(0, 1) for _ in space.ops] for _ in space.edges]
    pair = {(a, b): [[rng.gauss(0, 0.5) for _ in space.ops] for _ in space.ops]
            for a, b in itertools.combinations(range(space.num_edges), 2)}

    def value(path):
        return (sum(unary[e][k] for e, k in enumerate(path))
                + sum(pair[a, b][path[a]][path[b]] for a, b in pair))

    def reward(genotype):
        return value(space.to_paths(genotype)["cell"])

    reward.optimum = max(value(p) for p in itertools.product(range(len(space.ops)), repeat=space.num_edges))
    return reward


def run(name, space, budget, seed, reward, **options):
    return search(make_strategy(name, space, budget, seed, **options), lambda g: Evaluation(reward(g), {}))


def test_path_encoding_of_nb201_counts_routes_without_none():
    enc = PathEncoder(get_space("nb201"))
    assert enc.onehot_size == 6 * 5
    assert enc.path_size == 4 + 16 + 16 + 64  # routes 0-3, 0-1-3, 0-2-3, 0-1-2-3 over the 4 real ops
    x = enc("|none~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|")
    assert x[enc.onehot_size:].sum() == 1  # only the direct skip route survives
    full = enc("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|nor_conv_3x3~0|nor_conv_3x3~1|nor_conv_3x3~2|")
    assert full[enc.onehot_size:].sum() == 4 and full[:enc.onehot_size].sum() == 6


def test_darts_space_falls_back_to_the_one_hot_encoding_and_sampled_candidates():
    enc = PathEncoder(get_space("darts"))
    assert enc.path_size == 0 and enc.size == enc.onehot_size
    assert make_strategy("bananas", "darts", 10, 0).all_cells is None  # far too many cells to score them all


def test_a_small_space_is_scored_whole_so_greedy_acquisition_takes_the_predicted_best_cell():
    space = get_space("nb201")
    reward = interaction_benchmark(space, 2)
    # Few sampled candidates: only scoring every cell finds the predicted best of 15,625.
    options = {**FAST, "local_search": 0, "acquisition": "mean", "random_candidates": 10, "mutants": 0,
               "neighbourhood": 0}
    strategy = search(make_strategy("bananas", space, 20, 0, **options), lambda g: Evaluation(reward(g), {}),
                      max_evaluations=FAST["initial"])
    chosen = space.format(strategy.ask())  # the first acquisition, by the ensemble just fitted
    evaluated = {space.signature(space.parse(t.arch)) for t in strategy.history}
    unseen = [g for g in DecisionSpace(space).all_genotypes(15_625) if space.signature(g) not in evaluated]
    assert len(unseen) <= 15_625 - FAST["initial"]
    mean = strategy.model.predict(np.stack([strategy.encoder(g) for g in unseen])).mean(axis=0)
    assert chosen == space.format(unseen[int(np.argmax(mean))])


def test_the_mlp_ensemble_fits_a_simple_function():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (64, 6)).astype(float)
    y = x @ np.arange(6.0)
    pred = MLPEnsemble(members=3, width=16, epochs=300).fit(x, y, rng).predict(x)
    assert pred.shape == (3, 64)
    assert np.abs(pred.mean(axis=0) - y).mean() < 0.3


def test_a_warm_started_refit_learns_the_new_points_and_needs_a_fit_first():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 2, (64, 6)).astype(float)
    y = x @ np.arange(6.0)
    model = MLPEnsemble(members=3, width=16, epochs=300).fit(x[:32], y[:32], rng)
    before = np.abs(model.predict(x[32:]).mean(axis=0) - y[32:]).mean()
    model.refit(x, y, epochs=60)  # a fifth of the epochs, from the previous weights
    after = np.abs(model.predict(x).mean(axis=0) - y).mean()
    assert after < 0.3 and after < before
    with pytest.raises(ValueError, match="refit"):
        MLPEnsemble().refit(x, y, epochs=10)


def test_same_seed_same_search_and_different_seeds_differ():
    reward = interaction_benchmark(get_space("nb201"), 0)
    a = [t.arch for t in run("bananas", "nb201", 20, 1, reward, **FAST).history]
    b = [t.arch for t in run("bananas", "nb201", 20, 1, reward, **FAST).history]
    c = [t.arch for t in run("bananas", "nb201", 20, 2, reward, **FAST).history]
    assert a == b and a != c


def test_a_resumed_search_equals_an_uninterrupted_one(tmp_path):
    reward = interaction_benchmark(get_space("nb201"), 1)
    full = run("bananas", "nb201", 24, 3, reward, **FAST)
    search(make_strategy("bananas", "nb201", 24, 3, **FAST), lambda g: Evaluation(reward(g), {}),
           checkpoint=tmp_path / "ck.json", max_evaluations=13)  # mid-batch, after a fit
    resumed = restore(tmp_path / "ck.json")
    assert [t.arch for t in resumed.history] == [t.arch for t in full.history[:13]]
    search(resumed, lambda g: Evaluation(reward(g), {}))
    assert [t.arch for t in resumed.history] == [t.arch for t in full.history]


@pytest.mark.parametrize("exhaustive", [True, False])
def test_never_proposes_a_cell_twice_even_when_the_space_runs_out(exhaustive, monkeypatch):
    if not exhaustive:  # the 27 cells count as a large space: sampled candidates
        monkeypatch.setattr(strategies.predictor, "MAX_EXHAUSTIVE_CELLS", 26)
    space = TinyCell()
    assert (make_strategy("bananas", space, 27, 0).all_cells is not None) == exhaustive
    history = run("bananas", space, 27, 0, interaction_benchmark(space, 0), **FAST).history
    assert len({t.arch for t in history}) == 27  # the whole space, each cell once


def test_never_evaluates_a_cell_equivalent_to_an_evaluated_one_unless_told_to():
    space = get_space("nb201")
    reward = interaction_benchmark(space, 4)  # path-based: equivalent cells can score differently
    for skip in (True, False):
        history = run("bananas", space, 60, 0, reward, **FAST, skip_equivalent=skip).history
        signatures = [space.signature(space.parse(t.arch)) for t in history]
        assert len({t.arch for t in history}) == 60
        assert (len(set(signatures)) == 60) == skip  # without skipping, this seed repeats a function


def test_a_warm_start_cell_equivalent_to_an_evaluated_one_is_passed_over(monkeypatch):
    space = get_space("nb201")
    first = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"
    same = "|nor_conv_1x1~0|+|none~0|none~1|+|skip_connect~0|none~1|none~2|"  # node 1 feeds nothing
    other = "|nor_conv_3x3~0|+|none~0|none~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"
    assert space.signature(space.parse(first)) == space.signature(space.parse(same))
    strategy = make_strategy("bananas", space, 2, 0, **{**FAST, "initial": 2})
    cells = iter(space.parse(a) for a in (first, same, other))
    monkeypatch.setattr(strategy, "warm_cell", lambda count: next(cells, None))
    search(strategy, lambda g: Evaluation(0.0, {}))
    assert [t.arch for t in strategy.history] == [first, other]


def test_beats_random_search_on_a_structured_benchmark():
    space = get_space("nb201")
    gaps = []
    for seed in range(5):
        reward = interaction_benchmark(space, seed)
        best = reward.optimum
        bananas = run("bananas", space, 60, seed, reward, **FAST).best().reward
        rand = run("random", space, 60, seed, reward).best().reward
        gaps.append((best - bananas, best - rand))
    assert statistics.mean(g for g, _ in gaps) < 0.5 * statistics.mean(r for _, r in gaps)


def test_beats_random_search_on_the_nb201_table():
    from strategies.evaluators import TabularBenchmark, TabularEvaluator

    table = TabularBenchmark.load("nb201")  # shipped with the package
    evaluator = TabularEvaluator(table, "cifar10-val")
    ours = [search(make_strategy("bananas", "nb201", 60, s, epochs=100), evaluator).best().reward for s in range(5)]
    rand = [search(make_strategy("random", "nb201", 60, s), evaluator).best().reward for s in range(5)]
    assert statistics.mean(ours) > statistics.mean(rand) + 0.3


def test_zero_cost_warm_start_picks_the_best_of_the_pool_and_reports_its_cost():
    from supernet.proxies import list_proxies

    assert "params" in list_proxies()
    options = {**FAST, "initial": 3, "warm_start": "params", "warm_pool": 6,
               "proxy_options": {"C": 4, "layers": 1}}
    strategy = make_strategy("bananas", "nb201", 3, 0, **options)
    search(strategy, lambda g: Evaluation(0.0, {}))
    assert strategy.proxy_seconds > 0 and len(strategy.history) == 3
    # The three chosen cells are the pool's three largest by parameter count.
    assert [t.arch for t in strategy.history] == params_ranked_pool(0)[:3]
    resumed = restore(strategy.state())
    assert [t.arch for t in resumed.history] == [t.arch for t in strategy.history]


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="acquisition"):
        make_strategy("bananas", "nb201", 10, 0, acquisition="ei")
    with pytest.raises(ValueError, match="batch"):
        make_strategy("bananas", "nb201", 10, 0, batch=0)
    with pytest.raises(ValueError, match="'nope'"):
        make_strategy("bananas", "nb201", 10, 0, warm_start="nope")
    with pytest.raises(ValueError, match="refit_epochs"):
        make_strategy("bananas", "nb201", 10, 0, refit_epochs=-1)
    with pytest.raises(ValueError, match="local_search"):
        make_strategy("bananas", "nb201", 10, 0, local_search=1.5)
    with pytest.raises(ValueError, match="local_search must be at most batch=4"):
        make_strategy("bananas", "nb201", 10, 0, batch=4, local_search=5)
    with pytest.raises(ValueError, match="floor_quantile"):
        make_strategy("bananas", "nb201", 10, 0, floor_quantile=1.0)
    with pytest.raises(ValueError, match="skip_equivalent"):
        make_strategy("bananas", "nb201", 10, 0, skip_equivalent="yes")
