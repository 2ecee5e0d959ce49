"""Devices, mixed precision, opt-in compile and `python -m supernet`: the run owns the device and precision."""

import json
import subprocess
import sys

import pytest
import torch

import supernet
from supernet import data, devices, runs
from supernet.cli import main
from supernet.search_config import SearchConfig
from supernet.search_loop import Searcher

TINY = dict(C=4, layers=2, epochs=1, batch_size=16, steps_per_epoch=2, max_train=128, spos_candidates=2,
            retrain_epochs=0)
NO_GPU = not torch.cuda.is_available()


def test_device_strings(monkeypatch):
    assert devices.resolve_device("cpu") == torch.device("cpu")
    assert devices.resolve_device("auto") == (torch.device("cuda", 0) if not NO_GPU else torch.device("cpu"))
    assert devices.resolve_device(torch.device("cpu")) == torch.device("cpu")
    for bad in ("tpu", "cuda:x", "cuda:-1", 3):
        with pytest.raises(ValueError, match="device"):
            devices.resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a pretend 1-GPU machine
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("cuda:0") == devices.resolve_device("cuda") == torch.device("cuda", 0)
    with pytest.raises(ValueError, match="only 1 CUDA GPU"):
        devices.resolve_device("cuda:3")
    monkeypatch.setenv("LOCAL_RANK", "1")  # under torchrun: the LOCAL_RANK-th GPU
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.resolve_device("auto") == devices.resolve_device("cuda") == torch.device("cuda", 1)


