"""The search run: checks everything, opens the run folder, searches, retrains and writes the results.

`search()` is the one writer of a search run folder; `load_run()` reads one back.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from . import data as data_module
from . import devices, distributed, plots, runs
from .eval_network import count_parameters
from .retrain import RETRAINED, train_from_scratch
from .search_config import SearchConfig, build_network
from .search_loop import Searcher
from .search_network import SearchNetwork
from .spaces import get_space
from .tensorboard import check_available as check_tensorboard
from .tensorboard import open_events


@dataclass
class SearchResult:
    """What `supernet.search` returns: the genotype, the per-epoch history and the run folder's files."""

    genotype: Any
    history: dict
    run_dir: Path
    paths: dict[str, Path]
    results: dict = field(default_factory=dict)

    @property
    def test_accuracy(self) -> float | None:
        """Test accuracy of the derived architecture retrained from scratch (None if not retrained)."""
        return (self.results.get("derived") or {}).get("test_accuracy")

    @property
    def random_accuracy(self) -> float | None:
        """Test accuracy of a random architecture retrained with the same budget."""
        return (self.results.get("random") or {}).get("test_accuracy")


def _resolve_config(options: dict, resume: Path | None, data_tensors: data_module.Pair | None) -> SearchConfig:
    if data_tensors is not None:
        data_module.check_tensors(*data_tensors)
        options = {**options, "dataset": options.get("dataset", "tensors"),
                   "data_fingerprint": data_module.fingerprint(*data_tensors)}
    if resume is None:
        return SearchConfig.from_dict(options)
    return SearchConfig.from_dict(runs.resume_config(resume, options))


def _expected_config(config: SearchConfig, resume: Path) -> dict:
    """The config a resumed checkpoint must hold; fields added since it was written count at their defaults."""
    stored = runs.read_checkpoint_config(resume / runs.CHECKPOINT)
    expected = config.to_dict()
    for f in fields(SearchConfig):
        if f.name not in stored and expected[f.name] == f.default:
            del expected[f.name]
    return expected


def load_config_split(config: SearchConfig, data: data_module.Pair | None) -> data_module.Split:
    """The data split a config searches on."""
    return data_module.load_split(config.dataset, config.seed, config.data_dir, data, config.val_fraction,
                                  config.test_fraction, config.max_train)


def search(*, resume: "str | Path | None" = None, data: data_module.Pair | None = None, out: "str | Path" = "runs",
           run_dir: "str | Path | None" = None, quiet: bool = True,
           callback: Callable[[Searcher], None] | None = None,
           on_run_dir: Callable[[Path], None] | None = None, device: "str | torch.device" = "auto",
           compile: bool = False, tensorboard: bool = False, **options: Any) -> SearchResult:
    """Runs a one-shot search (then retrains the result and a random architecture) and writes a run folder.

    `options` are `SearchConfig` fields (method, epochs, C, ...). `data=(images, labels)` searches on
    your tensors. `resume=RUN_DIR` continues an interrupted run; options given then must match it.
    `callback(searcher)` is called after every step (for monitoring or tests); `on_run_dir(path)` once
    the run folder exists. Every check runs before the folder is made, so a refused run leaves none.

    `device` is auto|cpu|cuda|cuda:N (auto: a GPU when there is one); `compile=True` runs the search
    step through torch.compile (its first-step time is reported). `tensorboard=True` also writes
    TensorBoard events (losses, accuracies, learning rate, per-edge alpha softmaxes, cell drawings) into
    `<run_dir>/tensorboard/` (the optional tensorboard extra). Started by torchrun (or inside an
    open torch.distributed process group), the search is data parallel: each rank takes
    batch_size / world_size of every global batch, gradients are averaged, and rank 0 alone writes the
    run folder, the log and the plots and retrains; the other ranks return after the search.
    """
    dev = devices.resolve_device(device)
    opened = distributed.setup(dev)
    try:
        return _search(resume, data, out, run_dir, quiet, callback, on_run_dir, dev, compile, tensorboard, options)
    finally:
        distributed.teardown(opened)


