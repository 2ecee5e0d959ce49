"""--tensorboard: search, sample and meta runs write TensorBoard events that hold what the run measured."""

import json

import pytest

import supernet
from supernet.cli import main as cli_main
from supernet.meta import meta_learn

pytest.importorskip("tensorboard", reason="--tensorboard is the optional tensorboard extra")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def read_events(folder):
    """Every scalar tag -> [(step, value)], and the image and text tags, of the event files under folder."""
    scalars, images, texts = {}, set(), set()
    for path in sorted(folder.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
        acc.Reload()
        tags = acc.Tags()
        # add_scalars writes one run folder per line: its tag is the chart, its folder the line
        line = path.parent.relative_to(folder).as_posix()
        for tag in tags["scalars"]:
            key = tag if line == "." else f"{tag}|{line}"
            scalars.setdefault(key, []).extend((e.step, e.value) for e in acc.Scalars(tag))
        images.update(tags["images"])
        texts.update(tags["tensors"])
    return scalars, images, texts


def test_search_events_hold_losses_alphas_and_cells(tmp_path):
    result = supernet.search(space="nb201", C=4, layers=1, epochs=2, steps_per_epoch=2, batch_size=32,
                             retrain_epochs=1, retrain_C=4, retrain_layers=1, run_dir=tmp_path / "run",
                             tensorboard=True)
    scalars, images, texts = read_events(result.run_dir / "tensorboard")
    history = result.history["epochs"]
    assert [v for _, v in scalars["search/train_loss"]] == pytest.approx([e["train_loss"] for e in history])
    assert [s for s, _ in scalars["search/val_accuracy"]] == [1, 2]
    # one chart per (cell type, edge), one line per op: the softmax of the epoch's alphas
    alphas = result.history["alphas"][-1]["cell"]
    space = supernet.get_space("nb201")
    node, src = space.edges[0]
    for k, op in enumerate(space.ops):
        (step, value), *_ = [e for e in scalars[f"alphas/cell/{src}->{node}|alphas_cell_{src}->{node}_{op}"]
                             if e[0] == 2]
        assert value == pytest.approx(alphas[0][k], abs=1e-6)
    assert scalars["retrain/derived_test_accuracy"][0][1] == pytest.approx(result.test_accuracy)
    assert {"search/cell_cell", "search/alpha_plot"} <= images


def test_sample_events_hold_every_trial(tmp_path):
    out = tmp_path / "out"
    assert cli_main(["sample", "--benchmark", "nb201", "--strategy", "random", "--budget", "6", "--out", str(out),
                     "--quiet", "--tensorboard"]) == 0
    scalars, images, _ = read_events(out / "tensorboard")
    history = json.loads((out / "random.json").read_text())["history"]
    assert [v for _, v in scalars["random/reward"]] == pytest.approx([t["reward"] for t in history])
    best = [max(t["reward"] for t in history[: i + 1]) for i in range(len(history))]
    assert [v for _, v in scalars["random/best_reward"]] == pytest.approx(best)
    assert [s for s, _ in scalars["random/cifar10-test"]] == list(range(1, 7))
    assert "best_reward" in images


def test_meta_events_hold_losses_and_accuracies(tmp_path):
    options = dict(C=2, meta_steps=2, meta_batch=2, inner_steps=1, test_inner_steps=1, query=2, test_query=3,
                   val_every=2, val_episodes=4, test_episodes=4, baselines=False)
    result = meta_learn(run_dir=tmp_path / "run", tensorboard=True, **options)
    scalars, images, _ = read_events(tmp_path / "run" / "tensorboard")
    train = result.results["history"]["meta"]["train"]
    loss_keys = [k for k in scalars if k.startswith("meta/meta_train/")]
    assert loss_keys and all(len(scalars[k]) == len(train) for k in loss_keys)
    assert scalars["test/meta_test_accuracy"][0][1] == pytest.approx(result.results["test"]["meta"]["accuracy"])
    assert "meta_curves" in images


def test_tensorboard_off_writes_nothing(tmp_path):
    result = supernet.search(space="nb201", C=4, layers=1, epochs=1, steps_per_epoch=1, batch_size=32,
                             retrain_epochs=0, run_dir=tmp_path / "run")
    assert not (result.run_dir / "tensorboard").exists()