@pytest.mark.skipif(not NO_GPU, reason="checks the message on a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path, capsys):
    for spec in ("cuda", "cuda:0"):
        with pytest.raises(ValueError, match="no CUDA GPU.*--device cpu"):
            devices.resolve_device(spec)
    with pytest.raises(ValueError, match="no CUDA GPU"):
        supernet.search(device="cuda", out=tmp_path, **TINY)
    assert not any(tmp_path.iterdir())  # refused before a run folder was made
    assert main(["search", "--device", "cuda", "--out", str(tmp_path), "--quiet"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


@pytest.fixture(scope="module")
def split():
    return data.load_split("digits", seed=0, max_train=TINY["max_train"])


@pytest.mark.parametrize("method", ["darts", "gdas"])
def test_bf16_autocast_searches_with_finite_fp32_alphas(method, split):
    searcher = Searcher(SearchConfig(method=method, precision="bf16", **TINY), split, device="cpu")
    before = [a.detach().clone() for a in searcher.net.arch_parameters()]
    searcher.run()
    for a, b in zip(searcher.net.arch_parameters(), before, strict=True):
        assert a.dtype == torch.float32 and torch.isfinite(a).all() and not torch.equal(a, b)
    assert all(p.dtype == torch.float32 for p in searcher.net.parameters())


def test_fp16_uses_a_gradient_scaler_or_is_refused_clearly(split, monkeypatch):
    if devices.fp16_supported(torch.device("cpu")) is None:
        searcher = Searcher(SearchConfig(precision="fp16", **TINY), split, device="cpu")
        assert searcher.precision.scaler is not None
        searcher.run()
        assert all(torch.isfinite(a).all() for a in searcher.net.arch_parameters())
        assert searcher.state()["scaler"] is not None
    monkeypatch.setattr(devices, "fp16_supported", lambda device: "no half kernels here")
    with pytest.raises(ValueError, match="fp16 is not supported on cpu.*no half kernels.*bf16"):
        Searcher(SearchConfig(precision="fp16", **TINY), split, device="cpu")
    with pytest.raises(ValueError, match="darts-2nd"):
        SearchConfig(method="darts-2nd", precision="fp16")
    with pytest.raises(ValueError, match="precision"):
        SearchConfig(precision="fp8")


def test_bf16_runs_the_per_edge_path_not_the_fp32_batched_cells(split, monkeypatch):
    from supernet import batched_cell

    calls = []
    real = batched_cell.cell_nodes
    monkeypatch.setattr(batched_cell, "cell_nodes", lambda *a, **k: calls.append(1) or real(*a, **k))
    Searcher(SearchConfig(precision="bf16", **TINY), split, device="cpu").run()
    assert not calls, "the batched CPU cells are measured and written for fp32 only"
    Searcher(SearchConfig(**TINY), split, device="cpu").run()
    assert calls, "in fp32 they run"


def test_micro_batches_must_divide_the_batch():
    with pytest.raises(ValueError, match="multiple of micro_batches"):
        SearchConfig(batch_size=10, micro_batches=4)


class Stop(Exception):
    pass


def test_a_checkpoint_resumes_under_another_device_string(tmp_path, monkeypatch):
    options = dict(TINY, method="gdas", epochs=2, checkpoint_every=1)
    whole = supernet.search(device="cpu", run_dir=tmp_path / "whole", **options)

    def stop(searcher):
        if searcher.epoch * searcher.steps + searcher.step == 3:
            raise Stop

    with pytest.raises(Stop):
        supernet.search(device="cpu", run_dir=tmp_path / "cut", callback=stop, **options)
    seen = []
    real = runs.load_checkpoint
    monkeypatch.setattr(runs, "load_checkpoint", lambda *a, **k: (seen.append(k.get("map_location")), real(*a, **k))[1])
    resumed = supernet.search(device="auto", resume=tmp_path / "cut")  # auto: cuda where there is one
    assert seen == [devices.resolve_device("auto")]
    assert resumed.results["genotype"] == whole.results["genotype"]
    a = supernet.load_run(resumed.run_dir).network.arch_parameters()
    b = supernet.load_run(whole.run_dir, device="cpu").network.arch_parameters()
    for x, y in zip(a, b, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(NO_GPU, reason="needs a CUDA GPU")
def test_cuda_search_and_a_cuda_checkpoint_on_the_cpu(tmp_path):
    result = supernet.search(device="cuda", precision="bf16", run_dir=tmp_path / "gpu", **TINY)
    run = supernet.load_run(result.run_dir, device="cpu")
    assert all(p.device.type == "cpu" and torch.isfinite(p).all() for p in run.network.arch_parameters())
    assert result.results["search"]["device"].startswith("cuda")


def test_compile_is_opt_in_and_its_time_is_reported(tmp_path, monkeypatch):
    compiled = []

    def fake_compile(module, **kwargs):  # inductor needs minutes on 2 cores; the wiring is what is tested
        compiled.append(module)
        return module.forward

    monkeypatch.setattr(torch, "compile", fake_compile)
    plain = supernet.search(device="cpu", run_dir=tmp_path / "plain", **TINY)
    assert plain.results["search"]["compile_seconds"] is None and not compiled
    result = supernet.search(device="cpu", compile=True, run_dir=tmp_path / "compiled", **TINY)
    assert len(compiled) == 1
    seconds = json.loads((result.run_dir / "results.json").read_text())["search"]["compile_seconds"]
    assert seconds > 0 and "compile" in (result.run_dir / "log.txt").read_text()
    assert result.results["genotype"] == plain.results["genotype"]


def test_python_dash_m_supernet():
    out = subprocess.run([sys.executable, "-m", "supernet", "search", "--help"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "--device" in out.stdout and "--precision" in out.stdout
    out = subprocess.run([sys.executable, "-m", "supernet", "search", "--device", "tpu", "--quiet"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "unknown device 'tpu'" in out.stderr


def test_meta_learner_and_evaluator_take_a_device(tmp_path):
    from strategies.evaluators import SupernetEvaluator, batches
    from supernet.meta.episodes import Episode
    from supernet.meta.learner import MetaLearner

    net = supernet.SearchNetwork("nb201", C=4, layers=1, num_classes=3, in_channels=1)
    learner = MetaLearner(net, "fomaml", inner_steps=1, device="cpu")
    assert learner.device == torch.device("cpu")
    x, y = torch.randn(6, 1, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    stats = learner.meta_step(Episode(x, y, x, y, torch.arange(3)))
    assert stats and all(torch.isfinite(p).all() for p in net.arch_parameters())
    if NO_GPU:
        with pytest.raises(ValueError, match="no CUDA GPU"):
            MetaLearner(supernet.SearchNetwork("nb201", C=4, layers=1, num_classes=3, in_channels=1), device="cuda")
        with pytest.raises(ValueError, match="no CUDA GPU"):
            SupernetEvaluator(net, batches(x, y, 3), batches(x, y, 3), device="cuda")
    spos = supernet.SearchNetwork("nb201", C=4, layers=1, num_classes=3, in_channels=1, mixing="sample")
    ev = SupernetEvaluator(spos, batches(x, y, 3), batches(x, y, 3), bn_batches=1, device="cpu")
    assert 0 <= ev(spos.space.random_genotype(__import__("random").Random(0))).reward <= 100
