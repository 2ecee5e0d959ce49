"""torch.distributed for data-parallel runs: process-group setup from torchrun's environment,
gradient averaging, shards of a global batch, and the rank-0-writes rule.

A run launched by `torchrun` (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment) joins
a process group here: gloo on CPUs, nccl on GPUs. Collectives time out after
SUPERNET_DIST_TIMEOUT seconds (default 600), so a rank that dies stops the others with a
`PeerFailure` within a bounded time instead of hanging.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence

import torch
import torch.distributed as dist


class PeerFailure(RuntimeError):
    """Another rank stopped (died, or did not answer within the timeout) during a collective."""


def launched() -> bool:
    """Whether this process was started by torchrun (or with its environment) for more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 and "RANK" in os.environ


def active() -> bool:
    """Whether a process group with more than one rank is in use."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes files, logs and progress bars."""
    return rank() == 0


def timeout_seconds() -> float:
    text = os.environ.get("SUPERNET_DIST_TIMEOUT", "600")
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"SUPERNET_DIST_TIMEOUT must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"SUPERNET_DIST_TIMEOUT must be positive, got {text!r}")
    return value


def setup(device: torch.device) -> bool:
    """Joins torchrun's process group if launched by it and none is open; True if this call opened it."""
    if not launched() or (dist.is_available() and dist.is_initialized()):
        return False
    if not dist.is_available():
        raise ValueError("this torch build has no torch.distributed; run as one process")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_seconds()), **kwargs)
    return True


def teardown(opened: bool) -> None:
    """Closes the process group if `setup` opened it."""
    if opened and dist.is_initialized():
        dist.destroy_process_group()


def _collective(fn, what: str):
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 (gloo and nccl raise several types when a peer is gone)
        raise PeerFailure(f"rank {rank()} of {world_size()}: {what} failed, so another rank stopped or did not "
                          f"answer within {timeout_seconds():g} s ({str(err).splitlines()[0] if str(err) else err!r})"
                          ) from None


def all_reduce_mean(tensors: Sequence[torch.Tensor], what: str = "gradient all-reduce") -> None:
    """Averages `tensors` in place over the ranks (one flat all-reduce; a no-op in one process)."""
    tensors = [t for t in tensors if t is not None]
    if not active() or not tensors:
        return
    flat = torch.cat([t.reshape(-1).float() for t in tensors])
    _collective(lambda: dist.all_reduce(flat), what)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t).to(t.dtype))
        offset += n


def all_reduce_sum(values: Sequence[float], device: torch.device, what: str = "statistics all-reduce") -> list[float]:
    """Sums of Python numbers over the ranks."""
    if not active():
        return list(values)
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    _collective(lambda: dist.all_reduce(t), what)
    return t.tolist()


def broadcast_object(obj, what: str = "broadcast"):
    """Rank 0's `obj` on every rank."""
    if not active():
        return obj
    box = [obj]
    _collective(lambda: dist.broadcast_object_list(box, src=0), what)
    return box[0]


def on_main(make, what: str):
    """`make()` run on rank 0 alone (e.g. opening the run folder), its result shared with every rank; a
    ValueError it raises is raised on every rank, so no rank waits for a folder that was refused."""
    if not active():
        return make()
    result, error = None, None
    if is_main():
        try:
            result = make()
        except ValueError as err:
            error = str(err)
    result, error = broadcast_object((result, error), what)
    if error is not None:
        raise ValueError(error)
    return result


def all_gather_object(obj, what: str = "gather") -> list:
    """Every rank's `obj`, in rank order (`[obj]` in one process)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    _collective(lambda: dist.all_gather_object(out, obj), what)
    return out


def barrier(what: str = "barrier") -> None:
    if active():
        _collective(dist.barrier, what)


def shard(batch: tuple[torch.Tensor, ...], parts: int, index: int) -> tuple[torch.Tensor, ...]:
    """The `index`-th of `parts` equal slices of a global batch (its size must divide evenly)."""
    n = len(batch[0])
    if n % parts:
        raise ValueError(f"a batch of {n} cannot be split into {parts} equal parts")
    size = n // parts
    return tuple(t[index * size:(index + 1) * size] for t in batch)
