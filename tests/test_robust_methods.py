"""DrNAS, beta-DARTS, DARTS- and SDARTS-RS on tiny networks, their regularisers, and the collapse diagnostics."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from test_search import TINY, assert_same_end, whole_and_resumed

import supernet
from supernet import architect, batched_cell, cli, data
from supernet.mixing import AuxSkip, Dirichlet, RandomSmoothing
from supernet.search_config import METHODS, SearchConfig
from supernet.search_loop import Searcher, hessian_eigenvalue, mean_alpha_entropy, parameter_free_share
from supernet.search_network import SearchNetwork

ROBUST = ["drnas", "beta-darts", "darts-minus", "sdarts"]
SPACES = {"nb201": dict(space="nb201", C=4, layers=1), "darts": dict(space="darts", C=4, layers=2)}
BASE = dict(epochs=1, batch_size=16, steps_per_epoch=2, max_train=TINY["max_train"], retrain_epochs=0)


@pytest.fixture(scope="module")
def split():
    return data.load_split("digits", seed=0, max_train=TINY["max_train"])


@pytest.mark.parametrize("space", list(SPACES))
@pytest.mark.parametrize("method", ROBUST)
def test_robust_methods_search_and_derive(method, space, split):
    searcher = Searcher(SearchConfig(method=method, **SPACES[space], **BASE), split)
    before = [a.detach().clone() for a in searcher.net.arch_parameters()]
    genotype = searcher.run()
    net = searcher.net
    assert net.space.validate(genotype) == genotype and searcher.search_done
    assert any(not torch.equal(a, b) for a, b in zip(net.arch_parameters(), before, strict=True))
    record = searcher.history["epochs"][-1]
    assert 0.0 <= record["parameter_free_share"] <= 1.0
    assert 0.0 <= record["alpha_entropy"] <= math.log(len(net.space.ops)) + 1e-6
    assert "hessian_eigenvalue" not in record  # off by default


@pytest.mark.parametrize("method", ROBUST)
def test_robust_methods_resume_bit_identically(method, split, tmp_path):
    config = SearchConfig(method=method, **SPACES["nb201"], **dict(BASE, epochs=2, checkpoint_every=1,
                                                                    hessian_every=1))
    whole, resumed = whole_and_resumed(config, split, tmp_path, 3)
    assert (resumed.epoch, resumed.step) == (1, 1)
    resumed.run()
    for (name, a), b in zip(resumed.net.state_dict().items(), whole.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.genotype == whole.genotype
    assert resumed.history == whole.history
    assert all("hessian_eigenvalue" in r for r in whole.history["epochs"])


@pytest.mark.parametrize("options, message", [
    (dict(method="drnas", reg_scale=-1e-3), "reg_scale must be a non-negative finite number"),
    (dict(method="drnas", reg_scale=float("nan")), "reg_scale must be a non-negative finite number"),
    (dict(method="beta-darts", beta_lambda=float("inf")), "beta_lambda must be a non-negative finite number"),
    (dict(method="beta-darts", beta_lambda="1"), "beta_lambda must be a non-negative finite number"),
    (dict(hessian_every=-1), "hessian_every must be a non-negative integer"),
    (dict(hessian_every=1.5), "hessian_every must be a non-negative integer"),
    (dict(method="drnas", a_lr=0.0), "a_lr must be a positive finite number"),
    (dict(method="darts_minus"), "unknown method 'darts_minus'"),
    *[(dict(method="sdarts", sdarts_epsilon=eps), r"sdarts_epsilon must be a finite number in \[0.03, 1\]")
      for eps in (-0.1, 0.01, 1.5, float("nan"), float("inf"), "0.3", True)],
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**options)


def test_method_table_entries():
    assert METHODS["drnas"].mixing == "dirichlet" and METHODS["drnas"].regulariser == "dirichlet-kl"
    assert METHODS["beta-darts"].mixing == "softmax" and METHODS["beta-darts"].regulariser == "beta-decay"
    assert METHODS["darts-minus"].mixing == "aux-skip" and METHODS["darts-minus"].decays_aux_skip
    assert METHODS["sdarts"].mixing == "random-smoothing" and METHODS["sdarts"].smooths_weight_step
    assert METHODS["sdarts"].arch_first and SearchConfig(method="sdarts").sdarts_epsilon == 0.3  # SDARTS's code
    assert not any(METHODS[m].smooths_weight_step for m in METHODS if m != "sdarts")
    assert all(METHODS[m].learns_alphas and METHODS[m].arch_order == 1 for m in ROBUST)
    assert SearchConfig(method="drnas").reg_scale == 0.0  # DrNAS's default: Adam weight decay, no KL term
    assert not Dirichlet.differentiable and Dirichlet.learns_alphas


ALPHAS = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)


def test_beta_decay_matches_a_hand_computation():
    other = torch.tensor([[1.0, 3.0, -2.0]], dtype=torch.float64)
    rows = [math.log(sum(math.exp(v) for v in row)) for row in ALPHAS.tolist() + other.tolist()]
    assert float(architect.beta_decay([ALPHAS, other])) == pytest.approx(sum(rows) / 3, rel=1e-6)


def _kl_to_uniform(concentration):
    a0, k = sum(concentration), len(concentration)
    digamma = lambda v: float(torch.special.digamma(torch.tensor(v, dtype=torch.float64)))  # noqa: E731
    return (math.lgamma(a0) - sum(math.lgamma(a) for a in concentration) - math.lgamma(k)
            + sum((a - 1) * (digamma(a) - digamma(a0)) for a in concentration))


def test_dirichlet_kl_matches_a_hand_computation():
    expected = 0.0
    for row in ALPHAS.tolist():
        concentration = [(v if v > 0 else math.exp(v) - 1) + 1 for v in row]  # elu + 1
        expected += _kl_to_uniform(concentration)
    assert float(architect.dirichlet_kl([ALPHAS])) == pytest.approx(expected, rel=1e-5)
    assert float(architect.dirichlet_kl([torch.zeros(4, 5)])) == pytest.approx(0.0, abs=1e-6)  # beta = 1: the prior


def test_regulariser_gradient_is_the_weighted_terms_gradient():
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1, mixing="softmax")
    with torch.no_grad():
        net.alphas("cell").copy_(torch.randn(6, 5))
    grads, term = architect.regulariser_gradient(net, "beta-decay", 0.5)
    a = net.alphas("cell").detach().clone().requires_grad_()
    expected = 0.5 * torch.logsumexp(a, -1).mean()
    (g,) = torch.autograd.grad(expected, a)
    assert float(term) == pytest.approx(float(expected.detach())) and torch.allclose(grads[0], g)


@pytest.mark.parametrize("reg_scale", [0.0, 0.05])
def test_drnas_kl_term_replaces_the_alphas_weight_decay(reg_scale, split):
    """DrNAS's two regularisers are alternatives: Adam weight decay on the alphas (its default) or a KL term."""
    searcher = Searcher(SearchConfig(method="drnas", **SPACES["nb201"], **BASE, reg_scale=reg_scale,
                                     a_weight_decay=0.01), split)
    assert searcher.a_opt.param_groups[0]["weight_decay"] == (0.0 if reg_scale else 0.01)
    before = [a.detach().clone() for a in searcher.net.arch_parameters()]
    torch.manual_seed(0)
    searcher.run()
    assert ("regulariser_weight" in searcher.history["epochs"][-1]) == bool(reg_scale)
    assert any(not torch.equal(a, b) for a, b in zip(searcher.net.arch_parameters(), before, strict=True))
    darts = Searcher(SearchConfig(method="darts", **SPACES["nb201"], **BASE, reg_scale=reg_scale,
                                  a_weight_decay=0.01), split)
    assert darts.a_opt.param_groups[0]["weight_decay"] == 0.01 and darts.config.regulariser is None


