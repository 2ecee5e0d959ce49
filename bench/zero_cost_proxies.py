"""Zero-cost proxies against the 12-epoch NAS-Bench-201 table.

Scores a seeded sample of NB201 cells with every proxy of `supernet.proxies` (network: NB201's tiny
network, C=16, N=5 by default, at initialisation, one seeded batch of real data: scikit-learn's embedded
digits, 8x8, 1 channel) and reports each proxy's Spearman and Kendall rank correlation with
`cifar10-val`, next to the `params` and `flops` baselines, with the mean wall time per cell. One thread.

    python bench/zero_cost_proxies.py --cells 1000 --json /tmp/zc.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time

import torch
from scipy import stats

from strategies.evaluators import TabularBenchmark
from supernet.proxies import digits_batches, list_proxies, needs_data, score


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="nb201", help="the 12-epoch table: 'nb201' (shipped) or a CSV path")
    parser.add_argument("--cells", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="seeds the sample of cells, the batch and the inits")
    parser.add_argument("--proxies", nargs="+", default=list_proxies(), choices=list_proxies())
    parser.add_argument("--metric", default="cifar10-val")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--C", type=int, default=16)
    parser.add_argument("--layers", type=int, default=5, help="cells per stage (NB201's N)")
    parser.add_argument("--json", help="write per-cell scores and the summary here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    table = TabularBenchmark.load(args.data, "nb201")
    table.check_metric(args.metric)
    archs = random.Random(args.seed).sample(sorted(table.rows), min(args.cells, len(table)))
    batches = digits_batches(args.batch_size, 1, args.seed)
    truth = [table.rows[a][args.metric] for a in archs]
    scores = {p: [] for p in args.proxies}
    seconds = {p: 0.0 for p in args.proxies}
    print(f"{len(archs)} cells of {args.data}; NB201 network C={args.C} N={args.layers}; one batch of "
          f"{args.batch_size} digits (8x8, 1 channel); seed {args.seed}", flush=True)
    for i, arch in enumerate(archs):
        for p in args.proxies:
            start = time.perf_counter()
            scores[p].append(score(p, arch, "nb201", batches, seed=args.seed, C=args.C, layers=args.layers))
            seconds[p] += time.perf_counter() - start
        if (i + 1) % 100 == 0:
            print(f"  {i + 1} cells, {sum(seconds.values()):.0f} s", file=sys.stderr, flush=True)
    print()
    print("| proxy | needs data | Spearman | Kendall | ms/cell | non-finite |")
    print("|---|---|---:|---:|---:|---:|")
    summary = {}
    for p in args.proxies:
        finite = [s if math.isfinite(s) else -1e300 for s in scores[p]]  # -inf ranks last
        rho = stats.spearmanr(finite, truth).statistic
        tau = stats.kendalltau(finite, truth).statistic
        bad = sum(not math.isfinite(s) for s in scores[p])
        ms = 1000 * seconds[p] / len(archs)
        summary[p] = {"spearman": rho, "kendall": tau, "ms_per_cell": ms, "non_finite": bad,
                      "needs_data": needs_data(p)}
        print(f"| {p} | {'yes' if needs_data(p) else 'no'} | {rho:.3f} | {tau:.3f} | {ms:.0f} | {bad} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "summary": summary, "archs": archs, "truth": truth, "scores": scores},
                      f, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
