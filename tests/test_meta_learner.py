"""Meta-learner: MAML meta-gradients against explicit autograd, Reptile against its formula, per-task batch norm."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from supernet import SearchNetwork
from supernet.meta import (
    Episode,
    EpisodeSampler,
    MetaLearner,
    NonFiniteUpdate,
    fewshot_dataset,
    maml_meta_gradient,
    split_by_class,
    stack_episodes,
)


class Tiny(nn.Module):
    """logits = tanh(x W^T) * a: nonlinear in both parameters, so the Hessian has every kind of term."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(0.5 * torch.randn(3, 4, dtype=torch.float64))
        self.a = nn.Parameter(1.0 + 0.5 * torch.randn(3, dtype=torch.float64))

    def forward(self, x):
        return torch.tanh(x @ self.w.T) * self.a


def tiny_tasks(tasks=2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(tasks, 15, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (tasks, 15), generator=g)
    return Episode(x[:, :6], y[:, :6], x[:, 6:], y[:, 6:], torch.arange(3).repeat(tasks, 1))


def test_second_order_maml_gradient_matches_the_explicit_chain_rule():
    torch.manual_seed(0)
    model = Tiny()
    params = {k: v.detach() for k, v in model.named_parameters()}
    lrs = {"w": 0.3, "a": 0.7}  # different rates for the two groups, as weights and alphas have
    steps, episodes = 2, tiny_tasks()
    got, stats = maml_meta_gradient(model, params, {}, {}, episodes, lrs, steps)

    sizes = [params["w"].numel(), params["a"].numel()]
    rates = [torch.full((n,), lrs[k], dtype=torch.float64) for n, k in zip(sizes, ("w", "a"))]
    lam = torch.diag(torch.cat(rates))

    def unflat(theta):
        w, a = theta.split(sizes)
        return {"w": w.view(3, 4), "a": a}

    expected, losses = torch.zeros(sum(sizes), dtype=torch.float64), []
    for t in range(episodes.num_tasks):
        def support_loss(theta, t=t):
            logits = functional_call(model, unflat(theta), (episodes.support_x[t],))
            return F.cross_entropy(logits, episodes.support_y[t])

        def query_loss(theta, t=t):
            logits = functional_call(model, unflat(theta), (episodes.query_x[t],))
            return F.cross_entropy(logits, episodes.query_y[t])

        theta = torch.cat([params["w"].flatten(), params["a"]])
        jacobians = []
        for _ in range(steps):  # theta' = theta - Lam grad L_s(theta);  d theta'/d theta = I - Lam H
            hessian = torch.autograd.functional.hessian(support_loss, theta)
            jacobians.append(torch.eye(len(theta), dtype=torch.float64) - lam @ hessian)
            theta = theta - lam @ torch.autograd.functional.jacobian(support_loss, theta)
        g = torch.autograd.functional.jacobian(query_loss, theta)
        for jac in reversed(jacobians):
            g = jac.T @ g
        expected += g / episodes.num_tasks
        losses.append(query_loss(theta).item())
    torch.testing.assert_close(torch.cat([got["w"].flatten(), got["a"]]), expected, rtol=1e-9, atol=1e-12)
    assert stats["query_loss"] == pytest.approx(sum(losses) / len(losses))
    # first order drops the Hessian terms, and they matter here
    first, _ = maml_meta_gradient(model, params, {}, {}, episodes, lrs, steps, first_order=True)
    assert not torch.allclose(torch.cat([first["w"].flatten(), first["a"]]), expected, rtol=1e-3)


def tiny_supernet(**kwargs):
    torch.manual_seed(0)
    return SearchNetwork("nb201", C=2, layers=1, num_classes=3, in_channels=1, **kwargs).double()


def image_tasks(tasks=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Episode(torch.randn(tasks, 6, 1, 8, 8, generator=g, dtype=torch.float64),
                   torch.arange(3).repeat(tasks, 2), torch.randn(tasks, 9, 1, 8, 8, generator=g, dtype=torch.float64),
                   torch.arange(3).repeat(tasks, 3), torch.arange(3).repeat(tasks, 1))


def reference_adapt(net, task, lrs, steps, create_graph):
    """Plain per-task loop with torch.autograd.grad; fresh buffers, train-mode batch norm (MAML's per-task BN)."""
    params = dict(net.named_parameters())
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    adapted = {k: params[k] for k in lrs}
    frozen = {k: v for k, v in params.items() if k not in lrs}
    for _ in range(steps):
        logits = functional_call(net, (adapted, frozen, buffers), (task.support_x,))
        grads = torch.autograd.grad(F.cross_entropy(logits, task.support_y), list(adapted.values()),
                                    create_graph=create_graph)
        adapted = {k: v - lrs[k] * g for (k, v), g in zip(adapted.items(), grads)}
    return adapted, frozen, buffers


@pytest.mark.parametrize("method", ["maml", "fomaml"])
def test_supernet_meta_gradient_matches_an_unrolled_autograd_loop(method):
    net = tiny_supernet()
    learner = MetaLearner(net, method, inner_steps=2, inner_lr_weights=0.2, inner_lr_alphas=0.9)
    episodes = image_tasks()
    got, _ = learner.meta_gradient(episodes)
    names = [n for n, _ in net.named_parameters()]
    expected = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for t in range(episodes.num_tasks):
        task = episodes.task(t)
        adapted, frozen, buffers = reference_adapt(net, task, learner.lrs, 2, create_graph=method == "maml")
        loss = F.cross_entropy(functional_call(net, (adapted, frozen, buffers), (task.query_x,)), task.query_y)
        wrt = [dict(net.named_parameters())[n] for n in names] if method == "maml" else [adapted[n] for n in names]
        for n, g in zip(names, torch.autograd.grad(loss, wrt)):
            expected[n] += g / episodes.num_tasks
    assert set(got) == set(names)
    for n in names:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-7, atol=1e-10, msg=n)
    assert got["alphas_cell"].abs().sum() > 0


def test_reptile_update_follows_its_formula():
    net = tiny_supernet()
    eps_w, eps_a = 0.3, 0.8
    learner = MetaLearner(net, "reptile", inner_steps=3, inner_lr_weights=0.1, inner_lr_alphas=0.5,
                          meta_lr_weights=eps_w, meta_lr_alphas=eps_a)
    episodes = image_tasks(3)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    adapted = [reference_adapt(net, episodes.task(t), learner.lrs, 3, create_graph=False)[0] for t in range(3)]
    learner.meta_step(episodes)
    for n, p in net.named_parameters():
        mean_adapted = sum(a[n] for a in adapted) / 3
        eps = eps_a if n == "alphas_cell" else eps_w
        # theta <- theta + eps * (mean over tasks of adapted theta - theta)
        torch.testing.assert_close(p.detach(), before[n] + eps * (mean_adapted.detach() - before[n]), rtol=1e-9,
                                   atol=1e-12, msg=n)
    assert not torch.equal(net.alphas_cell.detach(), before["alphas_cell"])


def test_batch_norm_is_per_task_and_leaves_the_running_statistics_alone():
    net = tiny_supernet()
    learner = MetaLearner(net, "maml", inner_steps=2)
    buffers = {k: v.clone() for k, v in net.named_buffers()}
    both = image_tasks(2)
    learner.meta_step(both)
    learner.adapt(both.support_x[0], both.support_y[0])
    learner.evaluate(both)
    for k, v in net.named_buffers():
        assert torch.equal(v, buffers[k]), k
    # a task's adaptation does not depend on the other tasks stacked with it
    alone, stats_alone = learner.adapt_many(stack_episodes([both.task(1)]))
    together, stats_together = learner.adapt_many(both)
    for k in alone:
        torch.testing.assert_close(together[k][1], alone[k][0], rtol=1e-10, atol=1e-12)
    assert stats_together["query_loss"][1].item() == pytest.approx(stats_alone["query_loss"][0].item())
    # and matches the plain per-task loop with fresh buffers in train mode
    reference, _, _ = reference_adapt(net, both.task(1), learner.lrs, 2, create_graph=False)
    for k, v in reference.items():
        torch.testing.assert_close(together[k][1], v.detach(), rtol=1e-9, atol=1e-12)


def test_frozen_alphas_stay_put_and_fix_the_genotype():
    net = tiny_supernet()
    alphas = net.alphas_cell.detach().clone()
    weights = net.classifier.weight.detach().clone()
    learner = MetaLearner(net, "fomaml", inner_steps=2, inner_lr_alphas=5.0, learn_alphas=False)
    learner.meta_step(image_tasks(2))
    assert torch.equal(net.alphas_cell.detach(), alphas)
    assert not torch.equal(net.classifier.weight.detach(), weights)
    task = image_tasks(1).task(0)
    adapted = learner.adapt(task.support_x, task.support_y)
    assert torch.equal(adapted.params["alphas_cell"], alphas)
    assert adapted.genotype == net.derive()


def test_adaptation_api_returns_the_adapted_network_and_its_genotype():
    net = tiny_supernet()
    learner = MetaLearner(net, "maml", inner_steps=3, inner_lr_weights=0.3, inner_lr_alphas=50.0)
    task = image_tasks(1, seed=3).task(0)
    adapted = learner.adapt(task.support_x, task.support_y)
    assert not torch.equal(adapted.params["alphas_cell"], net.alphas_cell.detach())
    genotype = adapted.genotype
    assert net.space.validate(genotype) == genotype
    assert genotype == learner.genotypes({k: v[None] for k, v in adapted.params.items()})[0]
    logits = adapted(task.query_x)
    assert logits.shape == (9, 3)
    assert adapted.accuracy(task.query_x, task.query_y) == pytest.approx(
        (logits.argmax(1) == task.query_y).double().mean().item())
    module = adapted.module().train()
    torch.testing.assert_close(module(task.query_x), logits)
    assert adapted.accuracy(task.query_x, task.query_y) == pytest.approx(learner.evaluate(image_tasks(1, 3)).item())
    # with no inner rate on the alphas, the adapted genotype is the meta-learned one
    still = MetaLearner(tiny_supernet(), "maml", inner_steps=3, inner_lr_alphas=0.0).adapt(task.support_x,
                                                                                           task.support_y)
    assert still.genotype == net.derive()


def synthetic_family(num_classes=40, per_class=20, seed=0):
    """Each class a fixed random 8x8 pattern; examples are that pattern plus noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randn(num_classes, 1, 8, 8, generator=g)
    labels = torch.arange(num_classes).repeat_interleave(per_class)
    images = prototypes[labels] + 0.4 * torch.randn(len(labels), 1, 8, 8, generator=g)
    return split_by_class(fewshot_dataset(images, labels, "synthetic"), (0.7, 0.1, 0.2), seed)


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile"])
def test_meta_training_lowers_the_post_adaptation_query_loss(method):
    splits = synthetic_family()
    test_tasks = EpisodeSampler(splits["test"], 5, 1, 5, seed=1).sample_tasks(40)  # classes never meta-trained on

    def learner():
        torch.manual_seed(0)
        net = SearchNetwork("nb201", C=2, layers=1, num_classes=5, in_channels=1)
        if method == "reptile":
            return MetaLearner(net, method, inner_steps=3, inner_lr_weights=0.2, inner_lr_alphas=0.2,
                               meta_lr_weights=1.0, meta_lr_alphas=1.0)
        return MetaLearner(net, method, inner_steps=2, inner_lr_weights=0.4, inner_lr_alphas=0.4,
                           meta_lr_weights=1e-2, meta_lr_alphas=1e-2)

    untrained, trained = learner(), learner()
    sampler = EpisodeSampler(splits["train"], 5, 1, 5, seed=0)
    for _ in range(20):
        trained.meta_step(sampler.sample_tasks(8))
    loss_untrained = untrained.adapt_many(test_tasks)[1]["query_loss"].mean().item()
    loss_trained = trained.adapt_many(test_tasks)[1]["query_loss"].mean().item()
    # seeds 0-2 measured: improvements of 0.09 to 0.36 nats
    assert loss_trained < loss_untrained - 0.05, (loss_trained, loss_untrained)


def test_bad_learner_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="needs mixing in"):
        MetaLearner(SearchNetwork("nb201", C=2, layers=1, num_classes=3, in_channels=1, mixing="gumbel"))
    with pytest.raises(ValueError, match="unknown meta-learning method 'anil'"):
        MetaLearner(tiny_supernet(), "anil")
    with pytest.raises(ValueError, match="inner_steps must be a positive integer, got 0"):
        MetaLearner(tiny_supernet(), inner_steps=0)
    with pytest.raises(ValueError, match="inner_lr_alphas must be a non-negative finite number"):
        MetaLearner(tiny_supernet(), inner_lr_alphas=-1.0)
    learner = MetaLearner(tiny_supernet())
    episodes = image_tasks(1)
    episodes.support_y[0, 0] = 5
    with pytest.raises(ValueError, match="episode labels reach 5, but the network has 3 outputs"):
        learner.meta_step(episodes)
    with pytest.raises(ValueError, match="expected \\(batch, 1, height, width\\)"):
        learner.adapt(torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.arange(3))


@pytest.mark.parametrize("option, value", [
    ("inner_lr_weights", float("inf")), ("inner_lr_alphas", float("nan")), ("meta_lr_weights", float("-inf")),
    ("meta_lr_alphas", float("nan")), ("meta_lr_weights", True), ("inner_steps", True), ("inner_steps", 2.0),
    ("inner_lr_weights", "0.1"),
])
def test_non_finite_rates_and_bools_are_refused(option, value):
    with pytest.raises(ValueError, match=f"{option} must be a"):
        MetaLearner(tiny_supernet(), **{option: value})


def parameters_and_optimizer(learner):
    state = learner.state_dict()
    return ({k: v.clone() for k, v in state["network"].items()},
            {k: {n: t.clone() for n, t in v.items()} for k, v in state["optimizer"]["state"].items()})


def assert_unchanged(learner, before):
    params, moments = parameters_and_optimizer(learner)
    for k, v in before[0].items():
        assert torch.equal(params[k], v), k
    assert moments.keys() == before[1].keys()
    for k, v in before[1].items():
        for n, t in v.items():
            assert torch.equal(moments[k][n], t), (k, n)


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile"])
def test_a_non_finite_loss_or_gradient_is_refused_before_it_is_applied(method):
    learner = MetaLearner(tiny_supernet(), method, inner_steps=1)
    learner.meta_step(image_tasks(2))  # Adam has moments now: they must survive the refused step too
    before = parameters_and_optimizer(learner)
    episodes = image_tasks(2, seed=1)
    episodes.query_x[1, 0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteUpdate, match="non-finite"):
        learner.meta_step(episodes)
    assert_unchanged(learner, before)
    episodes = image_tasks(2, seed=1)
    episodes.support_x[0, 2, 0, 3, 3] = float("inf")
    with pytest.raises(NonFiniteUpdate, match="non-finite"):
        learner.meta_step(episodes)
    assert_unchanged(learner, before)
    learner.meta_step(image_tasks(2, seed=1))  # and it goes on from where it was


@pytest.mark.parametrize("rate", [1e7, 1e300])
def test_rates_that_overflow_a_float32_step_are_refused(rate):
    # 1e300 is finite, but Adam's float32 step then raises from deep inside torch
    with pytest.raises(ValueError, match="meta_lr_weights must be a non-negative finite number at most"):
        MetaLearner(tiny_supernet(), "fomaml", meta_lr_weights=rate)


def test_an_update_that_turns_a_weight_non_finite_is_undone():
    learner = MetaLearner(tiny_supernet(), "reptile", inner_steps=1)
    learner.meta_step(image_tasks(2))
    before = parameters_and_optimizer(learner)
    step = learner.optimizer.step

    def overflowing_step():  # what a finite but huge direction times the rate does in float32
        step()
        with torch.no_grad():
            learner.network.classifier.weight[0, 0] = float("inf")

    learner.optimizer.step = overflowing_step
    with pytest.raises(NonFiniteUpdate, match="the update made classifier.weight non-finite"):
        learner.meta_step(image_tasks(2, seed=1))
    assert_unchanged(learner, before)


# --- the folded path (supernet.meta.folded) against the reference path ---------------------------
def supernet_pair(dtype):
    torch.manual_seed(0)
    return SearchNetwork("nb201", C=2, layers=1, num_classes=3, in_channels=1).to(dtype)


def rms_error(got, expected):
    """||got - expected|| / ||expected||: steadier than elementwise tolerances for reductions."""
    return ((got.double() - expected).norm() / expected.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("method", ["maml", "fomaml", "reptile"])
@pytest.mark.parametrize("learn_alphas", [True, False])
def test_folded_meta_gradient_equals_the_reference_path(method, learn_alphas):
    options = dict(inner_steps=2, inner_lr_weights=0.3, inner_lr_alphas=0.9, learn_alphas=learn_alphas)
    episodes = image_tasks(3)
    # float64: the same numbers to rounding
    ref64, stats64 = MetaLearner(supernet_pair(torch.float64), method, folded=False, **options).meta_gradient(episodes)
    folded_learner = MetaLearner(supernet_pair(torch.float64), method, **options)
    assert folded_learner.folded is not None  # the default takes the folded path for nb201
    got64, got_stats = folded_learner.meta_gradient(episodes)
    assert set(got64) == set(ref64)
    for name in ref64:
        torch.testing.assert_close(got64[name], ref64[name], rtol=1e-9, atol=1e-12, msg=name)
    assert got_stats == pytest.approx(stats64, rel=1e-9)
    # float32: rounding, amplified through the inner loop, puts the float32 reference path 1e-6 to 6e-6 (relative
    # RMS) from the float64 result here; the folded path sums in other orders and takes its 1x1 convolutions'
    # batch statistics from their inputs' covariance, and lands within 10x of that (a wrong term is off by 1e-2+)
    episodes32 = Episode(*(t.float() if t.is_floating_point() else t for t in (
        episodes.support_x, episodes.support_y, episodes.query_x, episodes.query_y, episodes.classes)))
    ref32, _ = MetaLearner(supernet_pair(torch.float32), method, folded=False, **options).meta_gradient(episodes32)
    got32, _ = MetaLearner(supernet_pair(torch.float32), method, **options).meta_gradient(episodes32)
    for name in ref64:
        if ref64[name].norm() < 1e-6:  # conv biases before a batch norm: zero but for rounding
            assert got32[name].abs().max() < 1e-6, name
            continue
        allowed = 10 * max(rms_error(ref32[name], ref64[name]), 2e-6)
        assert rms_error(got32[name], ref64[name]) <= allowed, name


def test_folded_adaptation_equals_the_reference_path():
    episodes = image_tasks(3, seed=2)
    options = dict(inner_steps=3, inner_lr_weights=0.3, inner_lr_alphas=2.0)
    reference = MetaLearner(supernet_pair(torch.float64), "fomaml", folded=False, **options)
    folded = MetaLearner(supernet_pair(torch.float64), "fomaml", **options)
    expected, expected_stats = reference.adapt_many(episodes)
    got, stats = folded.adapt_many(episodes)
    assert set(got) == set(expected)
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-9, atol=1e-12, msg=name)
    for key in expected_stats:
        torch.testing.assert_close(stats[key], expected_stats[key], rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(folded.evaluate(episodes), reference.evaluate(episodes))


def test_networks_the_folded_path_does_not_cover_run_the_reference_path():
    partial = SearchNetwork("nb201", C=4, layers=1, num_classes=3, in_channels=1, mixing="partial")
    assert MetaLearner(partial).folded is None
    with pytest.raises(ValueError, match="folded=True, but the folded path does not cover mixing 'partial'"):
        MetaLearner(partial, folded=True)
    darts = SearchNetwork("darts", C=4, layers=2, num_classes=3, in_channels=1)
    assert MetaLearner(darts).folded is None
    assert MetaLearner(tiny_supernet(), folded=False).folded is None
