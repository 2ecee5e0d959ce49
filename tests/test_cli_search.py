"""`supernet search` on the command line: options, errors, a tiny real run, and a killed run resumed."""

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from supernet import cli, load_run, runs
from supernet.search_config import METHODS, SearchConfig

TINY = ["--C", "4", "--layers", "3", "--epochs", "2", "--batch-size", "16", "--steps-per-epoch", "3",
        "--max-train", "128", "--retrain-epochs", "1", "--retrain-C", "4", "--retrain-layers", "2",
        "--checkpoint-every", "1", "--threads", "1"]


@pytest.fixture(autouse=True)
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_help_documents_every_option_and_method(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search", "--help"])
    assert exit_.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for f in dataclasses.fields(SearchConfig):
        if f.name != "data_fingerprint":
            assert "--" + f.name.replace("_", "-") in text
    for method in METHODS:
        assert method in text
    for option in ("--resume", "--quiet", "--out", "--data-file"):
        assert option in text


@pytest.mark.parametrize("argv, message", [
    (["--method", "nope"], "invalid choice: 'nope'"),
    (["--epochs", "abc"], "invalid int value: 'abc'"),
    (["--retrain-nesterov", "maybe"], "expected true or false, got 'maybe'"),
    (["--augment", "sometimes"], "expected true or false, got 'sometimes'"),
])
def test_malformed_options_are_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["search", *argv])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "epochs must be a positive integer, got 0"),
    (["--dataset", "cifar10"], "needs data_dir"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent/cifar"], "CIFAR-10 not found at '/nonexistent/cifar'"),
    (["--dataset", "tensors"], "--dataset tensors needs --data-file"),
    (["--data-file", "/nonexistent/x.pt"], "--data-file '/nonexistent/x.pt' does not exist"),
    (["--resume", "/nonexistent/run"], "'/nonexistent/run' is not a run folder"),
    (["--threads", "0"], "--threads must be a positive integer"),
    (["--tau-min", "20", "--method", "gdas"], "tau_min=20.0 must not exceed tau_max=10.0"),
    (["--a-lr", "-1"], "a_lr must be a positive finite number, got -1.0"),
    (["--w-momentum", "-0.5"], "w_momentum must be a non-negative finite number below 1.0, got -0.5"),
    (["--method", "pc-darts", "--C", "4", "--partial-k", "3"], "cannot divide C=4 channels"),
    (["--batch-size", "100000", "--max-train", "128"], "batch_size=100000 is larger than"),
    (["--w-lr", "inf"], "w_lr must be a positive finite number, got inf"),
    (["--method", "gdas", "--a-lr", "inf"], "a_lr must be a positive finite number, got inf"),
    (["--arch-warmup-epochs", "6"], "arch_warmup_epochs=6 must be below epochs=6"),
    (["--dataset", "digits", "--data-file", "x.pt"], "--dataset digits and --data-file both name the data"),
    (["--retrain-nesterov", "true", "--retrain-momentum", "0"], "needs a positive retrain_momentum"),
])
def test_bad_values_are_one_line_errors(argv, message, capsys, tmp_path):
    assert cli.main(["search", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet search: error:") and message in err and "Traceback" not in err
    assert not any(tmp_path.iterdir()), "no run folder is created for a refused command"


@pytest.fixture(scope="module")
def uninterrupted_with_output(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("cli") / "whole"
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert cli.main(["search", *TINY, "--run-dir", str(run_dir), "--quiet"]) == 0
    return run_dir, out.getvalue() + err.getvalue()


@pytest.fixture
def uninterrupted(uninterrupted_with_output):
    return uninterrupted_with_output[0]


def test_quiet_run_prints_nothing_and_writes_results(uninterrupted_with_output):
    uninterrupted, printed = uninterrupted_with_output
    assert printed == ""
    results = json.loads((uninterrupted / "results.json").read_text())
    assert results["config"]["epochs"] == 2 and results["method"] == "darts"
    assert 0 <= results["derived"]["test_accuracy"] <= 1


def test_tensors_from_a_file_and_progress_output(tmp_path, capsys):
    x, y = torch.rand(96, 1, 6, 6), torch.arange(96) % 3
    torch.save({"images": x, "labels": y}, tmp_path / "data.pt")
    argv = ["search", *TINY, "--data-file", str(tmp_path / "data.pt"), "--out", str(tmp_path / "runs"),
            "--epochs", "1", "--retrain-epochs", "0"]
    assert cli.main(argv) == 0
    captured = capsys.readouterr()
    assert "genotype: Genotype(" in captured.out
    assert "search (darts)" in captured.err and "run folder:" in captured.err
    (run_dir,) = (tmp_path / "runs").iterdir()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["dataset"] == "tensors" and config["data_fingerprint"]
    loaded = load_run(run_dir, data=(x, y))
    assert loaded.split.num_classes == 3
    with pytest.raises(ValueError, match="not the ones"):
        load_run(run_dir, data=(x + 1, y))


# The search CLI in a child process that stops itself (SIGSTOP) right after writing its step-2 checkpoint, so the
# test kills it at a known point however fast the steps run and however loaded the cores are.
STOP_AFTER_STEP_2 = """
import os, signal, sys
from supernet import cli, runs
save = runs.save_checkpoint
def save_then_stop(path, state):
    out = save(path, state)
    if state["step"] == 2 and not state["search_done"]:
        os.kill(os.getpid(), signal.SIGSTOP)
    return out
runs.save_checkpoint = save_then_stop
sys.exit(cli.main(sys.argv[1:]))
"""


def test_killed_run_resumes_to_identical_alphas(uninterrupted, tmp_path, capsys):
    run_dir = tmp_path / "killed"
    env = dict(os.environ, PYTHONHASHSEED="0")
    proc = subprocess.Popen([sys.executable, "-c", STOP_AFTER_STEP_2, "search", *TINY, "--run-dir", str(run_dir),
                             "--quiet"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, status = os.waitpid(proc.pid, os.WUNTRACED)  # returns when the child stops itself (or exits)
        assert os.WIFSTOPPED(status), proc.stderr.read().decode()
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    checkpoint = run_dir / "checkpoint.pt"
    state = runs.load_checkpoint(checkpoint)
    assert state["step"] == 2 and not state["search_done"] and not (run_dir / "results.json").exists()

    assert cli.main(["search", "--resume", str(run_dir), "--epochs", "3", "--quiet"]) == 2
    assert "different config: epochs=2 in the checkpoint, 3 here" in capsys.readouterr().err
    assert cli.main(["search", "--resume", str(run_dir), "--quiet", "--threads", "1"]) == 0

    a, b = runs.load_checkpoint(checkpoint), runs.load_checkpoint(uninterrupted / "checkpoint.pt")
    for name, tensor in a["net"].items():
        assert torch.equal(tensor, b["net"][name]), name
    ra = json.loads((run_dir / "results.json").read_text())
    rb = json.loads((uninterrupted / "results.json").read_text())
    assert ra["genotype"] == rb["genotype"] and ra["derived"] == {**rb["derived"], "seconds": ra["derived"]["seconds"]}


def test_an_existing_run_folder_is_not_overwritten(uninterrupted, capsys):
    before = (uninterrupted / "checkpoint.pt").read_bytes()
    assert cli.main(["search", *TINY, "--run-dir", str(uninterrupted), "--quiet"]) == 2
    assert "already holds a run; resume it" in capsys.readouterr().err
    assert (uninterrupted / "checkpoint.pt").read_bytes() == before


class _RunsCode:
    """A pickle payload that, unpickled without restriction, would create `marker`."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _data_file(tmp_path, kind):
    x, y = torch.rand(96, 1, 6, 6), torch.arange(96) % 3
    path = tmp_path / "data" / f"{kind}.pt"
    path.parent.mkdir(exist_ok=True)
    if kind == "nan":
        x[3, 0, 2, 2] = float("nan")
    if kind == "inf":
        x[3, 0, 2, 2] = float("inf")
    obj = {"nan": (x, y), "inf": (x, y), "one-class": (x, torch.zeros(96, dtype=torch.long)),
           "wrong-keys": {"x": x, "y": y}, "code": {"images": _RunsCode(tmp_path / "marker"), "labels": y},
           "int-images": (torch.zeros(96, 1, 6, 6, dtype=torch.uint8), y)}.get(kind)
    if kind == "garbage":
        path.write_bytes(b"not a torch file")
    else:
        torch.save(obj, path)
    return path


@pytest.mark.parametrize("kind, message", [
    ("nan", "1 image values are NaN or infinite"),
    ("inf", "1 image values are NaN or infinite"),
    ("one-class", "all 96 labels are class 0; a search needs at least two classes"),
    ("wrong-keys", "holds a dict with keys ['x', 'y']; expected exactly ['images', 'labels']"),
    ("code", "holds objects other than tensors and plain containers; it is not loaded, since unpickling them"),
    ("garbage", "cannot be read as a torch file"),
    ("int-images", "expected a floating-point tensor (N, C, H, W)"),
])
def test_bad_data_files_are_one_line_errors_naming_the_file(kind, message, tmp_path, capsys):
    path = _data_file(tmp_path, kind)
    assert cli.main(["search", *TINY, "--data-file", str(path), "--out", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet search: error:") and err.count("\n") == 1 and message in err
    assert "weights_only" not in err and "Traceback" not in err
    assert str(path) in err or kind == "one-class"
    assert not (tmp_path / "runs").exists() and not (tmp_path / "marker").exists()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_data_files_with_other_float_images_are_converted(dtype, tmp_path):
    path = tmp_path / "data.pt"
    torch.save((torch.rand(96, 1, 6, 6).to(dtype), torch.arange(96) % 3), path)
    argv = ["search", *TINY, "--data-file", str(path), "--run-dir", str(tmp_path / "run"), "--epochs", "1",
            "--steps-per-epoch", "1", "--retrain-epochs", "0", "--quiet"]
    assert cli.main(argv) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["dataset"] == "tensors"


@pytest.mark.parametrize("option", ["--out", "--run-dir"])
def test_an_unusable_output_folder_is_a_one_line_error(option, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    target = blocker / "runs" if option == "--out" else blocker / "run"
    assert cli.main(["search", *TINY, option, str(target), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("supernet search: error: cannot create") and str(blocker) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_ctrl_c_under_quiet_names_the_real_run_folder(tmp_path, capsys, monkeypatch):
    from supernet.search_loop import Searcher

    def interrupt(self, train, val):
        raise KeyboardInterrupt

    monkeypatch.setattr(Searcher, "train_step", interrupt)
    assert cli.main(["search", *TINY, "--out", str(tmp_path), "--quiet"]) == 130
    (run_dir,) = tmp_path.iterdir()
    assert f"continue with: supernet search --resume {run_dir}" in capsys.readouterr().err


def test_a_diverged_run_names_a_finite_checkpoint_that_resumes(tmp_path, capsys):
    run_dir = tmp_path / "run"
    argv = ["search", *TINY, "--w-lr", "1e6", "--run-dir", str(run_dir), "--quiet"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    checkpoint = run_dir / "checkpoint.pt"
    assert f"the last good checkpoint {str(checkpoint)!r} is left intact" in err
    state = runs.load_checkpoint(checkpoint)
    tensors = [t for part in ("net", "w_opt", "a_opt") for t in _floating(state[part])]
    assert tensors and all(bool(torch.isfinite(t).all()) for t in tensors)
    position = (state["epoch"], state["step"])
    assert cli.main(["search", "--resume", str(run_dir), "--quiet"]) == 1  # loads, then diverges again
    assert f"resumed at epoch {position[0] + 1}, step {position[1] + 1}" in (run_dir / "log.txt").read_text()


def _floating(state):
    if isinstance(state, torch.Tensor):
        return [state] if state.is_floating_point() else []
    if isinstance(state, dict):
        return [t for v in state.values() for t in _floating(v)]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _floating(v)]
    return []