def test_dirichlet_rule_mixes_with_the_mean_in_eval_and_samples_in_training():
    rule = Dirichlet()
    space = supernet.get_space("nb201")
    alphas = torch.randn(6, 5, requires_grad=True)
    beta = F.elu(alphas.detach()) + 1
    mean = beta / beta.sum(-1, keepdim=True)
    ops = [k for k, op in enumerate(space.ops) if op != "none"]
    with torch.no_grad():
        plan = rule.plan(space, {"alphas": {"cell": alphas}})["cell"]
    node = plan[-1]
    assert torch.equal(node.weights, torch.stack([mean[e, k] for e, k in node.pairs]))
    assert torch.equal(rule.edge_strengths(space, {"alphas": {"cell": alphas}})["cell"], mean)
    sampled = rule.weights(alphas)  # autograd on: a Dirichlet sample, differentiable
    assert sampled.requires_grad and not torch.allclose(sampled, mean)
    assert torch.allclose(sampled.sum(-1), torch.ones(6)) and (sampled[:, ops] > 0).all()
    rule.sample = False
    assert torch.allclose(rule.weights(alphas), mean)  # forced mean, even with autograd on


def test_darts_minus_adds_beta_to_the_skip_weight_and_decays_it(split):
    space = supernet.get_space("nb201")
    alphas = torch.randn(6, 5)
    rule = AuxSkip(beta=0.25)
    node = rule.plan(space, {"alphas": {"cell": alphas}})["cell"][0]
    skip = space.ops.index("skip_connect")
    w = F.softmax(alphas, -1)
    assert torch.allclose(node.weights, torch.stack([w[e, k] + (0.25 if k == skip else 0.0) for e, k in node.pairs]))
    searcher = Searcher(SearchConfig(method="darts-minus", **SPACES["nb201"], **dict(BASE, epochs=3)), split)
    searcher.run()
    # DARTS-'s linear decay: (epochs - epoch) / epochs, so the last epoch still has 1 / epochs of the skip
    assert [r["aux_skip"] for r in searcher.history["epochs"]] == pytest.approx([1.0, 2 / 3, 1 / 3])
    beta_darts = Searcher(SearchConfig(method="beta-darts", **SPACES["nb201"], **dict(BASE, epochs=3),
                                       beta_lambda=2.0), split)
    assert [beta_darts.regulariser_weight(e) for e in range(3)] == [0.0, 2 / 3, 4 / 3]
    assert SearchConfig(method="beta-darts").beta_lambda == 50.0


