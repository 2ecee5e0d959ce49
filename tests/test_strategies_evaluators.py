"""Evaluators (tabular, supernet), metrics, rewards, Pareto fronts and the `supernet sample` command."""

import csv
import itertools
import json
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import precision_recall_fscore_support
from torch import nn

from strategies import Trial, make_strategy, search
from strategies.evaluators import SupernetEvaluator, TabularBenchmark, TabularEvaluator, batches
from strategies.metrics import TargetReward, classification_metrics, pareto_front, profile
from supernet import SearchNetwork, get_space, recalibrate_batchnorm
from supernet.cli import main as cli_main
from supernet.data import load_digits

NB201 = get_space("nb201")


def all_nb201_archs():
    paths = itertools.product(range(len(NB201.ops)), repeat=NB201.num_edges)
    return [NB201.format(NB201.from_paths({"cell": p})) for p in paths]


@pytest.fixture(scope="module")
def synthetic_table(tmp_path_factory):
    """An NB201-format CSV over all 15,625 cells: 'val' and 'test' from per-edge scores, 'lat_ms' a cost."""
    rng = random.Random(1)
    scores = [[rng.random() for _ in NB201.ops] for _ in NB201.edges]
    path = tmp_path_factory.mktemp("bench") / "table.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["index", "arch", "val", "test", "lat_ms"])
        for i, arch in enumerate(all_nb201_archs()):
            p = NB201.to_paths(NB201.parse(arch))["cell"]
            val = sum(scores[e][k] for e, k in enumerate(p))
            w.writerow([i, arch, f"{val:.6f}", f"{val + 0.01 * p[0]:.6f}", f"{1 + sum(p):.3f}"])
    return path


# --- tabular ------------------------------------------------------------------------------------
def test_tabular_evaluator_answers_the_row_of_the_asked_cell(synthetic_table):
    table = TabularBenchmark.load(synthetic_table)
    assert len(table) == 15625 and table.metrics == ("val", "test", "lat_ms")
    with synthetic_table.open() as f:
        row = next(csv.DictReader(f))
    result = TabularEvaluator(table, "val")(NB201.parse(row["arch"]))
    assert result.reward == pytest.approx(float(row["val"]))
    assert result.metrics == {k: pytest.approx(float(row[k])) for k in ("val", "test", "lat_ms")}


def test_tabular_bad_inputs_are_clear_errors(synthetic_table, tmp_path):
    table = TabularBenchmark.load(synthetic_table)
    with pytest.raises(ValueError, match="unknown metric column 'cifar10-val'.*expected one of"):
        TabularEvaluator(table, "cifar10-val")
    small = tmp_path / "small.csv"
    small.write_text("arch,val\n|none~0|+|none~0|none~1|+|none~0|none~1|none~2|,1.0\n")
    missing = "|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|"
    with pytest.raises(ValueError, match=r"architecture \|nor_conv_3x3~0\|.* is not in"):
        TabularEvaluator(TabularBenchmark.load(small), "val")(NB201.parse(missing))
    with pytest.raises(ValueError, match="does not exist"):
        TabularBenchmark.load(tmp_path / "nope.csv")
    (tmp_path / "noarch.csv").write_text("index,val\n0,1.0\n")
    with pytest.raises(ValueError, match="expected an 'arch' column"):
        TabularBenchmark.load(tmp_path / "noarch.csv")
    (tmp_path / "text.csv").write_text("arch,val\nx,high\n")
    with pytest.raises(ValueError, match=r"text.csv' line 2, column 'val': expected a finite number, got 'high'"):
        TabularBenchmark.load(tmp_path / "text.csv")


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf", "NaN", ""])
def test_a_table_with_a_non_finite_accuracy_is_refused_at_load_naming_file_row_and_column(tmp_path, bad):
    cells = ["|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|",
             "|none~0|+|none~0|none~1|+|none~0|none~1|none~2|"]
    path = tmp_path / "table.csv"
    path.write_text(f"arch,val,lat_ms\n{cells[0]},91.5,3\n{cells[1]},{bad},2\n")
    with pytest.raises(ValueError, match=rf"table.csv' line 3, column 'val': expected a finite number, got '{bad}'"):
        TabularBenchmark.load(path)


def test_a_binary_table_is_a_clear_error_naming_the_file(tmp_path):
    path = tmp_path / "table.csv"
    path.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=r"table.csv' is not a readable CSV text file"):
        TabularBenchmark.load(path)
    path.write_bytes(b"arch,val\nx,1\0\n")  # a NUL byte inside otherwise valid UTF-8
    with pytest.raises(ValueError, match=r"table.csv' (is not a readable CSV|line 2)"):
        TabularBenchmark.load(path)


