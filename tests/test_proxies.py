"""Zero-cost proxies: hand-computable cases, invariances, determinism and clear errors."""

import math

import pytest
import torch

from supernet import EvalNetwork, count_parameters, get_space
from supernet.proxies import build_network, digits_batches, list_proxies, needs_data, rank_by_proxy, score

CONV = "|nor_conv_3x3~0|+|nor_conv_3x3~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|skip_connect~2|"
NONE = "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"
SKIP = "|skip_connect~0|+|none~0|none~1|+|none~0|none~1|skip_connect~2|"
SMALL = {"C": 4, "layers": 1}


@pytest.fixture(scope="module")
def batches():
    return digits_batches(batch_size=16, num_batches=1, seed=0)


def test_the_registry_lists_every_proxy_and_which_need_data():
    assert list_proxies() == ["synflow", "snip", "grad_norm", "jacov", "naswot", "params", "flops"]
    assert [p for p in list_proxies() if not needs_data(p)] == ["synflow", "params", "flops"]


def test_unknown_proxy_is_a_value_error_naming_it(batches):
    with pytest.raises(ValueError, match="'fisherx'"):
        score("fisherx", CONV, "nb201", batches)
    with pytest.raises(ValueError, match="'fisherx'"):
        needs_data("fisherx")


def test_a_proxy_that_needs_data_says_so_without_batches():
    with pytest.raises(ValueError, match="needs real batches"):
        score("snip", CONV, "nb201", input_shape=(1, 8, 8))
    with pytest.raises(ValueError, match="input_shape"):
        score("synflow", CONV, "nb201")


def test_params_equals_count_parameters_and_flops_count_a_hand_computed_network(batches):
    net = EvalNetwork("nb201", NONE, C=4, layers=1, num_classes=10, in_channels=1)
    assert score("params", NONE, "nb201", batches, **SMALL) == count_parameters(net)
    # With every edge `none`, the convolutions are the stem (1->4, 3x3, 8x8 out), the two residual
    # blocks (conv_a 3x3 stride 2, conv_b 3x3, 1x1 shortcut after a pool) and the classifier.
    stem = 8 * 8 * 4 * 1 * 9
    block1 = 4 * 4 * 8 * (4 * 9) + 4 * 4 * 8 * (8 * 9) + 4 * 4 * 8 * 4
    block2 = 2 * 2 * 16 * (8 * 9) + 2 * 2 * 16 * (16 * 9) + 2 * 2 * 16 * 8
    assert score("flops", NONE, "nb201", input_shape=(1, 8, 8), **SMALL) == stem + block1 + block2 + 16 * 10


def test_synflow_needs_no_data_and_ignores_it():
    other = [(torch.rand(16, 1, 8, 8), torch.randint(0, 10, (16,)))]
    shape = score("synflow", CONV, "nb201", input_shape=(1, 8, 8), num_classes=10, **SMALL)
    assert shape > 0
    assert score("synflow", CONV, "nb201", digits_batches(16, 1, 0), **SMALL) == shape
    assert score("synflow", CONV, "nb201", other, num_classes=10, **SMALL) == shape


def test_a_cell_without_any_parametric_path_scores_zero_or_minus_infinity(batches):
    # All-`none` cells cut the signal: no gradient reaches any weight and every activation code is equal.
    for name in ("synflow", "snip", "grad_norm"):
        assert score(name, NONE, "nb201", batches, **SMALL) == 0.0
    assert score("naswot", NONE, "nb201", batches, **SMALL) == -math.inf
    assert score("jacov", NONE, "nb201", batches, **SMALL) == -math.inf
    # A cell of skips and `none` has no parameters of its own: params equal the all-`none` cell's.
    assert score("params", SKIP, "nb201", batches, **SMALL) == score("params", NONE, "nb201", batches, **SMALL)
    assert score("params", CONV, "nb201", batches, **SMALL) > score("params", SKIP, "nb201", batches, **SMALL)


@pytest.mark.parametrize("name", ["synflow", "snip", "grad_norm", "jacov", "naswot", "params", "flops"])
def test_every_proxy_is_deterministic_per_seed_and_leaves_the_global_rng_alone(name, batches):
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = score(name, CONV, "nb201", batches, seed=3, **SMALL)
    assert torch.equal(torch.get_rng_state(), before)
    assert score(name, CONV, "nb201", batches, seed=3, **SMALL) == a
    assert math.isfinite(a)
    if name in ("synflow", "snip", "grad_norm", "jacov"):
        assert score(name, CONV, "nb201", batches, seed=4, **SMALL) != a


def test_snip_equals_the_gradient_of_a_weight_mask(batches):
    net = build_network(CONV, "nb201", seed=0, C=4, layers=1, num_classes=10, in_channels=1)
    layers = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    masks = [torch.ones_like(m.weight, requires_grad=True) for m in layers]
    originals = [m.weight for m in layers]
    for m, mask in zip(layers, masks):
        del m.weight
        m.weight = originals[layers.index(m)] * mask
    x, y = batches[0]
    torch.nn.functional.cross_entropy(net(x), y).backward()
    expected = sum(mask.grad.abs().sum() for mask in masks).item()
    assert score("snip", CONV, "nb201", batches, seed=0, **SMALL) == pytest.approx(expected, rel=1e-5)


def test_proxies_score_darts_genotypes_too(batches):
    from supernet import DARTS_GENOTYPES

    genotype = DARTS_GENOTYPES["DARTS_V2"] if "DARTS_V2" in DARTS_GENOTYPES else next(iter(DARTS_GENOTYPES.values()))
    for name in ("synflow", "naswot", "params"):
        assert math.isfinite(score(name, genotype, "darts", batches, C=4, layers=3))


def test_rank_by_proxy_sorts_best_first(batches):
    ranked = rank_by_proxy("params", [NONE, CONV, SKIP], "nb201", batches, **SMALL)
    assert ranked[0] == CONV


# --- the proxies as a `supernet sample` evaluator ------------------------------------------------------------
def test_proxy_evaluator_rewards_the_proxy_score_and_floors_unscorable_cells():
    from strategies.evaluators import ProxyEvaluator
    from supernet import proxies

    space = get_space("nb201")
    batches = proxies.digits_batches(batch_size=16, seed=3)
    evaluator = ProxyEvaluator("naswot", space, batches, seed=3, C=4, layers=1)
    genotype = space.parse("|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|none~2|")
    result = evaluator(genotype)
    assert math.isfinite(result.reward)
    assert result.reward == proxies.score("naswot", genotype, space, batches, seed=3, C=4, layers=1)
    assert result.metrics["naswot"] == result.reward and result.metrics["proxy_seconds"] > 0
    # no path from input to output: naswot is -inf, which a strategy cannot be told
    assert evaluator(space.parse(NONE)).reward == -1e30
    with pytest.raises(ValueError, match="unknown zero-cost proxy"):
        ProxyEvaluator("accuracy")


def test_sample_command_searches_by_a_proxy(tmp_path, capsys):
    import json

    from supernet.cli import main as cli_main

    out = tmp_path / "out"
    assert cli_main(["sample", "--proxy", "params", "--strategy", "random", "--budget", "4", "--out", str(out),
                     "--quiet"]) == 0
    history = json.loads((out / "random.json").read_text())["history"]
    assert [t["reward"] for t in history] == [t["metrics"]["params"] for t in history]
    assert all(t["reward"] > 0 for t in history)
    assert cli_main(["sample", "--proxy", "params", "--cost", "params", "--out", str(tmp_path / "x")]) == 2
    assert "--proxy scores cells by the proxy alone" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
