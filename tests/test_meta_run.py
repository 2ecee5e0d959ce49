"""`supernet meta` runs: results with confidence intervals, checkpoints that resume exactly, clear errors."""

import json

import numpy as np
import pytest
import torch

from supernet import runs
from supernet.cli import main
from supernet.meta import confidence_interval, meta_learn

TINY = dict(C=2, meta_steps=4, meta_batch=2, inner_steps=1, test_inner_steps=1, query=2, test_query=3, val_every=2,
            val_episodes=4, test_episodes=6, checkpoint_every=1)



@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return meta_learn(run_dir=tmp_path_factory.mktemp("meta") / "run", **TINY)


def test_a_run_reports_every_learner_on_the_same_test_episodes(finished):
    test = finished.results["test"]
    assert list(test) == ["meta", "fixed", "none"]
    for r in test.values():
        assert r["episodes"] == TINY["test_episodes"] and 0.0 <= r["accuracy"] <= 1.0 and r["ci95"] >= 0.0
    assert test["meta"]["distinct_adapted_genotypes"] >= 1
    assert finished.paths["curves"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads(finished.paths["results"].read_text())
    assert saved["test"]["meta"]["accuracy"] == test["meta"]["accuracy"]
    assert [r["step"] for r in saved["history"]["meta"]["val"]] == [0, 2, 4]
    assert len(saved["history"]["fixed"]["train"]) == TINY["meta_steps"]
    # the fixed-architecture learner never moved its alphas; the meta learner did
    fixed, meta, none = (finished.learners[n].network for n in ("fixed", "meta", "none"))
    assert torch.equal(fixed.alphas_cell, none.alphas_cell)
    assert not torch.equal(meta.alphas_cell, none.alphas_cell)


class Stop(Exception):
    pass


@pytest.mark.parametrize("phase, step", [("meta", 2), ("fixed", 0), ("fixed", 3)])
def test_an_interrupted_run_resumes_to_the_same_result(tmp_path, finished, phase, step):
    def interrupt(run):
        if run.phase == phase and run.step == step:
            raise Stop

    with pytest.raises(Stop):
        meta_learn(run_dir=tmp_path / "run", callback=interrupt, **TINY)
    resumed = meta_learn(resume=tmp_path / "run")
    assert resumed.results["test"] == finished.results["test"]
    assert resumed.results["history"] == finished.results["history"]
    for name, learner in finished.learners.items():
        for key, value in learner.network.state_dict().items():
            assert torch.equal(resumed.learners[name].network.state_dict()[key], value), (name, key)


def test_resume_refuses_other_configs_and_corrupt_checkpoints(tmp_path):
    def stop(run):
        raise Stop

    with pytest.raises(Stop):
        meta_learn(run_dir=tmp_path / "run", callback=stop, **TINY)
    with pytest.raises(ValueError, match="different config: meta_steps=4 in the checkpoint, 9 here"):
        meta_learn(resume=tmp_path / "run", meta_steps=9)
    checkpoint = tmp_path / "run" / runs.CHECKPOINT
    data = bytearray(checkpoint.read_bytes())
    data[-10] ^= 0xFF
    checkpoint.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        meta_learn(resume=tmp_path / "run")
    with pytest.raises(ValueError, match="not a run folder"):
        meta_learn(resume=tmp_path / "missing")


def test_confidence_interval_is_1_96_standard_errors():
    accs = torch.tensor([0.2, 0.6, 0.8, 1.0, 0.4])
    mean, half = confidence_interval(accs)
    assert mean == pytest.approx(0.6)
    assert half == pytest.approx(1.96 * np.std(accs.numpy(), ddof=1) / np.sqrt(5))


@pytest.mark.parametrize("argv, words", [
    (["--dataset", "omniglot"], ["needs data_dir"]),
    (["--dataset", "omniglot", "--data-dir", "/no/such/omniglot"], ["/no/such/omniglot", "does not exist"]),
    (["--n-way", "9"], ["n_way=9", "8 classes"]),
    (["--k-shot", "500"], ["k_shot + query", "examples of class"]),
    (["--method", "anil"], ["unknown meta-learning method 'anil'"]),
])
def test_cli_bad_inputs_are_one_clear_line(tmp_path, capsys, argv, words):
    assert main(["meta", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet meta: error:") and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err
    assert not list(tmp_path.iterdir())  # no run folder for a run that cannot start


def test_cli_runs_and_prints_the_comparison(tmp_path, capsys):
    argv = ["meta", "--out", str(tmp_path), "--quiet", "--no-baselines"]
    for key, value in TINY.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "meta-learned architecture + weights" in out and "+-" in out and "(6 episodes)" in out
    (run_dir,) = tmp_path.iterdir()
    assert list(json.loads((run_dir / runs.RESULTS).read_text())["test"]) == ["meta"]


def test_omniglot_run(tmp_path, data_dir):
    result = meta_learn(run_dir=tmp_path / "run", dataset="omniglot", data_dir=str(data_dir / "omniglot"),
                        image_size=14, **{**TINY, "meta_steps": 2, "val_every": 2})
    assert result.results["classes"]["train"] + result.results["classes"]["val"] + \
        result.results["classes"]["test"] == 4 * 242
    assert all(0.0 <= r["accuracy"] <= 1.0 for r in result.results["test"].values())