@pytest.mark.parametrize("method", ROBUST)
def test_arch_warmup_trains_the_weights_and_holds_the_alphas(method, split):
    """--arch-warmup-epochs: the first epochs move the weights only, then the alphas move too."""
    searcher = Searcher(SearchConfig(method=method, arch_warmup_epochs=1, **SPACES["nb201"], **dict(BASE, epochs=2)),
                        split)
    weights = [w.detach().clone() for w in searcher.net.weight_parameters()]
    alphas = searcher.history["alphas"]
    searcher.run()
    assert alphas[1] == alphas[0]  # the warm-up epoch
    assert alphas[2] != alphas[1]
    assert any(not torch.equal(w, v) for w, v in zip(searcher.net.weight_parameters(), weights, strict=True))


def test_darts_minus_forward_is_the_softmax_mixture_plus_beta_times_the_input():
    """The auxiliary skip on every edge, on the fused and reference paths: with alphas that give every candidate
    but `none` and skip a weight of 0, an nb201 cell computes node_j = sum_i (w_skip + beta) * node_i."""
    torch.manual_seed(0)
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1, mixing="aux-skip").double()
    x = torch.randn(8, 1, 8, 8, dtype=torch.double)
    space, skip = net.space, net.space.ops.index("skip_connect")
    alphas = torch.full((6, 5), -torch.inf, dtype=torch.double)
    alphas[:, skip] = 0.0
    alphas[:, space.ops.index("none")] = torch.randn(6, dtype=torch.double)  # w_skip = softmax over {none, skip}
    with torch.no_grad():
        net.alphas("cell").copy_(alphas)
    w_skip = F.softmax(alphas, -1)[:, skip]
    cell = net.cells[0]
    for beta in (0.0, 0.4, 1.0):
        net.mixing.beta = beta
        plan = net.mixing.plan(space, {"alphas": {"cell": net.alphas("cell")}})["cell"]
        x0 = torch.randn(8, 4, 8, 8, dtype=torch.double)
        nodes = [x0]
        for node in space.intermediate_nodes:
            nodes.append(sum((w_skip[e] + beta) * nodes[space.edges[e][1]] for e in space.node_edges(node)))
        for fused in (True, False):
            torch.testing.assert_close(cell([x0], plan, fused), nodes[-1])
    net.mixing.beta = 0.5
    outputs = []
    for fused in (True, False):
        net.fused = fused
        outputs.append(net(x))
    torch.testing.assert_close(outputs[0], outputs[1])