def _search(resume, data, out, run_dir, quiet, callback, on_run_dir, device, compile, tensorboard,
            options) -> SearchResult:
    check_tensorboard(tensorboard)
    main = distributed.is_main()
    if resume is not None:
        resume = Path(resume)
        if not resume.is_dir():
            raise ValueError(f"cannot resume: {str(resume)!r} is not a run folder")
        run_dir = resume
    config = _resolve_config(options, resume, data)
    split = load_config_split(config, data)
    if config.retrain_epochs > 0:
        data_module.steps_per_epoch(len(split.train_val[0]), config.retrain_batch_size)
    searcher = Searcher(config, split, quiet=quiet, callback=callback, device=device,
                        compile=compile)  # checks batch sizes, the device, the precision and the network
    stored = (runs.load_checkpoint(resume / runs.CHECKPOINT, _expected_config(config, resume), map_location=device)
              if resume is not None else None)
    if stored is not None:
        searcher.load_state(stored)  # before the folder is touched: a refused world size leaves it as it was

    # one writer: rank 0 makes the folder; the others learn its path (or why it failed)
    run_dir = distributed.on_main(lambda: runs.open_run_dir(run_dir, out, f"search-{config.method}",
                                                            resume=resume is not None), "sharing the run folder")
    if on_run_dir is not None:
        on_run_dir(run_dir)
    if not quiet and main:
        print(f"run folder: {run_dir}", file=sys.stderr)
    log = runs.RunLog(run_dir / runs.LOG) if main else (lambda message: None)
    searcher.checkpoint_path, searcher.log = run_dir / runs.CHECKPOINT, log
    if main:
        searcher.events = open_events(run_dir, tensorboard)
    if stored is not None:
        searcher.last_checkpoint = searcher.checkpoint_path
    if main:
        runs.atomic_write_json(config.to_dict(), run_dir / runs.CONFIG)
    where = (f" on {searcher.world} ranks ({config.batch_size // searcher.world} examples "
             "per rank and batch)" if searcher.world > 1 else "")
    if stored is not None:
        log(f"resumed at epoch {searcher.epoch + 1}, step {searcher.step + 1}, device {device}{where}")
    else:
        log(f"search started: {config.method} on {config.dataset}, seed {config.seed}, device {device}, "
            f"precision {config.precision}{where}")
    try:
        genotype = searcher.run()
    except distributed.PeerFailure as err:
        resume_hint = (f"the last checkpoint is {str(searcher.last_checkpoint)!r}; continue with --resume {run_dir} "
                       "under the same world size" if searcher.last_checkpoint
                       else "no checkpoint was written yet: start the run again")
        raise distributed.PeerFailure(f"{err}; {resume_hint}") from None
    search_seconds = searcher.seconds()
    log(f"searched genotype: {searcher.net.space.format(genotype)}")
    if not main:  # rank 0 alone retrains and writes the results
        return SearchResult(genotype, searcher.history, run_dir, {},
                            {"genotype": searcher.net.space.format(genotype), "rank": searcher.rank})

    results: dict[str, Any] = {
        "genotype": searcher.net.space.format(genotype), "method": config.method, "space": config.space,
        "dataset": config.dataset, "seed": config.seed, "config": config.to_dict(),
        "search": {"seconds": search_seconds, "final_val_accuracy":
                   searcher.history["epochs"][-1]["val_accuracy"] if searcher.history["epochs"] else None,
                   "supernet_parameters": count_parameters(searcher.net), "device": str(device),
                   "precision": config.precision, "world_size": searcher.world,
                   "per_rank_batch_size": config.batch_size // searcher.world,
                   "compile_seconds": searcher.compile_seconds},
        "versions": runs.library_versions(),
    }
    if config.retrain_epochs > 0:
        results["derived"] = train_from_scratch(genotype, config, split, config.seed + 1, quiet, "retrain derived",
                                                device=device, save_to=run_dir / RETRAINED.format("derived"))
        log(f"derived architecture: test accuracy {results['derived']['test_accuracy']:.4f}")
        random_genotype = searcher.net.space.random_genotype(random.Random(config.seed))
        results["random"] = train_from_scratch(random_genotype, config, split, config.seed + 1, quiet,
                                               "retrain random", device=device,
                                               save_to=run_dir / RETRAINED.format("random"))
        log(f"random architecture: test accuracy {results['random']['test_accuracy']:.4f}")
    results["total_seconds"] = search_seconds + sum(results[k]["seconds"] for k in ("derived", "random")
                                                    if k in results)

    paths = {"run_dir": run_dir, "config": run_dir / runs.CONFIG, "checkpoint": run_dir / runs.CHECKPOINT,
             "results": run_dir / runs.RESULTS, "alpha_history": run_dir / runs.ALPHA_HISTORY,
             "log": run_dir / runs.LOG,
             **{f"retrained_{k}": run_dir / RETRAINED.format(k) for k in ("derived", "random") if k in results}}
    space = get_space(config.space)
    runs.atomic_write_json({"ops": list(space.ops), "edges": [list(e) for e in space.edges],
                            "epochs": list(range(len(searcher.history["alphas"]))),
                            "softmax_alphas": searcher.history["alphas"]}, paths["alpha_history"])
    if searcher.learns_alphas:
        paths["alpha_plot"] = plots.plot_alpha_history(searcher.history["alphas"], space, run_dir / "alphas.png")
    if searcher.history["epochs"]:
        paths["collapse_plot"] = plots.plot_collapse(searcher.history["epochs"], run_dir / "collapse.png")
    for ct in space.cell_types:
        paths[f"cell_{ct}"] = plots.plot_cell(genotype, space, ct, run_dir / f"cell_{ct}.png")
    results["paths"] = {k: str(v) for k, v in paths.items()}
    results["history"] = searcher.history["epochs"]
    if "projections" in searcher.history:  # perturbation-based selection: each edge's choice and its scores
        results["projections"] = searcher.history["projections"]
    runs.atomic_write_json(results, paths["results"])
    events = searcher.events
    events.scalars(0, {f"{k}_test_accuracy": results[k]["test_accuracy"] for k in ("derived", "random")
                       if k in results}, prefix="retrain/")
    for name, path in paths.items():
        if str(path).endswith(".png"):
            events.image_file(f"search/{name}", path)
    events.close()
    log(f"results written to {paths['results']}")
    return SearchResult(genotype, searcher.history, run_dir, paths, results)


