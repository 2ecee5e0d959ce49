"""`supernet meta` runs: results with confidence intervals, checkpoints that resume exactly, clear errors."""

import errno
import json

import numpy as np
import pytest
import torch

from supernet import runs
from supernet.cli import main
from supernet.meta import confidence_interval, meta_learn
from supernet.meta.run import MetaRun

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


def test_an_edited_checkpoint_header_is_refused(tmp_path):
    def stop(run):
        raise Stop

    with pytest.raises(Stop):
        meta_learn(run_dir=tmp_path / "run", callback=stop, **TINY)
    checkpoint = tmp_path / "run" / runs.CHECKPOINT
    data = checkpoint.read_bytes()
    assert data.count(b'"meta_steps": 4,') == 1  # the header is JSON text in the file
    checkpoint.write_bytes(data.replace(b'"meta_steps": 4,', b'"meta_steps": 9,'))
    with pytest.raises(ValueError, match="corrupt: its header and contents do not match"):
        meta_learn(resume=tmp_path / "run")
    with pytest.raises(ValueError, match="corrupt"):
        meta_learn(resume=tmp_path / "run", meta_steps=9)


def test_a_folder_holding_a_run_or_other_files_is_refused_untouched(tmp_path):
    def stop(run):
        raise Stop

    with pytest.raises(Stop):
        meta_learn(run_dir=tmp_path / "run", callback=stop, **TINY)
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    with pytest.raises(ValueError, match="already holds a run; resume it"):
        meta_learn(run_dir=tmp_path / "run", **{**TINY, "seed": 1})
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / runs.CONFIG).write_text("my own file")
    with pytest.raises(ValueError, match="exists and is not an empty folder"):
        meta_learn(run_dir=tmp_path / "mine", **TINY)
    assert (tmp_path / "mine" / runs.CONFIG).read_text() == "my own file"
    with pytest.raises(ValueError, match="name different folders"):
        meta_learn(resume=tmp_path / "run", run_dir=tmp_path / "mine")


@pytest.mark.parametrize("options", [{"n_way": 9}, {"inner_lr_alphas": float("nan")}, {"space": "nope"},
                                     {"split_fractions": (0.5, 0.5, 0.5)}, {"meta_batch": True},
                                     {"rotations": "no"}, {"meta_lr_weights": float("inf")}])
def test_a_run_that_cannot_start_leaves_no_folder(tmp_path, options):
    with pytest.raises(ValueError):
        meta_learn(run_dir=tmp_path / "run", out=tmp_path / "out", **{**TINY, **options})
    assert not list(tmp_path.iterdir())


def test_a_diverging_run_stops_before_saving_and_names_a_resumable_checkpoint(tmp_path, finished):
    def poison(run):  # after the checkpoint of meta-step 2: the next meta-step sees NaN weights
        if run.phase == "meta" and run.step == 2:
            with torch.no_grad():
                run.learners["meta"].network.classifier.weight.fill_(float("nan"))

    checkpoint = tmp_path / "run" / runs.CHECKPOINT
    with pytest.raises(ValueError) as err:
        meta_learn(run_dir=tmp_path / "run", callback=poison, **TINY)
    message = str(err.value)
    assert "meta-training 'meta' stopped at meta-step 3" in message and "non-finite" in message
    assert f"the last checkpoint, {str(checkpoint)!r} (learner 'meta', meta-step 2), is kept" in message
    resumed = meta_learn(resume=tmp_path / "run")  # that checkpoint holds the state before the poison
    assert resumed.results["test"] == finished.results["test"]


def test_a_learning_rate_that_diverges_at_once_names_the_initial_checkpoint(tmp_path):
    with pytest.raises(ValueError, match=r"stopped at meta-step 1: .*non-finite; the last checkpoint, .* "
                                         r"\(learner 'meta', meta-step 0\), is kept"):
        meta_learn(run_dir=tmp_path / "run", **{**TINY, "inner_lr_weights": 1e6, "inner_steps": 3})
    state = runs.load_checkpoint(tmp_path / "run" / runs.CHECKPOINT)
    assert all(torch.isfinite(v).all() for v in state["learners"]["meta"]["network"].values())


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
    (["--inner-lr-weights", "inf"], ["inner_lr_weights must be a non-negative finite number", "inf"]),
    (["--meta-lr-alphas", "nan"], ["meta_lr_alphas must be a non-negative finite number", "nan"]),
    (["--meta-lr-weights", "1e300"], ["meta_lr_weights", "at most"]),
    (["--split-fractions", "nan", "0.5", "0.5"], ["split fraction train", "nan"]),
    (["--image-size", "2"], ["image_size must be an integer >= 4, got 2"]),
])
def test_cli_bad_inputs_are_one_clear_line(tmp_path, capsys, argv, words):
    assert main(["meta", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet meta: error:") and len(err.strip().splitlines()) == 1
    for word in words:
        assert word in err
    assert not list(tmp_path.iterdir())  # no run folder for a run that cannot start


@pytest.mark.parametrize("where", ["out", "run-dir"])
def test_cli_unusable_folders_are_one_clear_line(tmp_path, capsys, where):
    (tmp_path / "a-file").write_text("")
    assert main(["meta", f"--{where}", str(tmp_path / "a-file" / "runs"), "--quiet", *tiny_argv()]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet meta: error:") and len(err.strip().splitlines()) == 1
    assert str(tmp_path / "a-file" / "runs") in err or str(tmp_path / "a-file") in err


def test_cli_a_full_disk_is_one_clear_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "fsync", full)
    assert main(["meta", "--out", str(tmp_path), "--quiet", *tiny_argv()]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "No space left on device" in err
    (run_dir,) = tmp_path.iterdir()
    assert f"cannot write {str(run_dir / runs.CONFIG)!r}" in err


def test_cli_ctrl_c_under_quiet_names_the_run_folder_which_resumes(tmp_path, capsys, monkeypatch, finished):
    def interrupted(run):
        raise KeyboardInterrupt

    monkeypatch.setattr(MetaRun, "run", interrupted)
    assert main(["meta", "--out", str(tmp_path), "--quiet", *tiny_argv()]) == 130
    out, err = capsys.readouterr()
    (run_dir,) = tmp_path.iterdir()
    assert not out and err.strip() == f"supernet meta: interrupted; continue with: supernet meta --resume {run_dir}"
    monkeypatch.undo()
    assert main(["meta", "--resume", str(run_dir), "--quiet"]) == 0
    assert json.loads((run_dir / runs.RESULTS).read_text())["test"] == json.loads(
        json.dumps(finished.results["test"]))


def tiny_argv():
    argv = []
    for key, value in TINY.items():
        argv += ["--" + key.replace("_", "-"), str(value)]
    return argv


def test_cli_runs_and_prints_the_comparison(tmp_path, capsys):
    assert main(["meta", "--out", str(tmp_path), "--quiet", "--no-baselines", *tiny_argv()]) == 0
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