def test_join_merges_columns_and_refuses_missing_cells(synthetic_table, tmp_path):
    table = TabularBenchmark.load(synthetic_table)
    arch = next(iter(table.rows))
    other = tmp_path / "other.csv"
    other.write_text("arch,raspi4_ms\n" + "".join(f"{a},{i}\n" for i, a in enumerate(table.rows)))
    joined = table.join(TabularBenchmark.load(other))
    assert joined.lookup(NB201.parse(arch)) == {**table.rows[arch], "raspi4_ms": 0.0}
    other.write_text(f"arch,raspi4_ms\n{arch},1\n")
    with pytest.raises(ValueError, match="missing from"):
        table.join(TabularBenchmark.load(other))


def test_strategies_search_the_tabular_benchmark(synthetic_table):
    table = TabularBenchmark.load(synthetic_table)
    strategy = search(make_strategy("evolution", "nb201", 60, 0), TabularEvaluator(table, "val"))
    for trial in strategy.history:
        assert trial.reward == table.rows[trial.arch]["val"]
        assert trial.metrics == table.rows[trial.arch]
    assert strategy.best().reward == max(table.rows[t.arch]["val"] for t in strategy.history)


def test_embedded_nb201_tables_match_the_space_string_form():
    table = TabularBenchmark.load("nb201")
    assert len(table) == 15625
    for metric in ("cifar10-test", "cifar10-val", "cifar100-test", "imagenet-val"):
        table.check_metric(metric)
    # Every arch string is the space's own string form, so lookups by genotype hit.
    assert all(NB201.format(NB201.parse(a)) == a for a in table.rows)
    latency = TabularBenchmark.load("nb201-latency")
    joined = table.join(latency)
    g = NB201.parse("|nor_conv_3x3~0|+|nor_conv_3x3~0|nor_conv_3x3~1|+|skip_connect~0|nor_conv_3x3~1|nor_conv_3x3~2|")
    row = joined.lookup(g)
    assert 0 < row["cifar10-val"] <= 100 and row["raspi4_ms"] > 0 and row["pixel2_ms"] > 0
    assert TabularBenchmark.load("nb201") is table, "parsed once per process"


def test_embedded_tables_equal_their_source_csvs(data_dir):
    for name, file in (("nb201", "nb201_12epoch.csv"), ("nb201-latency", "nb201_latency.csv")):
        assert TabularBenchmark.load(name).rows == TabularBenchmark.load(data_dir / "nb201" / file).rows


def test_a_path_named_like_an_embedded_table_is_read_as_a_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "nb201").write_text("arch,val\n" + f"{NB201.format(NB201.random_genotype(random.Random(0)))},1.0\n")
    assert len(TabularBenchmark.load("nb201")) == 1
    with pytest.raises(ValueError, match="embedded tables"):
        TabularBenchmark.load("nb202")


# --- metrics and rewards -----------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=1, max_size=60))
def test_classification_metrics_match_scikit_learn(data):
    labels = torch.tensor([a for a, _ in data])
    predictions = torch.tensor([b for _, b in data])
    present = sorted(set(labels.tolist()) | set(predictions.tolist()))
    p, r, f, _ = precision_recall_fscore_support(labels, predictions, labels=present, average="macro",
                                                 zero_division=0)
    m = classification_metrics(predictions, labels, 5)
    assert m["accuracy"] == pytest.approx(100 * float((labels == predictions).double().mean()))
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((100 * p, 100 * r, 100 * f))


def test_profile_counts_only_the_modules_that_run():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)  # 3*4*9 + 4 = 112 params, 4*8*8 outputs x 27 MACs
            self.unused = nn.Linear(100, 100)
            self.fc = nn.Linear(4, 10)  # 50 params, 40 MACs

        def forward(self, x):
            return self.fc(self.conv(x).mean((2, 3)))

    out = profile(Net(), torch.randn(5, 3, 8, 8))
    assert out == {"params": 112.0 + 50.0, "flops": 4 * 8 * 8 * 27.0 + 40.0}