def test_parameter_free_share_and_entropy_match_hand_computations():
    space = supernet.get_space("nb201")
    genotype = space.parse("|skip_connect~0|+|avg_pool_3x3~0|nor_conv_3x3~1|+|none~0|nor_conv_1x1~1|skip_connect~2|")
    assert parameter_free_share(space, genotype) == pytest.approx(3 / 5)
    darts = supernet.get_space("darts")
    g = darts.parse("Genotype(normal=[('max_pool_3x3', 0), ('sep_conv_3x3', 1), ('skip_connect', 0), "
                    "('sep_conv_3x3', 1), ('sep_conv_3x3', 0), ('sep_conv_3x3', 1), ('sep_conv_3x3', 0), "
                    "('dil_conv_3x3', 1)], normal_concat=[2, 3, 4, 5], reduce=[('max_pool_3x3', 0), "
                    "('max_pool_3x3', 1), ('skip_connect', 2), ('max_pool_3x3', 1), ('max_pool_3x3', 0), "
                    "('skip_connect', 2), ('skip_connect', 2), ('max_pool_3x3', 1)], reduce_concat=[2, 3, 4, 5])")
    assert parameter_free_share(darts, g) == pytest.approx((2 + 8) / 16)

    for method in ("darts", "drnas"):
        net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1,
                            mixing=METHODS[method].mixing)
        alphas = torch.randn(6, 5)
        with torch.no_grad():
            net.alphas("cell").copy_(alphas)
        if method == "darts":
            p = F.softmax(alphas, -1)
        else:
            b = F.elu(alphas) + 1
            p = b / b.sum(-1, keepdim=True)
        expected = sum(-sum(v * math.log(v) for v in row) for row in p.tolist()) / 6
        assert mean_alpha_entropy(net) == pytest.approx(expected, rel=1e-5)


def test_hessian_eigenvalue_matches_the_full_hessian(split):
    torch.manual_seed(0)
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1, fused=False).double()
    with torch.no_grad():
        net.alphas("cell").copy_(torch.randn(6, 5))
    x, y = split.val[0][:8].double(), split.val[1][:8]
    alphas = net.alphas("cell")

    def loss(a):
        return F.cross_entropy(torch.func.functional_call(net, {"alphas_cell": a}, (x,)), y)

    before = [b.clone() for b in net.buffers()]
    H = torch.autograd.functional.hessian(loss, alphas.detach()).reshape(30, 30)
    for buf, b in zip(net.buffers(), before, strict=True):  # the Hessian's forwards ran in train mode
        buf.copy_(b)
    eig = torch.linalg.eigvalsh((H + H.T) / 2)
    dominant = float(eig[eig.abs().argmax()])
    state = torch.get_rng_state()
    value = hessian_eigenvalue(net, (x, y), iterations=200)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(buf, b) for buf, b in zip(net.buffers(), before, strict=True))
    assert value == pytest.approx(dominant, rel=1e-3, abs=1e-8)


