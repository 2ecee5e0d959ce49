"""Issue 10's meta-learning target: one meta-step of 20-way 1-shot Omniglot at 28x28, folded path vs reference.

    PYTHONPATH=. python3 bench/bench_meta_step.py [--data-dir DIR] [--threads N] [--runs R]
                                                  [--methods fomaml maml reptile] [--no-csv]

One meta-step = `MetaLearner.meta_step` on a stack of `meta_batch` tasks (the MetaConfig defaults otherwise:
nb201 at C=4, one cell per stage, 3 inner steps, 5 query examples per class). Providers, timed in turn
(ABAB...) in one process from the same initialisation on the same episodes:
  reference: MetaLearner(folded=False), torch.func.vmap over functional_call (the numbers' reference);
  folded:    MetaLearner(), the tasks folded into the channels (supernet/meta/folded.py).
Prints the median per-run paired ratio folded/reference per method and appends rows to bench/results.csv.
Omniglot from --data-dir (default $SUPERNET_DATA/omniglot); without it random images of the same shape,
which time the same (no step depends on the pixel values), and the output says so.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import append_csv, interleaved, row  # noqa: E402
from supernet.meta import Episode, EpisodeSampler, MetaConfig, MetaLearner, load_omniglot  # noqa: E402
from supernet.meta.run import build_network  # noqa: E402

N_WAY, K_SHOT, IMAGE_SIZE = 20, 1, 28


def episodes(data_dir: str | None, config: MetaConfig, count: int) -> tuple[list[Episode], str]:
    """`count` meta-batches of 20-way 1-shot tasks, and where their images came from."""
    if data_dir and Path(data_dir).exists():
        dataset = load_omniglot(data_dir, IMAGE_SIZE, rotations=True)
        sampler = EpisodeSampler(dataset, N_WAY, K_SHOT, config.query, seed=0)
        return [sampler.sample_tasks(config.meta_batch) for _ in range(count)], f"omniglot from {data_dir}"
    g = torch.Generator().manual_seed(0)
    t, s, q = config.meta_batch, N_WAY * K_SHOT, N_WAY * config.query
    out = [Episode(torch.rand(t, s, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g), torch.arange(N_WAY).repeat(t, K_SHOT),
                   torch.rand(t, q, 1, IMAGE_SIZE, IMAGE_SIZE, generator=g),
                   torch.arange(N_WAY).repeat_interleave(config.query).repeat(t, 1), torch.arange(N_WAY).repeat(t, 1))
           for _ in range(count)]
    return out, "random images of Omniglot's shape (no --data-dir): the timing does not depend on pixel values"


def learner(config: MetaConfig, folded: bool) -> MetaLearner:
    return MetaLearner(build_network(config, in_channels=1), config.method, config.inner_steps,
                       config.inner_lr_weights, config.inner_lr_alphas, config.meta_lr_weights,
                       config.meta_lr_alphas, folded=folded)


def main(argv: list[str] | None = None) -> int:
    default_data = os.path.join(os.environ["SUPERNET_DATA"], "omniglot") if os.environ.get("SUPERNET_DATA") else None
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=default_data, help="Omniglot zips (default: $SUPERNET_DATA/omniglot)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=int, default=5, help="timed meta-steps per provider (after one warm-up)")
    p.add_argument("--methods", nargs="+", default=["fomaml", "maml"], choices=["fomaml", "maml", "reptile"])
    p.add_argument("--no-csv", action="store_true", help="print only; do not append to bench/results.csv")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for method in a.methods:
        config = MetaConfig(method=method, n_way=N_WAY, k_shot=K_SHOT, image_size=IMAGE_SIZE)
        batches, source = episodes(a.data_dir, config, a.runs + 1)
        providers = {"reference": learner(config, folded=False), "folded": learner(config, folded=True)}
        # one iterator of the same batches per provider: run i gives every provider batch i (run 0 warms up)
        steps = {name: (lambda lr=lr, it=iter(batches): lr.meta_step(next(it))) for name, lr in providers.items()}
        times, cpu = interleaved(steps, a.runs)
        ratios = [f / r for f, r in zip(times["folded"], times["reference"])]
        cpu_ratios = [f / r for f, r in zip(cpu["folded"], cpu["reference"])]
        print(f"== {method}: {N_WAY}-way {K_SHOT}-shot {IMAGE_SIZE}x{IMAGE_SIZE}, meta_batch {config.meta_batch}, "
              f"{config.inner_steps} inner steps, query {config.query}; threads={a.threads} runs={a.runs}; {source}")
        for name, t in times.items():
            print(f"  {name:9s} wall median {statistics.median(t):8.1f} ms, min {min(t):8.1f} ms; "
                  f"cpu median {statistics.median(cpu[name]):8.1f} ms")
        # the process's CPU time leaves out time spent preempted by other jobs: the steadier figure when shared
        print(f"  folded/reference paired ratio: wall median {statistics.median(ratios):.3f} "
              f"(range {min(ratios):.3f}-{max(ratios):.3f}), cpu median {statistics.median(cpu_ratios):.3f}",
              flush=True)
        case = f"nb201,C={config.C},{N_WAY}-way,{K_SHOT}-shot,{IMAGE_SIZE}x{IMAGE_SIZE},tasks={config.meta_batch}"
        q = torch.tensor([0.5, 0.2, 0.8])
        for name, t in times.items():
            rows.append(row("meta_step", case, method, name, tuple(torch.tensor(t).quantile(q).tolist()), "cpu"))
    if not a.no_csv:
        append_csv(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
