"""Search loops on tiny real runs: every method, resume bit-identity, divergence, checkpoints, run folders."""

import json
import math
import shutil

import pytest
import torch

import supernet
from supernet import data, runs
from supernet.search_config import METHODS, SearchConfig
from supernet.search_loop import DivergenceError, Searcher, weight_optimizer

TINY = dict(C=4, layers=3, epochs=2, batch_size=16, steps_per_epoch=2, max_train=128, spos_candidates=3,
            retrain_epochs=0)



@pytest.fixture(scope="module")
def split():
    return data.load_split("digits", seed=0, max_train=TINY["max_train"])


class Interrupt(Exception):
    pass


def stop_at(global_step):
    def callback(searcher):
        if searcher.epoch * searcher.steps + searcher.step == global_step:
            raise Interrupt
    return callback


def whole_and_resumed(config, split, tmp_path, interrupt_after):
    """A whole run, and a run interrupted after global step `interrupt_after`, loaded back from its last
    checkpoint (for the caller to run on)."""
    whole = Searcher(config, split, tmp_path / "whole.pt")
    whole.run()
    interrupted = Searcher(config, split, tmp_path / "cut.pt", callback=stop_at(interrupt_after))
    with pytest.raises(Interrupt):
        interrupted.run()
    resumed = Searcher(config, split, tmp_path / "cut.pt")
    resumed.load_state(runs.load_checkpoint(tmp_path / "cut.pt", config.to_dict()))
    return whole, resumed