def test_run_folder_holds_the_diagnostics_and_the_collapse_plot(tmp_path):
    result = supernet.search(run_dir=tmp_path / "run", method="drnas", hessian_every=1, reg_scale=1e-3,
                             **SPACES["nb201"], **BASE)
    results = json.loads((result.run_dir / "results.json").read_text())
    record = results["history"][-1]
    assert {"parameter_free_share", "alpha_entropy", "hessian_eigenvalue", "regulariser_weight"} <= set(record)
    assert (result.run_dir / "collapse.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["paths"]["collapse_plot"].endswith("collapse.png")
    log = (result.run_dir / "log.txt").read_text()
    assert "parameter-free share" in log and "alpha entropy" in log and "alpha-Hessian eigenvalue" in log


# --- SDARTS-RS ---------------------------------------------------------------------------------------
def _sdarts_clip(row: list[float]) -> list[float]:
    """SDARTS's `clip`, one edge at a time: clamp to [0, 1], an all-zero edge gets 1 on its largest entry,
    then divide by the sum."""
    top = max(range(len(row)), key=row.__getitem__)
    clamped = [min(max(v, 0.0), 1.0) for v in row]
    if sum(clamped) == 0:
        clamped[top] = 1.0
    return [v / sum(clamped) for v in clamped]


def _expected_perturbed(alphas: torch.Tensor, epsilon: float, rng_state: torch.Tensor) -> tuple:
    """(clip(softmax(alphas) + noise) in float64, noise): the noise drawn as U(-epsilon, epsilon) from `rng_state`."""
    gen = torch.Generator().set_state(rng_state)
    noise = torch.empty(alphas.shape, dtype=alphas.dtype).uniform_(-epsilon, epsilon, generator=gen)
    noisy = (F.softmax(alphas, -1) + noise).double()
    return torch.tensor([_sdarts_clip(row) for row in noisy.tolist()], dtype=torch.float64), noise


def _plan_matrix(plan, shape) -> torch.Tensor:
    """The (edges, ops) mixing weights a dense plan names (`none`, absent from the plan, left as nan)."""
    w = torch.full(shape, float("nan"), dtype=torch.float64)
    for node in plan:
        for (e, k), v in zip(node.pairs, node.weights.tolist(), strict=True):
            w[e, k] = v
    return w


def test_sdarts_clip_matches_a_hand_computation_with_dead_edges():
    """eps = 1 on uniform edges: about 1% of the rows are clamped to all zeros and take their largest entry."""
    rule = RandomSmoothing(epsilon=1.0)
    alphas = torch.zeros(2000, 5)
    state = torch.get_rng_state()
    weights = rule.perturbed(alphas.softmax(-1))
    expected, noise = _expected_perturbed(alphas, 1.0, state)
    assert noise.abs().max() <= 1.0 and noise.abs().max() > 0.99
    dead = ((F.softmax(alphas, -1) + noise) <= 0).all(-1)
    assert int(dead.sum()) > 0  # the all-zero branch is exercised
    torch.testing.assert_close(weights.double(), expected, rtol=1e-6, atol=1e-7)
    assert torch.equal(weights[dead], F.one_hot((F.softmax(alphas, -1) + noise)[dead].argmax(-1), 5).float())
    assert not weights.requires_grad and (weights >= 0).all()


def test_sdarts_perturbs_the_weight_step_only(split):
    """Each weight step's forward mixes with clip(softmax(alpha) + U(-eps, eps)) for that epoch's eps; the alpha
    step and evaluation mix with softmax(alpha), and derivation ranks softmax(alpha)."""
    config = SearchConfig(method="sdarts", sdarts_epsilon=0.5, **SPACES["nb201"], **dict(BASE, epochs=2))
    searcher = Searcher(config, split)
    rule, plan = searcher.net.mixing, searcher.net.mixing.plan
    calls = []

    def recording_plan(space, arch):
        state = torch.get_rng_state()
        plans = plan(space, arch)
        calls.append((rule.perturb, rule.epsilon, state, arch["alphas"]["cell"].detach().clone(), plans["cell"]))
        return plans

    rule.plan = recording_plan
    searcher.run()
    perturbed = [c for c in calls if c[0]]
    assert len(perturbed) == 2 * searcher.steps  # one forward per weight step
    assert sorted({c[1] for c in perturbed}) == pytest.approx([0.03, 0.03 + 0.47 / 2])
    assert len(calls) > len(perturbed) + 2 * searcher.steps - 1  # alpha steps and evaluations too
    for is_perturbed, eps, state, alphas, cell_plan in calls:
        got = _plan_matrix(cell_plan, alphas.shape)
        if is_perturbed:
            expected, noise = _expected_perturbed(alphas, eps, state)
            assert noise.abs().max() <= eps
            assert not torch.allclose(got.nan_to_num(), F.softmax(alphas, -1).double().nan_to_num(), atol=1e-4)
        else:
            expected = F.softmax(alphas, -1).double()
        mask = ~got.isnan()
        torch.testing.assert_close(got[mask], expected[mask], rtol=1e-5, atol=1e-6)
    assert [r["sdarts_epsilon"] for r in searcher.history["epochs"]] == pytest.approx([0.03, 0.265])
    net = searcher.net
    torch.testing.assert_close(net.edge_strengths()["cell"], F.softmax(net.alphas("cell"), -1))


def test_sdarts_epsilon_grows_linearly_as_in_sdarts(split):
    searcher = Searcher(SearchConfig(method="sdarts", **SPACES["nb201"], **dict(BASE, epochs=4)), split)
    assert [searcher.smoothing_epsilon(e) for e in range(4)] == pytest.approx([0.03, 0.0975, 0.165, 0.2325])
    searcher.run()
    assert [r["sdarts_epsilon"] for r in searcher.history["epochs"]] == pytest.approx([0.03, 0.0975, 0.165, 0.2325])
    assert not searcher.net.mixing.perturb  # off outside the weight step


def test_sdarts_is_deterministic_per_seed_and_its_noise_changes_the_search(split):
    states = []
    for method in ("sdarts", "sdarts", "darts"):
        searcher = Searcher(SearchConfig(method=method, **SPACES["nb201"], **BASE), split)
        searcher.run()
        states.append(searcher.net.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values(), strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(states[0].values(), states[2].values(), strict=True))


@pytest.mark.parametrize("space", list(SPACES))
def test_sdarts_perturbed_forward_agrees_on_the_fused_batched_and_reference_paths(space, monkeypatch):
    """Perturbed weights (some clamped to 0) through the batched CPU cell and the per-edge reference path: the
    same logits and weight gradients, and no gradient into the alphas (the perturbed weights are constants)."""
    torch.manual_seed(0)
    net = SearchNetwork(space, C=4, layers=SPACES[space]["layers"], num_classes=10, in_channels=1,
                        mixing="random-smoothing").double()
    net.mixing.epsilon = 0.3
    with torch.no_grad():
        for a in net.arch_parameters():
            a.copy_(2 * torch.randn_like(a))
    batched_calls = []
    cell_nodes = batched_cell.cell_nodes
    monkeypatch.setattr(batched_cell, "cell_nodes", lambda *a: batched_calls.append(1) or cell_nodes(*a))
    x = torch.randn(8, 1, 8, 8, dtype=torch.double)
    results = []
    for fused in (True, False):
        net.fused = fused
        torch.manual_seed(1)
        with net.mixing.perturbing():
            plans = net.plans()
            torch.manual_seed(1)
            out = net(x)
        grads = torch.autograd.grad(out.square().sum(), net.weight_parameters() + net.arch_parameters(),
                                    allow_unused=True)
        results.append((out.detach(), grads))
        if fused:
            assert batched_calls, "the batched cell computed no cell"
    assert any((node.weights == 0).any() for plan in plans.values() for node in plan)
    torch.testing.assert_close(results[0][0], results[1][0])
    n_weights = len(net.weight_parameters())
    for g_fused, g_reference in zip(results[0][1][:n_weights], results[1][1][:n_weights], strict=True):
        if g_fused is None or g_reference is None:
            assert g_fused is None and g_reference is None
        else:
            torch.testing.assert_close(g_fused, g_reference)
    assert all(g is None for _, grads in results for g in grads[n_weights:])


def test_sdarts_on_the_command_line(tmp_path, capsys):
    args = ["search", "--out", str(tmp_path), "--method", "sdarts", "--space", "nb201", "--C", "4", "--layers", "1",
            "--epochs", "2", "--batch-size", "16", "--steps-per-epoch", "1", "--max-train", "64",
            "--retrain-epochs", "0", "--threads", "1", "--quiet"]
    assert cli.main([*args, "--sdarts-epsilon", "0.01"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet search: error: sdarts_epsilon must be a finite number in [0.03, 1]")
    assert "Traceback" not in err
    assert not any(tmp_path.iterdir())
    assert cli.main([*args, "--sdarts-epsilon", "0.23"]) == 0
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert [r["sdarts_epsilon"] for r in results["history"]] == pytest.approx([0.03, 0.13])
    assert results["config"]["method"] == "sdarts"


# --- DrNAS's progressive search (drnas_progressive) -----------------------------------------------------
PROGRESSIVE = dict(method="drnas", drnas_progressive=True, **SPACES["nb201"], **dict(BASE, epochs=4))


def _conv_in_channels(net: SearchNetwork) -> int:
    """Input channels of the first search cell's first edge's 3x3 conv (C=4: 1 at k=4, 2 at k=2)."""
    return net.cells[0].edges[0].ops["nor_conv_3x3"][1].in_channels


def test_drnas_progressive_prunes_to_the_3_strongest_and_widens_at_half_time(split):
    seen = []  # per step: (epoch, channel divisor, conv input channels, alphas, kept mask)

    def record(searcher):
        net = searcher.net
        kept = net.mixing.kept
        seen.append((searcher.epoch, net.mixing.channel_divisor, _conv_in_channels(net),
                     net.alphas("cell").detach().clone(), None if kept is None else kept["cell"].clone()))

    searcher = Searcher(SearchConfig(**PROGRESSIVE), split, callback=record)
    genotype = searcher.run()
    assert [(e, k, c) for e, k, c, _, _ in seen] == [(0, 4, 1)] * 2 + [(1, 4, 1)] * 2 + [(2, 2, 2)] * 2 + [(3, 2, 2)] * 2
    assert [r["channel_divisor"] for r in searcher.history["epochs"]] == [4, 4, 2, 2]
    assert all(kept is None for _, k, _, _, kept in seen if k == 4)
    # DrNAS keeps the top-3 alphas of each edge as they were when the first stage ended (the same order as the
    # Dirichlet mean's), and the mask holds for the rest of the search
    alphas_at_change = seen[3][3]
    expected = torch.zeros_like(alphas_at_change, dtype=torch.bool).scatter_(1, alphas_at_change.topk(3).indices, True)
    assert all(torch.equal(kept, expected) for _, k, _, _, kept in seen if k == 2)
    assert expected.sum(dim=1).tolist() == [3] * searcher.net.space.num_edges
    # pruned candidates neither run nor weigh: the derived cell, the mean and every plan stay inside the mask
    space = searcher.net.space
    path = space.to_paths(genotype)["cell"]
    assert all(expected[e, k] for e, k in enumerate(path))
    mean = searcher.net.edge_strengths()["cell"]
    assert torch.all(mean[~expected] == 0) and torch.allclose(mean.sum(dim=1), torch.ones(space.num_edges))
    with torch.enable_grad():
        plan = searcher.net.plans()["cell"]
    assert all(expected[e, k] for node in plan for e, k in node.pairs)


def test_dirichlet_restricted_to_kept_candidates_samples_the_kept_dirichlet():
    """A sample zeroed outside the kept candidates and renormalised is Dirichlet over the kept concentrations
    (DrNAS masks its samples so): its mean over many draws is their mean, computed in float64."""
    torch.manual_seed(0)
    rule = Dirichlet()
    alphas = torch.randn(3, 5)
    kept = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 0], [1, 0, 0, 1, 1]], dtype=torch.bool)
    rule.sample = True
    draws = torch.stack([rule.weights(alphas, kept) for _ in range(4000)])
    assert torch.all(draws[:, ~kept] == 0)
    assert torch.allclose(draws.sum(dim=-1), torch.ones(4000, 3))
    beta = (F.elu(alphas.double()) + 1) * kept
    expected = beta / beta.sum(dim=-1, keepdim=True)
    assert torch.allclose(draws.double().mean(dim=0), expected, atol=0.02)
    assert torch.allclose(rule.mean(alphas, kept).double(), expected, atol=1e-6)


