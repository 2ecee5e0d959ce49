"""supernet export: the retrained network or the supernet's chosen path as a torch.export program (or ONNX)
that loads and runs without supernet, checked against the in-library model."""

import json
import subprocess
import sys

import pytest
import torch

import supernet
from supernet import EvalNetwork, get_space
from supernet.cli import main as cli_main
from supernet.export import export, export_program
from supernet.retrain import RETRAINED, load_retrained, save_retrained

NB201 = "|nor_conv_3x3~0|+|nor_conv_1x1~0|avg_pool_3x3~1|+|skip_connect~0|nor_conv_3x3~1|none~2|"

# Loads the program with supernet made unimportable, so the file must stand on its own.
LOAD_WITHOUT_SUPERNET = """
import sys, torch
sys.modules["supernet"] = None
program = torch.export.load(sys.argv[1]).module()
x = torch.load(sys.argv[2])
torch.save(program(x), sys.argv[3])
"""


def run_without_supernet(program_file, x, tmp_path):
    torch.save(x, tmp_path / "x.pt")
    subprocess.run([sys.executable, "-c", LOAD_WITHOUT_SUPERNET, str(program_file), str(tmp_path / "x.pt"),
                    str(tmp_path / "y.pt")], check=True, capture_output=True)
    return torch.load(tmp_path / "y.pt")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A finished search with both retrainings (nb201: the quickest space to export)."""
    out = tmp_path_factory.mktemp("runs")
    result = supernet.search(space="nb201", C=4, layers=1, epochs=1, steps_per_epoch=2, batch_size=32,
                             retrain_epochs=1, retrain_C=4, retrain_layers=1, run_dir=out / "run", seed=0)
    return result.run_dir


def test_run_folder_keeps_the_retrained_networks(run_dir):
    model, image_size = load_retrained(run_dir, "derived")
    assert image_size == (8, 8)
    split = supernet.load_run(run_dir).split
    with torch.no_grad():
        accuracy = int((model(split.test[0]).argmax(1) == split.test[1]).sum()) / len(split.test[1])
    results = json.loads((run_dir / "results.json").read_text())
    assert accuracy == pytest.approx(results["derived"]["test_accuracy"], abs=1e-9)
    random_model, _ = load_retrained(run_dir, "random")
    assert random_model.space.format(random_model.genotype) == results["random"]["genotype"]


def test_exported_derived_network_runs_without_supernet_and_matches(run_dir, tmp_path):
    out = tmp_path / "model.pt2"
    assert cli_main(["export", str(run_dir), "--out", str(out)]) == 0
    model, _ = load_retrained(run_dir, "derived")
    x = torch.randn(5, 1, 8, 8)  # another batch size than the one traced: the batch is dynamic
    with torch.no_grad():
        torch.testing.assert_close(run_without_supernet(out, x, tmp_path), model(x), rtol=1e-5, atol=1e-6)


def test_exported_subnet_inherits_the_supernet_weights(run_dir, tmp_path):
    out = tmp_path / "subnet.pt2"
    path = export(run_dir, out, subnet=True)
    run = supernet.load_run(run_dir)
    program = torch.export.load(path).module()
    x = run.split.test[0][:6]
    got = program(x)
    # the same path of the same supernet, batch norm re-estimated the same way, in eval mode
    from supernet.export import _chosen_subnet
    sub, _ = _chosen_subnet(run_dir, None)
    with torch.no_grad():
        torch.testing.assert_close(got, sub(x), rtol=1e-5, atol=1e-6)
    assert set(n.target.namespace for n in program.graph.nodes if n.op == "call_function"
               and hasattr(n.target, "namespace")) <= {"aten"}, "only ATen ops: no supernet custom ops"


def test_export_checks_the_program_against_the_model(tmp_path, monkeypatch):
    model = EvalNetwork("nb201", NB201, C=4, layers=1, num_classes=3, in_channels=1).eval()
    x = torch.randn(2, 1, 8, 8)
    real_export = torch.export.export

    def tampered(module, args, **kwargs):
        program = real_export(module, args, **kwargs)
        with torch.no_grad():
            next(iter(program.state_dict.values())).add_(1.0)  # the program no longer computes the model
        return program

    monkeypatch.setattr(torch.export, "export", tampered)
    with pytest.raises(ValueError, match="differs from the model"):
        export_program(model, x, tmp_path / "m.pt2")
    assert not (tmp_path / "m.pt2").exists()


def test_darts_network_exports_with_its_auxiliary_head_left_out(tmp_path):
    genotype = supernet.DARTS_GENOTYPES["DARTS_V2"]
    model = EvalNetwork("darts", genotype, C=4, layers=3, num_classes=5, in_channels=1, auxiliary=True).eval()
    save_retrained(tmp_path / RETRAINED.format("derived"), model, (8, 8))
    out = export(tmp_path, tmp_path / "m.pt2")
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(torch.export.load(out).module()(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_errors_are_one_line(tmp_path, capsys):
    assert cli_main(["export", str(tmp_path), "--out", str(tmp_path / "m.pt2")]) == 2
    assert "holds no retrained derived network" in capsys.readouterr().err
    model = EvalNetwork("nb201", NB201, C=4, layers=1, num_classes=3, in_channels=1)
    save_retrained(tmp_path / RETRAINED.format("derived"), model, (8, 8))
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(["export", str(tmp_path), "--out", str(blocker / "m.pt2")]) == 2
    assert "cannot write" in capsys.readouterr().err


def test_onnx_export_matches_the_model(tmp_path):
    onnx = pytest.importorskip("onnx", reason="ONNX export is the optional onnx extra")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime checks the ONNX file's outputs")
    model = EvalNetwork("nb201", NB201, C=4, layers=1, num_classes=3, in_channels=1).eval()
    save_retrained(tmp_path / RETRAINED.format("derived"), model, (8, 8))
    out = export(tmp_path, tmp_path / "m.onnx", onnx=True)
    onnx.checker.check_model(onnx.load(str(out)))
    x = torch.randn(4, 1, 8, 8)
    session = ort.InferenceSession(str(out))
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), model(x), rtol=1e-4, atol=1e-5)
    assert get_space("nb201").format(model.genotype) == NB201
