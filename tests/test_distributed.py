"""Data-parallel search over 2 gloo processes on the CPU: same genotype and alphas as one process with the
same global batch, rank 0 alone writes, a dead rank stops the other with a clear error, and the run resumes."""

import json
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp

import supernet
from supernet.search_run import load_run

TINY = dict(space="darts", C=4, layers=2, epochs=1, batch_size=16, steps_per_epoch=3, max_train=128,
            spos_candidates=3, retrain_epochs=0)
METHODS = ["darts", "darts-2nd", "gdas", "pc-darts", "spos"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, jobs: list, kill_at: int | None) -> None:
    """One rank: torchrun's environment, one thread; runs each job's search and saves what it got.

    One job: `search` opens and closes the process group from the environment, as under torchrun.
    Several: the worker opens one group for all of them (a group the caller owns, which `search` uses).
    """
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      SUPERNET_DIST_TIMEOUT="20" if kill_at is not None else "120")
    torch.set_num_threads(1)
    from supernet import runs

    if len(jobs) > 1:
        import datetime

        torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))

    writes: list[str] = []
    if rank != 0:  # record any file this rank would write
        real_atomic, real_log = runs._atomic, runs.RunLog.__call__
        runs._atomic = lambda path, write: (writes.append(str(path)), real_atomic(path, write))[1]
        runs.RunLog.__call__ = lambda self, msg: (writes.append("log"), real_log(self, msg))[1]
    report: dict = {"rank": rank, "results": {}, "writes": writes}
    try:
        for name, options in jobs:
            callback = None
            if kill_at is not None and rank == 1:
                def callback(searcher):
                    if searcher.epoch * searcher.steps + searcher.step == kill_at:
                        os._exit(3)  # a rank that dies without a word
            began = time.perf_counter()
            if name == "cli":
                from supernet.cli import main

                report["results"][name] = {"rc": main(options["argv"])}
                continue
            result = supernet.search(device="cpu", callback=callback, **options)
            run = load_run(result.run_dir) if rank == 0 else None
            report["results"][name] = {
                "genotype": result.results["genotype"], "seconds": time.perf_counter() - began,
                "alphas": [a.tolist() for a in run.network.arch_parameters()] if run else None}
    except Exception as err:  # noqa: BLE001
        report["error"] = f"{type(err).__name__}: {err}"
        report["traceback"] = traceback.format_exc()
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)


def launch(tmp_path, jobs, kill_at=None, world=2, timeout=240) -> list[dict]:
    """Starts `world` ranks (spawned processes, torchrun's environment) and returns their reports."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, str(tmp_path), jobs, kill_at)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(deadline - time.monotonic(), 1))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, f"ranks still running after {timeout} s"
    reports = []
    for r in range(world):
        path = tmp_path / f"rank{r}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
        if path.exists():
            path.unlink()
    return reports


def test_two_ranks_match_one_process_with_the_same_global_batch(tmp_path):
    jobs = [(m, dict(TINY, method=m, run_dir=str(tmp_path / f"dp-{m}"))) for m in METHODS]
    reports = launch(tmp_path, jobs)
    for r in reports:
        assert r is not None and "error" not in r, r and r.get("traceback")
    # rank 1 wrote nothing; rank 0 wrote each run folder once
    assert reports[1]["writes"] == []
    for m in METHODS:
        run_dir = tmp_path / f"dp-{m}"
        assert {"config.json", "checkpoint.pt", "results.json", "log.txt"} <= {p.name for p in run_dir.iterdir()}
        results = json.loads((run_dir / "results.json").read_text())
        assert results["search"]["world_size"] == 2 and results["search"]["per_rank_batch_size"] == 8
        assert (run_dir / "log.txt").read_text().count("search started") == 1
        # every rank derived the same genotype
        assert reports[0]["results"][m]["genotype"] == reports[1]["results"][m]["genotype"]
        # one process, the same global batch of 16 cut into 2 batch-norm groups of 8 (the ranks' statistics)
        single = supernet.search(device="cpu", method=m, micro_batches=2, run_dir=tmp_path / f"one-{m}",
                                 **{k: v for k, v in TINY.items()})
        assert single.results["genotype"] == reports[0]["results"][m]["genotype"], m
        alphas = [a.detach() for a in load_run(single.run_dir).network.arch_parameters()]
        for a, b in zip(alphas, reports[0]["results"][m]["alphas"], strict=True):
            torch.testing.assert_close(a, torch.tensor(b), rtol=1e-5, atol=1e-6, msg=m)


def test_a_dead_rank_stops_the_other_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "run"
    options = dict(TINY, method="gdas", epochs=2, checkpoint_every=1, run_dir=str(run_dir))
    began = time.monotonic()
    reports = launch(tmp_path, [("gdas", options)], kill_at=3)
    assert reports[1] is None  # rank 1 died
    assert "PeerFailure" in reports[0]["error"] and "--resume" in reports[0]["error"], reports[0]
    assert time.monotonic() - began < 120
    stored = torch.load  # noqa: F841 (the checkpoint is whole and holds the dead rank's world size)
    from supernet import runs
    assert runs.load_checkpoint(run_dir / runs.CHECKPOINT)["world_size"] == 2

    # another world size is refused, naming it
    with pytest.raises(ValueError, match="2 rank"):
        supernet.search(device="cpu", resume=run_dir)

    resumed = launch(tmp_path, [("gdas", dict(resume=str(run_dir)))])
    assert all("error" not in r for r in resumed), resumed
    whole = launch(tmp_path, [("gdas", dict(options, checkpoint_every=1, run_dir=str(tmp_path / "whole")))])
    assert resumed[0]["results"]["gdas"]["genotype"] == whole[0]["results"]["gdas"]["genotype"]
    for a, b in zip(resumed[0]["results"]["gdas"]["alphas"], whole[0]["results"]["gdas"]["alphas"], strict=True):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), rtol=0, atol=0)


def _history(path):
    return [(t["arch"], t["reward"], t["metrics"]) for t in json.loads(path.read_text())["history"]]


def test_sample_scores_candidates_across_ranks_with_one_process_history(tmp_path):
    from supernet.cli import main

    run = supernet.search(device="cpu", method="spos", run_dir=tmp_path / "supernet", **TINY)
    argv = ["sample", "--run", str(run.run_dir), "--strategy", "random", "evolution", "--budget", "4",
            "--bn-batches", "1", "--device", "cpu", "--quiet", "--threads", "1"]
    assert main(argv + ["--out", str(tmp_path / "one")]) == 0
    reports = launch(tmp_path, [("cli", {"argv": argv + ["--out", str(tmp_path / "two")]})])
    assert [r["results"]["cli"]["rc"] for r in reports] == [0, 0], reports
    assert reports[1]["writes"] == []
    for name in ("random", "evolution"):
        assert _history(tmp_path / "two" / f"{name}.json") == _history(tmp_path / "one" / f"{name}.json")
    assert (tmp_path / "two" / "summary.json").is_file()