def test_widening_copies_channels_and_their_momentum_alike():
    torch.manual_seed(0)
    net = SearchNetwork("nb201", C=8, layers=1, num_classes=10, in_channels=1, mixing=Dirichlet(4))
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.1, momentum=0.9)
    net(torch.randn(4, 1, 8, 8)).sum().backward()
    opt.step()
    _, conv, bn = net.cells[0].edges[0].ops["nor_conv_3x3"]
    weight, bias = conv.weight.detach().clone(), conv.bias.detach().clone()
    buffer = opt.state[conv.weight]["momentum_buffer"].clone()
    mean = bn.running_mean.clone()
    net.widen_partial_channels(2, opt)
    assert conv.weight.shape == (4, 4, 3, 3) and bn.running_mean.shape == (4,) and conv.in_channels == 4
    new_buffer = opt.state[conv.weight]["momentum_buffer"]
    assert torch.equal(conv.weight[:2, :2], weight) and torch.equal(new_buffer[:2, :2], buffer)
    for j in range(2, 4):  # every new input channel copies one old input channel, weights and momentum alike
        assert any(torch.equal(conv.weight[:2, j], weight[:, i]) and torch.equal(new_buffer[:2, j], buffer[:, i])
                   for i in range(2))
    for j in range(2, 4):  # every new output channel copies one old output channel, with its bias and statistics
        assert any(torch.equal(conv.weight[j], conv.weight[i]) and conv.bias[j] == bias[i]
                   and bn.running_mean[j] == mean[i] for i in range(2))
    out = net(torch.randn(4, 1, 8, 8))  # the wider network runs and trains
    out.sum().backward()
    opt.step()