def test_target_reward_and_pareto_front_on_hand_computed_values():
    soft = TargetReward("acc", "ms", target=10.0, weight=-0.5)
    assert soft({"acc": 80.0, "ms": 40.0}) == pytest.approx(40.0)  # 80 * 4 ** -0.5
    assert soft({"acc": 80.0, "ms": 2.5}) == pytest.approx(160.0)
    hard = TargetReward("acc", "ms", target=10.0, weight=-0.5, hard=True)
    assert hard({"acc": 80.0, "ms": 2.5}) == 80.0
    with pytest.raises(ValueError, match="reward needs metric 'ms'"):
        soft({"acc": 1.0})
    trials = [Trial("a", 90.0, {"ms": 10.0}), Trial("b", 85.0, {"ms": 5.0}), Trial("c", 80.0, {"ms": 7.0}),
              Trial("d", 95.0, {"ms": 20.0}), Trial("e", 85.0, {"ms": 6.0})]
    front = pareto_front(trials, {"reward": "max", "ms": "min"})
    assert [t.arch for t in front] == ["a", "b", "d"]
    with pytest.raises(ValueError, match="has no metric 'params'"):
        pareto_front(trials, {"params": "min"})


# --- supernet evaluator ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_supernet():
    torch.manual_seed(0)
    net = SearchNetwork("nb201", C=4, layers=1, num_classes=10, in_channels=1, mixing="sample")
    x, y = load_digits()
    train, heldout = batches(x[:96], y[:96], 32), batches(x[96:224], y[96:224], 64)
    # A few single-path steps so batch norm and weights are not at their initial values.
    opt = torch.optim.SGD(net.weight_parameters(), lr=0.05)
    for xb, yb in train:
        opt.zero_grad()
        nn.functional.cross_entropy(net(xb), yb).backward()
        opt.step()
    return net, train, heldout


def test_supernet_evaluator_scores_the_inherited_subnet_and_leaves_the_supernet_alone(small_supernet):
    net, train, heldout = small_supernet
    g = NB201.parse("|nor_conv_3x3~0|+|skip_connect~0|nor_conv_1x1~1|+|none~0|avg_pool_3x3~1|nor_conv_3x3~2|")
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    evaluator = SupernetEvaluator(net, train, heldout, bn_batches=2)
    first = evaluator(g)
    assert net.training
    assert all(torch.equal(buffers[k], v) for k, v in net.state_dict().items())
    assert evaluator(g).metrics == first.metrics  # deterministic

    # Reference: recalibrate the same path by hand on a copy, then count correct predictions.
    import copy
    ref = copy.deepcopy(net).subnet(g)
    recalibrate_batchnorm(ref, train, num_batches=2)
    with torch.no_grad():
        correct = sum(int((ref(x).argmax(1) == y).sum()) for x, y in heldout)
    assert first.metrics["accuracy"] == pytest.approx(100.0 * correct / 128)
    assert first.reward == first.metrics["accuracy"]
    assert set(first.metrics) >= {"precision", "recall", "f1", "params", "flops"}

    # Parameters of the path: everything outside the cells' edges, plus the chosen ops' modules.
    path = NB201.to_paths(g)["cell"]
    outside = sum(p.numel() for n, p in net.named_parameters() if ".edges." not in n and "alphas" not in n)
    chosen = sum(p.numel() for cell in net.cells if hasattr(cell, "edges") for e, k in enumerate(path)
                 if NB201.ops[k] != "none" for p in cell.edges[e].ops[NB201.ops[k]].parameters())
    assert first.metrics["params"] == outside + chosen


def test_supernet_evaluator_drives_a_search_with_a_latency_reward(small_supernet):
    net, train, heldout = small_supernet
    evaluator = SupernetEvaluator(net, train, heldout, bn_batches=1, measure_latency=True, latency_repeats=1,
                                  reward=TargetReward("accuracy", "flops", target=1e5, hard=True))
    strategy = search(make_strategy("random", "nb201", 3, 0), evaluator)
    assert len(strategy.history) == 3
    assert all(t.metrics["latency_ms"] > 0 and t.seconds > 0 for t in strategy.history)
    with pytest.raises(ValueError, match="at least one training batch"):
        SupernetEvaluator(net, [], heldout)


# --- command line ---------------------------------------------------------------------------------------
def test_sample_command_runs_on_the_embedded_nb201_tables(tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--benchmark", "nb201", "--latency-table", "nb201-latency", "--cost", "raspi4_ms",
            "--strategy", "evolution", "--budget", "15", "--out", str(out), "--quiet"]
    assert cli_main(args) == 0
    table = TabularBenchmark.load("nb201").join(TabularBenchmark.load("nb201-latency"))
    history = json.loads((out / "evolution.json").read_text())["history"]
    assert len(history) == 15
    assert all(t["metrics"] == table.rows[t["arch"]] for t in history)


