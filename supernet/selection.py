"""Perturbation-based architecture selection (DARTS-PT: Wang et al., "Rethinking Architecture Selection in
Differentiable NAS", ICLR 2021), as its code does it (`nasbench201/projection.py`, `sota/cnn/projection.py`).

The magnitude of an alpha need not say how much the supernet relies on its candidate: DARTS's collapse to
skips and pools is largely an artefact of reading the architecture off the alphas. DARTS-PT reads it off the
supernet instead. After the search, the supernet is tuned further (the weights at a tenth of the search's
initial learning rate, the alphas of the open edges as before) and, every `interval` tuning epochs, one
projection is made in every cell type: first each edge in turn, chosen at random, is fixed to the candidate
whose removal costs the supernet the most validation accuracy; then, in spaces where a node takes only some
of its inputs (DARTS: 2), each node in turn, at random, drops the inputs whose removal costs the least until
it has that many. The last projection comes at the start of the last tuning epoch; the schedule takes
`interval * (projections - 1)` tuning epochs (DARTS-PT's NB201 code: `proj_intv * (num_edges - 1)`).

What a removal costs is measured by one of `CRITERIA` (DARTS-PT's `proj_crit`): `accuracy`, the validation
accuracy lost, ties broken by the loss gained (DARTS-PT's default), or `loss`, the validation loss gained,
ties broken by the accuracy lost (continuous, so small validation sets rarely tie).
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
from .spaces import CellSpace

TUNING_LR_FACTOR = 0.1  # DARTS-PT tunes the weights at learning_rate / 10, constant, with fresh momentum
CRITERIA = ("accuracy", "loss")


def removal_cost(score: dict, criterion: str) -> tuple[float, float]:
    """How much a removal costs the supernet, as a sort key (larger costs more), from its scores without it:
    by accuracy, then loss, or by loss, then accuracy (`CRITERIA`)."""
    if criterion == "loss":
        return score["loss"], -score["accuracy"]
    return -score["accuracy"], score["loss"]


def projection_events(space: CellSpace) -> int:
    """Projections per cell type: one per edge, then one per node where nodes choose their inputs."""
    return space.num_edges + (len(space.intermediate_nodes) if space.inputs_per_node is not None else 0)


def op_candidates(space: CellSpace) -> list[int]:
    """The candidates an edge can be fixed to: all, except `none` where derivation never picks it (DARTS)."""
    return [k for k, op in enumerate(space.ops) if op != "none" or space.inputs_per_node is None]


def tuning_epochs(events: int, interval: int) -> int:
    """Epochs of tuning for `events` projections, one every `interval` epochs."""
    return max(interval * (events - 1), 1)


def projections_due(tuning_epoch: int, events: int, interval: int) -> int:
    """How many projections are made by the start of tuning epoch `tuning_epoch` (0-based): projection j at
    epoch j * interval, or at the last epoch if that comes first (DARTS-PT: `epoch % proj_intv == 0 or epoch ==
    tune_epochs - 1`)."""
    last = tuning_epochs(events, interval) - 1
    return sum(1 for j in range(events) if min(j * interval, last) <= tuning_epoch)


def open_edges(net: SearchNetwork, cell_type: str) -> list[int]:
    """The edges of `cell_type` not projected yet, in order."""
    projected = net.projected_edges().get(cell_type, {})
    return [e for e in range(net.space.num_edges) if e not in projected]


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
                     device: torch.device, autocast: Callable[[], Any] | None = None,
                     criterion: str = "accuracy") -> tuple[int, list[dict]]:
    """The candidate of `edge` whose removal costs the supernet the most by `criterion` (`removal_cost`:
    by default the lowest validation accuracy without it, then the highest loss), then the first in the
    space's order (`none`'s removal changes nothing, so it wins only where every other removal helps).
    Returns its index and each candidate's scores."""
    candidates, scores = op_candidates(net.space), []
    for k in candidates:
        with net.without_candidate(cell_type, edge, k):
            acc, loss = supernet_scores(net, pair, batch_size, device, autocast)
        scores.append({"op": net.space.ops[k], "accuracy": acc, "loss": loss})
    costliest = max(range(len(scores)), key=lambda i: (*removal_cost(scores[i], criterion), -i))
    return candidates[costliest], scores


def select_inputs(net: SearchNetwork, cell_type: str, node: int, pair: data.Pair, batch_size: int,
                  device: torch.device, autocast: Callable[[], Any] | None = None,
                  criterion: str = "accuracy") -> tuple[list[int], list[dict]]:
    """The input edges `node` keeps (the space's inputs_per_node of them): while it has more, the edge whose
    removal costs the supernet the least by `criterion` (by default the highest accuracy without it, then the
    lowest loss), then the first, goes, as DARTS-PT's topology projection. Returns the edges to drop and the
    scores of each round."""
    edges = [e for e in net.space.node_edges(node) if e not in net.dropped_edges().get(cell_type, ())]
    dropped, rounds = [], []
    while len(edges) > net.space.inputs_per_node:
        scores = []
        for e in edges:
            with net.without_candidate(cell_type, e, None):
                acc, loss = supernet_scores(net, pair, batch_size, device, autocast)
            scores.append({"edge": e, "accuracy": acc, "loss": loss})
        cheapest = min(range(len(scores)), key=lambda i: (*removal_cost(scores[i], criterion), i))
        dropped.append(edges.pop(cheapest))
        rounds.append(scores)
    return dropped, rounds


def projection_rng(seed: int, count: int) -> random.Random:
    """The draws of the `count`-th projection (DARTS-PT picks the edge or node at random): seeded, and apart
    from torch's RNG, so a run resumed anywhere draws the same edges."""
    return random.Random(seed * 1_000_003 + count)