@pytest.mark.parametrize("interrupt_after, checkpoint_every, position", [
    (3, 1, (1, 1)),  # inside the first stage
    (5, 0, (2, 0)),  # at the stage change, not yet made (an end-of-epoch checkpoint)
    (5, 1, (2, 1)),  # inside the second stage: a pruned, wider network loads into a freshly built one
])
def test_drnas_progressive_resumes_bit_identically_across_the_stage_change(interrupt_after, checkpoint_every,
                                                                           position, split, tmp_path):
    config = SearchConfig(**dict(PROGRESSIVE, checkpoint_every=checkpoint_every))
    whole, resumed = whole_and_resumed(config, split, tmp_path, interrupt_after)
    assert (resumed.epoch, resumed.step) == position
    resumed.run()
    assert_same_end(resumed, whole)


def test_drnas_progressive_holds_the_alphas_at_the_start_of_each_stage(split):
    config = SearchConfig(**dict(PROGRESSIVE, arch_warmup_epochs=1))
    alphas = []
    searcher = Searcher(config, split, callback=lambda s: alphas.append((s.epoch, s.net.alphas("cell").detach().clone())))
    start = searcher.net.alphas("cell").detach().clone()
    searcher.run()
    moved = {}
    previous = start
    for epoch, a in alphas:
        moved.setdefault(epoch, []).append(not torch.equal(a, previous))
        previous = a
    assert moved == {0: [False, False], 1: [True, True], 2: [False, False], 3: [True, True]}
    # DrNAS's code: the first 10 of each 50-epoch stage train the weights only
    assert SearchConfig(method="drnas", space="nb201", epochs=100, drnas_progressive=True).arch_warmup_epochs == 10