def test_sample_command_writes_history_plot_and_summary_and_resumes(synthetic_table, tmp_path):
    out = tmp_path / "out"
    args = ["sample", "--benchmark", str(synthetic_table), "--metric", "val", "--cost", "lat_ms",
            "--strategy", "random", "evolution", "--budget", "20", "--seed", "3", "--out", str(out)]
    assert cli_main(args) == 0
    for name in ("random", "evolution"):
        state = json.loads((out / f"{name}.json").read_text())
        assert state["strategy"] == name and len(state["history"]) == 20
    assert (out / "best_reward.png").stat().st_size > 0
    summary = json.loads((out / "summary.json").read_text())
    history = json.loads((out / "random.json").read_text())["history"]
    assert summary["best"]["random"]["reward"] == max(t["reward"] for t in history)
    assert summary["pareto_front"]

    first = [t["arch"] for t in history]
    assert cli_main(args[:-4] + ["--budget", "30", "--resume", "--out", str(out)]) == 0
    resumed = json.loads((out / "random.json").read_text())["history"]
    assert len(resumed) == 30 and [t["arch"] for t in resumed[:20]] == first


def test_sample_command_bad_inputs_exit_with_one_clear_line(synthetic_table, tmp_path, capsys):
    base = ["sample", "--benchmark", str(synthetic_table), "--out", str(tmp_path)]
    assert cli_main(base + ["--metric", "accuracy"]) == 2
    assert "unknown metric column 'accuracy'" in capsys.readouterr().err
    assert cli_main(base + ["--metric", "val", "--budget", "0"]) == 2
    assert "--budget must be a positive integer, got 0" in capsys.readouterr().err
    assert cli_main(base + ["--metric", "val", "--strategy", "annealing"]) == 2
    assert "unknown strategy 'annealing'" in capsys.readouterr().err
    assert cli_main(["sample", "--run", str(tmp_path / "no-run")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # no folder made by a run that failed its checks


@pytest.mark.parametrize("target", ["0", "-5", "inf", "nan"])
def test_a_target_that_is_not_a_positive_cost_is_refused_zero_included(synthetic_table, tmp_path, capsys, target):
    args = ["sample", "--benchmark", str(synthetic_table), "--metric", "val", "--cost", "lat_ms",
            "--target", target, "--out", str(tmp_path / "out")]
    assert cli_main(args) == 2
    assert f"--target (a cost value) must be a positive finite number, got {float(target)}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="target .* must be a positive finite number"):
        TargetReward("val", "lat_ms", float(target))


def test_a_small_target_is_honoured_not_ignored(synthetic_table):
    # Every cell costs at least 1 ms, so a 0.5 ms target lowers every reward below the plain metric.
    table = TabularBenchmark.load(synthetic_table)
    arch = next(iter(table.rows))
    plain = TabularEvaluator(table, "val")(NB201.parse(arch)).reward
    assert TabularEvaluator(table, TargetReward("val", "lat_ms", 0.5))(NB201.parse(arch)).reward < plain


def test_sample_refuses_a_folder_that_is_not_new_or_empty_and_an_unwritable_out(synthetic_table, tmp_path, capsys):
    base = ["sample", "--benchmark", str(synthetic_table), "--metric", "val", "--strategy", "random", "--budget", "2"]
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.txt").write_text("mine")
    assert cli_main(base + ["--out", str(used)]) == 2
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert [p.name for p in used.iterdir()] == ["notes.txt"]
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert cli_main(base + ["--out", str(blocker / "out")]) == 2  # a path under a plain file
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(blocker / "out") in err
    assert cli_main(base + ["--resume", "--out", str(tmp_path / "none")]) == 2
    assert "--resume needs --out, the sample folder to continue" in capsys.readouterr().err


def test_sample_without_out_makes_a_new_folder_each_time(synthetic_table, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--benchmark", str(synthetic_table), "--metric", "val", "--strategy", "random", "--budget", "2"]
    assert cli_main(args) == 0 and cli_main(args) == 0
    folders = sorted((tmp_path / "samples").iterdir())
    assert len(folders) == 2 and all((f / "random.json").is_file() for f in folders)
    assert f"sample folder: {folders[0].relative_to(tmp_path)}" in capsys.readouterr().out


def test_ctrl_c_under_quiet_names_the_real_folder_and_keeps_the_told_trials(synthetic_table, tmp_path, monkeypatch,
                                                                             capsys):
    from strategies import evaluators

    calls = []

    def interrupted(self, genotype):
        if len(calls) == 3:
            raise KeyboardInterrupt
        calls.append(genotype)
        return evaluators.Evaluation(1.0, {})

    monkeypatch.setattr(evaluators.TabularEvaluator, "__call__", interrupted)
    monkeypatch.chdir(tmp_path)
    args = ["sample", "--benchmark", str(synthetic_table), "--metric", "val", "--strategy", "random", "--quiet"]
    assert cli_main(args) == 130
    (folder,) = (tmp_path / "samples").iterdir()
    captured = capsys.readouterr()
    assert captured.out == "" and f"--resume --out {folder.relative_to(tmp_path)}" in captured.err
    assert len(json.loads((folder / "random.json").read_text())["history"]) == 3


def test_sample_command_over_a_run_folder(tmp_path):
    # A run folder as `supernet search` leaves it, read back through supernet.load_run.
    from supernet import runs, search_config

    config = search_config.SearchConfig(method="spos", space="nb201", C=4, layers=1, epochs=1, retrain_epochs=0, batch_size=64)
    torch.manual_seed(0)
    net = search_config.build_network(config, num_classes=10, in_channels=1)
    run_dir = tmp_path / "search-spos"
    runs.save_checkpoint(run_dir / runs.CHECKPOINT, {"config": config.to_dict(), "net": net.state_dict(),
                                                      "genotype": None})
    out = tmp_path / "out"
    assert cli_main(["sample", "--run", str(run_dir), "--strategy", "evolution", "--budget", "3",
                     "--bn-batches", "1", "--out", str(out), "--cost", "params"]) == 0
    history = json.loads((out / "evolution.json").read_text())["history"]
    assert len(history) == 3
    assert all(0 <= t["metrics"]["accuracy"] <= 100 and t["metrics"]["params"] > 0 for t in history)
    assert json.loads((out / "summary.json").read_text())["pareto_front"]


def test_sample_a_run_searched_on_a_data_file_needs_the_same_data_file(tmp_path, capsys):
    from supernet import runs, search_config
    from supernet.data import fingerprint

    x, y = load_digits()
    x, y = x[:300], y[:300]
    data_file = tmp_path / "data.pt"
    torch.save({"images": x, "labels": y}, data_file)
    config = search_config.SearchConfig(method="spos", space="nb201", C=4, layers=1, epochs=1, retrain_epochs=0,
                                        batch_size=32, dataset="tensors", data_fingerprint=fingerprint(x, y))
    torch.manual_seed(0)
    net = search_config.build_network(config, num_classes=10, in_channels=1)
    run_dir = tmp_path / "search-tensors"
    runs.save_checkpoint(run_dir / runs.CHECKPOINT, {"config": config.to_dict(), "net": net.state_dict(),
                                                      "genotype": None})
    base = ["sample", "--run", str(run_dir), "--strategy", "random", "--budget", "2", "--bn-batches", "1"]

    assert cli_main(base + ["--out", str(tmp_path / "without")]) == 2
    assert "pass the same --data-file" in capsys.readouterr().err
    other = tmp_path / "other.pt"
    torch.save((x[:200], y[:200]), other)
    assert cli_main(base + ["--data-file", str(other), "--out", str(tmp_path / "other")]) == 2
    assert "are not the ones run" in capsys.readouterr().err
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    assert cli_main(base + ["--data-file", str(tmp_path / "junk.pt"), "--out", str(tmp_path / "junk")]) == 2
    assert "junk.pt" in capsys.readouterr().err
    assert not any((tmp_path / name).exists() for name in ("without", "other", "junk"))

    out = tmp_path / "out"
    assert cli_main(base + ["--data-file", str(data_file), "--out", str(out)]) == 0
    history = json.loads((out / "random.json").read_text())["history"]
    assert len(history) == 2 and all(0 <= t["metrics"]["accuracy"] <= 100 for t in history)


def test_a_data_file_is_refused_for_a_run_not_searched_on_tensors_and_without_run(synthetic_table, tmp_path, capsys):
    from supernet import runs, search_config

    config = search_config.SearchConfig(method="spos", space="nb201", C=4, layers=1, epochs=1, retrain_epochs=0)
    net = search_config.build_network(config, num_classes=10, in_channels=1)
    run_dir = tmp_path / "search-digits"
    runs.save_checkpoint(run_dir / runs.CHECKPOINT, {"config": config.to_dict(), "net": net.state_dict(),
                                                      "genotype": None})
    data_file = tmp_path / "data.pt"
    torch.save(load_digits(), data_file)
    assert cli_main(["sample", "--run", str(run_dir), "--data-file", str(data_file), "--out", str(tmp_path / "a")]) == 2
    assert "searched on dataset 'digits', not on tensors; leave out --data-file" in capsys.readouterr().err
    assert cli_main(["sample", "--benchmark", str(synthetic_table), "--data-file", str(data_file),
                     "--out", str(tmp_path / "b")]) == 2
    assert "--data-file goes with --run" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