def assert_same_end(resumed, whole):
    """A resumed run ended where the whole run did: weights, alphas and buffers, the weights' momentum, the
    genotype and the history."""
    for (name, a), b in zip(resumed.net.state_dict().items(), whole.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    for p, q in zip(resumed.w_opt.state.values(), whole.w_opt.state.values(), strict=True):
        assert torch.equal(p["momentum_buffer"], q["momentum_buffer"])
    assert resumed.genotype == whole.genotype
    assert resumed.history == whole.history


def test_the_weights_step_is_torchs_sgd_up_to_rounding():
    """The search loop's fused SGD (momentum, weight decay) moves the weights as torch's per-tensor SGD does,
    also for a weight that gets its first gradient steps after the others (an op GDAS had not sampled yet)."""
    torch.manual_seed(0)
    config = SearchConfig(**TINY)
    shapes = [(8, 4, 3, 3), (8,), (3, 5)]
    ours = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    plain = [p.detach().clone().requires_grad_() for p in ours]
    opt = weight_optimizer(ours, config)
    ref = torch.optim.SGD(plain, lr=config.w_lr, momentum=config.w_momentum, weight_decay=config.w_weight_decay)
    assert opt.defaults["fused"]
    for step in range(6):
        for i, (p, q) in enumerate(zip(ours, plain)):
            late = i == 2 and step < 3
            p.grad = None if late else torch.randn_like(p)
            q.grad = None if late else p.grad.clone()
        opt.step()
        ref.step()
    for p, q in zip(ours, plain):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_searches(method, split):
    options = dict(TINY, arch_warmup_epochs=1) if method == "pc-darts" else TINY
    searcher = Searcher(SearchConfig(method=method, **options), split)
    weights_before = [w.detach().clone() for w in searcher.net.weight_parameters()]
    arch_before = [a.detach().clone() for a in searcher.net.arch_parameters()]
    genotype = searcher.run()

    space = searcher.net.space
    assert space.validate(genotype) == genotype
    assert searcher.epoch == 2 and searcher.search_done
    # Every method trains the stem and the classifier (single-path methods leave unsampled ops alone).
    changed = [not torch.equal(w, b) for w, b in zip(searcher.net.weight_parameters(), weights_before, strict=True)]
    names = [n for n, p in searcher.net.named_parameters() if not n.startswith(("alphas", "betas"))]
    assert all(c for n, c in zip(names, changed, strict=True) if n.startswith(("stem", "classifier")))
    moved = [not torch.equal(a, b) for a, b in zip(searcher.net.arch_parameters(), arch_before, strict=True)]
    assert all(moved) if METHODS[method].arch_order else not any(moved)
    records = searcher.history["epochs"]
    assert len(records) == 2 and len(searcher.history["alphas"]) == 3
    assert all(math.isfinite(r["train_loss"]) and 0 <= r["val_accuracy"] <= 1 for r in records)
    if method == "gdas":
        assert [r["tau"] for r in records] == [10.0, pytest.approx(0.1)]
    if method == "pc-darts":  # one warm-up epoch: alphas still where they started after it
        assert searcher.history["alphas"][1] == searcher.history["alphas"][0] != searcher.history["alphas"][2]
        assert len(searcher.net.arch_parameters()) == 4  # alphas and edge-normalisation betas


def test_augmentation_is_on_for_cifar10_only_unless_chosen_and_changes_the_search(split):
    assert SearchConfig(dataset="cifar10", data_dir="x").augment and not SearchConfig().augment
    assert SearchConfig(augment=True).augment and not SearchConfig(dataset="cifar10", data_dir="x", augment=False).augment
    with pytest.raises(ValueError, match="augment must be True or False"):
        SearchConfig(augment="yes")
    alphas = {}
    for augment in (False, True):
        searcher = Searcher(SearchConfig(augment=augment, **dict(TINY, epochs=1)), split)
        searcher.run()
        alphas[augment] = [a.detach().clone() for a in searcher.net.arch_parameters()]
    assert not all(torch.equal(a, b) for a, b in zip(alphas[False], alphas[True]))


@pytest.mark.parametrize("method, interrupt_after, augment", [("darts", 3, False), ("gdas", 5, False),
                                                             ("pc-darts", 4, False), ("spos", 4, False),
                                                             ("darts", 4, True)])
def test_resume_is_bit_identical(method, interrupt_after, augment, split, tmp_path):
    # Checkpoints every 2 steps and at epoch ends; the interruption falls right after a checkpoint at
    # steps 3 and 5, and one step past one at step 4, so resuming must replay that lost step exactly
    # (with augmentation: the same crops and flips). darts-2nd shares darts's path; its own extra state is
    # none, and its steps are the slowest.
    config = SearchConfig(method=method, augment=augment, **dict(TINY, steps_per_epoch=3, checkpoint_every=2))
    whole, resumed = whole_and_resumed(config, split, tmp_path, interrupt_after)
    assert resumed.epoch * resumed.steps + resumed.step <= interrupt_after
    resumed.run()

    for a, b in zip(resumed.net.arch_parameters(), whole.net.arch_parameters(), strict=True):
        assert torch.equal(a, b)
    for (name, a), b in zip(resumed.net.state_dict().items(), whole.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.genotype == whole.genotype
    assert resumed.history["epochs"] == whole.history["epochs"]


def test_divergence_names_the_step_and_keeps_the_last_checkpoint(split, tmp_path):
    def poison(searcher):
        if searcher.epoch == 1 and searcher.step == 1:
            with torch.no_grad():
                searcher.net.classifier.weight.fill_(float("nan"))

    path = tmp_path / "checkpoint.pt"
    searcher = Searcher(SearchConfig(**dict(TINY, steps_per_epoch=3, checkpoint_every=2)), split, path, callback=poison)
    with pytest.raises(DivergenceError) as err:
        searcher.run()
    message = str(err.value)
    assert "epoch 2, step 2" in message and str(path) in message
    state = runs.load_checkpoint(path)
    assert (state["epoch"], state["step"]) == (1, 0)
    assert all(torch.isfinite(t).all() for t in state["net"].values() if t.is_floating_point())


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "whole"
    options = dict(TINY, retrain_epochs=1, retrain_C=4, retrain_layers=2)
    return supernet.search(run_dir=run_dir, **options), options


def test_search_writes_a_complete_run_folder(finished):
    result, options = finished
    assert isinstance(result, supernet.SearchResult)
    results = json.loads((result.run_dir / "results.json").read_text())
    assert results["genotype"] == str(result.genotype) and results["seed"] == 0
    assert results["config"] == SearchConfig(**options).to_dict()
    assert {"torch", "numpy", "python", "supernet"} <= set(results["versions"])
    for part in ("derived", "random"):
        assert 0.0 <= results[part]["test_accuracy"] <= 1.0 and results[part]["seconds"] > 0
    assert result.test_accuracy == results["derived"]["test_accuracy"]
    history = json.loads((result.run_dir / "alpha_history.json").read_text())
    assert len(history["softmax_alphas"]) == options["epochs"] + 1
    row = history["softmax_alphas"][-1]["normal"][0]
    assert len(row) == len(history["ops"]) and sum(row) == pytest.approx(1.0)
    for name in ("alphas.png", "cell_normal.png", "cell_reduce.png"):
        assert (result.run_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "searched genotype" in (result.run_dir / "log.txt").read_text()


def test_load_run_rebuilds_the_trained_supernet(finished):
    result, _ = finished
    run = supernet.load_run(result.run_dir)
    assert run.genotype == result.genotype and run.network.derive() == result.genotype
    final = result.history["alphas"][-1]
    for ct in run.network.space.cell_types:
        assert torch.softmax(run.network.alphas(ct), -1).tolist() == final[ct]
    assert torch.equal(run.split.test[1], data.load_split("digits", 0, max_train=TINY["max_train"]).test[1])
    assert not run.network.training


def test_interrupted_search_resumes_to_the_same_results(finished, tmp_path):
    result, options = finished
    with pytest.raises(Interrupt):
        supernet.search(run_dir=tmp_path, callback=stop_at(4), checkpoint_every=1, **options)
    with pytest.raises(ValueError, match="different config: checkpoint_every=1 in the checkpoint, 0 here"):
        supernet.search(resume=tmp_path, checkpoint_every=0)
    resumed = supernet.search(resume=tmp_path)
    assert resumed.genotype == result.genotype
    assert resumed.results["derived"]["test_accuracy"] == result.results["derived"]["test_accuracy"]
    assert resumed.history["alphas"] == result.history["alphas"]


def test_corrupt_or_foreign_checkpoints_are_refused(finished, tmp_path):
    result, _ = finished
    run_dir = tmp_path / "copy"
    shutil.copytree(result.run_dir, run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    with pytest.raises(ValueError, match="different config: epochs=2 in the checkpoint, 5 here"):
        supernet.search(resume=run_dir, epochs=5)
    raw = bytearray(checkpoint.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    checkpoint.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is corrupt: its header and contents do not match the stored checksum"):
        supernet.search(resume=run_dir)
    checkpoint.write_bytes(bytes(raw[:1000]))
    with pytest.raises(ValueError, match="is corrupt"):
        runs.load_checkpoint(checkpoint)
    checkpoint.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="does not start with the supernet checkpoint marker"):
        supernet.load_run(run_dir)
    with pytest.raises(ValueError, match="is not a run folder"):
        supernet.search(resume=tmp_path / "missing")


@pytest.mark.parametrize("options, message", [
    (dict(epochs="3"), "epochs must be a positive integer, got '3'"),
    (dict(C=2.5), "C must be a positive integer, got 2.5"),
    (dict(w_lr=float("inf")), "w_lr must be a positive finite number, got inf"),
    (dict(method="gdas", a_lr=float("inf")), "a_lr must be a positive finite number, got inf"),
    (dict(a_lr=-1.0), "a_lr must be a positive finite number, got -1.0"),
    (dict(w_momentum=-0.5), "w_momentum must be a non-negative finite number below 1.0, got -0.5"),
    (dict(grad_clip=float("nan")), "grad_clip must be a positive finite number, got nan"),
    (dict(val_fraction=1.5), "val_fraction must be a number in (0, 1), got 1.5"),
    (dict(arch_warmup_epochs=6), "arch_warmup_epochs=6 must be below epochs=6"),
    (dict(method="nope"), "unknown method 'nope'"),
    (dict(dataset="mnist"), "unknown dataset 'mnist'"),
    (dict(data_dir=3), "data_dir must be a string or None, got 3"),
    (dict(retrain_nesterov="yes"), "retrain_nesterov must be True or False, got 'yes'"),
    (dict(retrain_momentum=0.0), "retrain_nesterov needs a positive retrain_momentum"),
    (dict(retrain_weight_decay=-1e-4), "retrain_weight_decay must be a non-negative finite number"),
])
def test_config_refuses_bad_values_clearly(options, message):
    with pytest.raises(ValueError) as err:
        SearchConfig(**options)
    assert message in str(err.value)


def test_warm_up_may_cover_every_epoch_only_where_no_alphas_are_learned():
    assert SearchConfig(method="spos", epochs=2, arch_warmup_epochs=2).arch_warmup_epochs == 2
    assert SearchConfig(method="darts", epochs=2, arch_warmup_epochs=1).arch_warmup_epochs == 1


@pytest.mark.parametrize("options, message", [
    (dict(epochs="3"), "epochs must be a positive integer"),
    (dict(a_lr=-1.0), "a_lr must be a positive finite number"),
    (dict(method="pc-darts", partial_k=3), "cannot divide C=4 channels"),
    (dict(batch_size=100000), "batch_size=100000 is larger than"),
    (dict(retrain_epochs=1, retrain_batch_size=100000), "batch_size=100000 is larger than"),
    (dict(data=(torch.rand(40, 1, 6, 6), torch.zeros(40, dtype=torch.long))), "at least two classes"),
])
def test_a_refused_search_leaves_no_run_folder(options, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        supernet.search(out=tmp_path / "runs", **{**TINY, **options})
    with pytest.raises(ValueError, match=message):
        supernet.search(run_dir=tmp_path / "mine", **{**TINY, **options})
    assert not any(tmp_path.iterdir())


def test_a_folder_that_is_not_a_run_is_not_overwritten(tmp_path):
    (tmp_path / "config.json").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        supernet.search(run_dir=tmp_path, **TINY)
    assert (tmp_path / "config.json").read_text() == "mine"


@pytest.mark.parametrize("parameters", ["weights", "alphas"])
def test_non_finite_gradients_stop_the_run_before_they_are_applied(parameters, split, tmp_path):
    searcher = Searcher(SearchConfig(**TINY), split, tmp_path / "checkpoint.pt")
    watched = searcher.net.weight_parameters() if parameters == "weights" else searcher.net.arch_parameters()
    watched[-1].register_hook(lambda grad: grad * float("nan"))
    before = [t.detach().clone() for t in watched]
    with pytest.raises(DivergenceError, match="the gradient of the .* became nan at epoch 1, step 1"):
        searcher.run()
    for t, b in zip(watched, before, strict=True):
        assert torch.equal(t, b)
    assert not (tmp_path / "checkpoint.pt").exists()


def test_a_non_finite_state_is_never_checkpointed(split, tmp_path):
    def poison(searcher):  # a batch-norm statistic goes bad after a step whose loss was finite
        if (searcher.epoch, searcher.step) == (0, 2):
            searcher.net.stem[1].running_var.fill_(float("inf"))

    path = tmp_path / "checkpoint.pt"
    searcher = Searcher(SearchConfig(**dict(TINY, steps_per_epoch=3, checkpoint_every=1)), split, path,
                        callback=poison)
    with pytest.raises(DivergenceError, match=r"1 tensors of the network or optimizer state are not finite"):
        searcher.run()
    state = runs.load_checkpoint(path)
    assert (state["epoch"], state["step"]) == (0, 2)
    assert all(torch.isfinite(t).all() for t in state["net"].values() if t.is_floating_point())


def test_an_edited_checkpoint_header_is_refused(finished, tmp_path):
    result, _ = finished
    run_dir = tmp_path / "copy"
    shutil.copytree(result.run_dir, run_dir)
    checkpoint = run_dir / "checkpoint.pt"
    raw = checkpoint.read_bytes()
    assert raw.count(b'"epochs": 2') == 1
    checkpoint.write_bytes(raw.replace(b'"epochs": 2', b'"epochs": 9'))
    with pytest.raises(ValueError, match="is corrupt: its header and contents do not match the stored checksum"):
        supernet.search(resume=run_dir)
    with pytest.raises(ValueError, match="is corrupt"):
        supernet.load_run(run_dir)


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_run_files_get_the_users_umask(umask, mode, tmp_path):
    import os

    old = os.umask(umask)
    try:
        json_file = runs.atomic_write_json({"a": 1}, tmp_path / "a.json")
        checkpoint = runs.save_checkpoint(tmp_path / "checkpoint.pt", {"config": {}})
    finally:
        os.umask(old)
    assert json_file.stat().st_mode & 0o777 == mode
    assert checkpoint.stat().st_mode & 0o777 == mode


def test_run_folder_io_imports_nothing_above_it():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(runs))
    relative = [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level]
    absolute = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert relative == [] and not any(name.startswith("supernet") for name in absolute)
    assert supernet.load_run.__module__ == "supernet.search_run"


def test_retraining_settings_are_config_fields(split):
    from supernet.retrain import train_from_scratch

    genotype = supernet.get_space("darts").random_genotype(__import__("random").Random(0))
    base = dict(TINY, retrain_epochs=1, retrain_C=4, retrain_layers=2, retrain_batch_size=64)
    a = train_from_scratch(genotype, SearchConfig(**base), split, seed=1)
    b = train_from_scratch(genotype, SearchConfig(**base, retrain_momentum=0.5, retrain_nesterov=False,
                                                  retrain_weight_decay=0.0, retrain_grad_clip=0.1), split, seed=1)
    assert math.isfinite(a["final_train_loss"]) and a["final_train_loss"] != b["final_train_loss"]