def test_drnas_progressive_run_folder_loads_back(tmp_path):
    result = supernet.search(**dict(PROGRESSIVE, max_train=64), run_dir=tmp_path / "run")
    run = supernet.search_run.load_run(tmp_path / "run")
    assert run.network.mixing.channel_divisor == 2 and run.network.mixing.kept is not None
    assert run.network.derive() == run.genotype == result.genotype


@pytest.mark.parametrize("options, message", [
    (dict(method="darts"), "drnas_progressive is DrNAS's schedule; it needs method='drnas', not 'darts'"),
    (dict(space="darts", layers=2), "drnas_progressive supports the nb201 space only"),
    (dict(epochs=1), r"drnas_progressive needs epochs >= 2"),
    (dict(C=6), "C=6 must be divisible by 4"),
    (dict(arch_warmup_epochs=2), "arch_warmup_epochs=2 counts per stage with drnas_progressive and must be below "
                                 "the first stage's 2 epochs"),
    (dict(drnas_progressive="yes"), "drnas_progressive must be True or False"),
])
def test_drnas_progressive_refuses_what_it_does_not_apply_to(options, message):
    with pytest.raises(ValueError, match=message):
        SearchConfig(**dict(PROGRESSIVE, **options))


def test_drnas_progressive_on_the_command_line(tmp_path):
    args = ["search", "--out", str(tmp_path), "--method", "drnas", "--space", "nb201", "--C", "4", "--layers", "1",
            "--epochs", "2", "--batch-size", "16", "--steps-per-epoch", "1", "--max-train", "64",
            "--retrain-epochs", "0", "--threads", "1", "--quiet", "--drnas-progressive"]
    assert cli.main(args) == 0
    (run_dir,) = tmp_path.iterdir()
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["drnas_progressive"] is True
    assert [r["channel_divisor"] for r in results["history"]] == [4, 2]


def test_pruning_and_widening_refuse_what_they_cannot_do():
    softmax_net = SearchNetwork("nb201", C=8, layers=1, num_classes=10, in_channels=1)
    with pytest.raises(ValueError, match="pruning candidates needs mixing='dirichlet', not 'softmax'"):
        softmax_net.prune_candidates(3)
    with pytest.raises(ValueError, match="widening partial channels needs mixing='dirichlet'"):
        softmax_net.widen_partial_channels(2)
    net = SearchNetwork("nb201", C=8, layers=1, num_classes=10, in_channels=1, mixing=Dirichlet(4))
    with pytest.raises(ValueError, match="num_keep=6 exceeds the 5 candidates"):
        net.prune_candidates(6)
    with pytest.raises(ValueError, match=r"kept candidates of 'cell' must be a \(6, 5\) bool mask"):
        net.restrict_candidates({"cell": torch.ones(6, 4, dtype=torch.bool)})
    with pytest.raises(ValueError, match="at least one candidate per edge"):
        net.restrict_candidates({"cell": torch.zeros(6, 5, dtype=torch.bool)})
    with pytest.raises(ValueError, match="a divisor k=3 that divides and is below the current 4"):
        net.widen_partial_channels(3)
    darts_net = SearchNetwork("darts", C=8, layers=2, num_classes=10, in_channels=1, mixing=Dirichlet(4))
    before = {name: t.clone() for name, t in darts_net.state_dict().items()}
    with pytest.raises(ValueError, match="widening partial channels (supports plain convolutions|needs every batch)"):
        darts_net.widen_partial_channels(2)
    assert all(torch.equal(t, before[name]) for name, t in darts_net.state_dict().items())  # nothing changed
