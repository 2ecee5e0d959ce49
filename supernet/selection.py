"""Perturbation-based architecture selection (DARTS-PT: Wang et al., "Rethinking Architecture Selection in
Differentiable NAS", ICLR 2021), as its NB201 code does it (`nasbench201/projection.py`).

The magnitude of an alpha need not say how much the supernet relies on its candidate: DARTS's collapse to
skips and pools is largely an artefact of reading the architecture off the alphas. DARTS-PT reads it off the
supernet instead. After the search, the supernet is tuned further (the weights at a tenth of the search's
initial learning rate, the alphas of the open edges as before) and, every `interval` tuning epochs, one
edge chosen at random is fixed (projected) to the candidate whose removal costs the supernet the most
validation accuracy; the last edge is fixed at the start of the last tuning epoch. The schedule takes
`interval * (edges - 1)` tuning epochs, DARTS-PT's `proj_intv * (num_edges - 1)`.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from . import data
from .search_network import SearchNetwork, preserved_batchnorm

TUNING_LR_FACTOR = 0.1  # DARTS-PT tunes the weights at learning_rate / 10, constant, with fresh momentum


def tuning_epochs(num_edges: int, interval: int) -> int:
    """Epochs of tuning for `num_edges` edges (every cell type's), one projection every `interval` epochs."""
    return max(interval * (num_edges - 1), 1)


def projections_due(tuning_epoch: int, num_edges: int, interval: int) -> int:
    """How many edges are projected by the start of tuning epoch `tuning_epoch` (0-based): edge j at epoch
    j * interval, or at the last epoch if that comes first (DARTS-PT: `epoch % proj_intv == 0 or epoch ==
    tune_epochs - 1`)."""
    last = tuning_epochs(num_edges, interval) - 1
    return sum(1 for j in range(num_edges) if min(j * interval, last) <= tuning_epoch)


def open_edges(net: SearchNetwork) -> list[tuple[str, int]]:
    """The (cell type, edge) pairs not projected yet, in a fixed order."""
    projected = net.projected_edges()
    return [(ct, e) for ct in net.space.cell_types for e in range(net.space.num_edges)
            if e not in projected.get(ct, {})]


@torch.no_grad()
def supernet_scores(net: SearchNetwork, pair: data.Pair, batch_size: int, device: torch.device,
                    autocast: Callable[[], Any] | None = None) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) of the supernet on `pair`, in batches of `batch_size` normalised with
    their own statistics, as DARTS-PT evaluates (train mode); every batch-norm buffer is left as it was."""
    autocast = autocast or contextlib.nullcontext
    was_training = net.training
    net.train()
    x, y = pair
    correct, loss = 0, 0.0
    with preserved_batchnorm(net):
        for i in range(0, len(x), batch_size):
            xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
            with autocast():
                logits = net(xb)
            correct += int((logits.argmax(1) == yb).sum())
            loss += float(F.cross_entropy(logits.float(), yb, reduction="sum"))
    net.train(was_training)
    n = max(len(x), 1)
    return correct / n, loss / n


def select_operation(net: SearchNetwork, cell_type: str, edge: int, pair: data.Pair, batch_size: int,
                     device: torch.device, autocast: Callable[[], Any] | None = None) -> tuple[int, list[dict]]:
    """The candidate of `edge` whose removal costs the supernet the most: the lowest validation accuracy
    without it, then the highest loss, then the first in the space's order (`none`'s removal changes
    nothing, so it wins only where every other removal helps). Returns its index and each candidate's
    scores."""
    scores = []
    for k, name in enumerate(net.space.ops):
        with net.without_candidate(cell_type, edge, k):
            acc, loss = supernet_scores(net, pair, batch_size, device, autocast)
        scores.append({"op": name, "accuracy": acc, "loss": loss})
    best = min(range(len(scores)), key=lambda k: (scores[k]["accuracy"], -scores[k]["loss"], k))
    return best, scores


def projection_rng(seed: int, count: int) -> random.Random:
    """The draw of the `count`-th projected edge (DARTS-PT picks the edge at random): seeded, and apart from
    torch's RNG, so a run resumed anywhere draws the same edges."""
    return random.Random(seed * 1_000_003 + count)