@dataclass
class LoadedRun:
    """A search run rebuilt from its folder: the trained supernet, its config and its data split."""

    network: SearchNetwork  # with the checkpoint's weights and alphas, in eval mode
    config: SearchConfig
    split: data_module.Split  # the same train / val / test tensors the search saw
    genotype: Any  # the searched genotype (None if the search had not finished)
    state: dict  # the raw checkpoint state (position, history, optimizer states)


def load_run(run_dir: "str | Path", data: "data_module.Pair | None" = None,
             device: "str | torch.device" = "cpu") -> LoadedRun:
    """Rebuilds a search run's SearchNetwork (on `device`: auto|cpu|cuda|cuda:N), config and data split.

    The checkpoint may have been written on any device; the split's tensors stay on the CPU.

    Pass `data=(images, labels)` again for a run searched on your own tensors (its fingerprint is checked).
    Typical use, evaluating a subnetwork with inherited weights (SPOS-style BN re-estimation):
        run = load_run("runs/search-spos-...")
        with preserved_batchnorm(run.network):
            sub = recalibrate_batchnorm(run.network.subnet(genotype), batches_of(run.split.train), 4)
            acc = supernet.search_loop.accuracy(sub, run.split.val)
    """
    run_dir = Path(run_dir)
    device = devices.resolve_device(device)
    state = runs.load_checkpoint(run_dir / runs.CHECKPOINT, map_location=device)
    config = SearchConfig.from_dict(state["config"])
    if data is not None and config.data_fingerprint != data_module.fingerprint(*data):
        raise ValueError(f"the tensors passed as data are not the ones run {str(run_dir)!r} was searched on")
    split = load_config_split(config, data)
    network = build_network(config, split.num_classes, split.in_channels).to(device)
    network.load_state_dict(state["net"])
    network.eval()
    genotype = None if state["genotype"] is None else network.space.parse(state["genotype"])
    return LoadedRun(network, config, split, genotype, state)
