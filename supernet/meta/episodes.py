"""Few-shot episodes: N-way K-shot tasks drawn from a labeled image collection split by class.

A `FewShotDataset` holds images with class labels and, per class, a *group*: classes made from one
source class (its rotated copies) share a group, and `split_by_class` keeps a group inside one split,
so no split ever sees a rotation of another split's class.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .. import checks

ROTATIONS = (0, 90, 180, 270)  # rotated copies as extra classes (Santoro et al. 2016, Vinyals et al. 2016)
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FewShotDataset:
    """Images (N, C, H, W) with class ids (N,); `groups[c]` is the group of class c (rotations share one)."""

    images: torch.Tensor
    labels: torch.Tensor
    groups: torch.Tensor  # (number of class ids,): indexed by class id, so subsets keep the global ids
    name: str = "tensors"

    @property
    def classes(self) -> torch.Tensor:
        """The class ids present, ascending."""
        return torch.unique(self.labels)

    @property
    def num_classes(self) -> int:
        return int(self.classes.numel())

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def class_sizes(self) -> dict[int, int]:
        """Examples per class id."""
        ids, counts = torch.unique(self.labels, return_counts=True)
        return dict(zip(ids.tolist(), counts.tolist()))

    def subset(self, class_ids: "list[int] | torch.Tensor", name: str | None = None) -> "FewShotDataset":
        """The examples of `class_ids` only; class ids and groups keep their global values."""
        keep = torch.isin(self.labels, torch.as_tensor(class_ids, dtype=self.labels.dtype))
        return FewShotDataset(self.images[keep], self.labels[keep], self.groups, name or self.name)


def fewshot_dataset(images: torch.Tensor, labels: torch.Tensor, name: str = "tensors",
                    groups: torch.Tensor | None = None) -> FewShotDataset:
    """Checks images (N, C, H, W) and integer labels (N,) and wraps them (each class its own group by default)."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images have shape {shape}; expected a float tensor (N, channels, height, width)")
    if not isinstance(labels, torch.Tensor) or labels.shape != (images.shape[0],) or labels.is_floating_point():
        shape = tuple(labels.shape) if isinstance(labels, torch.Tensor) else type(labels).__name__
        raise ValueError(f"labels have shape {shape}; expected integer class ids of shape ({images.shape[0]},)")
    if labels.numel() == 0 or int(labels.min()) < 0:
        raise ValueError("labels must be non-negative class ids and there must be at least one example")
    labels = labels.long()
    num_ids = int(labels.max()) + 1
    if groups is None:
        groups = torch.arange(num_ids)
    if groups.shape != (num_ids,):
        raise ValueError(f"groups have shape {tuple(groups.shape)}; expected one group per class id ({num_ids},)")
    return FewShotDataset(images, labels, groups.long(), name)


def with_rotations(dataset: FewShotDataset, angles: tuple[int, ...] = ROTATIONS) -> FewShotDataset:
    """Every class rotated by each angle becomes its own class (id = class * len(angles) + angle index)."""
    if not angles or any(a % 90 or not 0 <= a < 360 for a in angles) or len(set(angles)) != len(angles):
        raise ValueError(f"rotation angles must be distinct multiples of 90 in [0, 360), got {angles}")
    n = len(angles)
    images = torch.cat([torch.rot90(dataset.images, a // 90, dims=(2, 3)) for a in angles])
    labels = torch.cat([dataset.labels * n + r for r in range(n)])
    groups = dataset.groups.repeat_interleave(n)
    return FewShotDataset(images, labels, groups, dataset.name)


def split_fractions(fractions: Any) -> tuple[float, float, float]:
    """`fractions` as three positive finite floats summing to 1 (meta-train, meta-validation, meta-test)."""
    if isinstance(fractions, (str, bytes)) or not hasattr(fractions, "__len__") or len(fractions) != 3:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {fractions!r}")
    values = tuple(checks.number(f"split fraction {name}", f, positive=True)
                   for name, f in zip(SPLITS, fractions))
    if abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {values}")
    return values


def split_by_class(dataset: FewShotDataset, fractions: tuple[float, float, float] = (0.6, 0.2, 0.2),
                   seed: int = 0) -> dict[str, FewShotDataset]:
    """Meta-train / meta-validation / meta-test datasets with disjoint classes (whole groups go to one split)."""
    fractions = split_fractions(fractions)
    present = dataset.classes
    group_ids = torch.unique(dataset.groups[present])
    if group_ids.numel() < 3:
        raise ValueError(f"{dataset.name} has {group_ids.numel()} class groups; splitting needs at least 3")
    order = group_ids[torch.randperm(group_ids.numel(), generator=torch.Generator().manual_seed(seed))]
    n_train = min(len(order) - 2, max(1, round(fractions[0] * len(order))))
    n_val = max(1, min(len(order) - n_train - 1, round(fractions[1] * len(order))))
    parts = {"train": order[:n_train], "val": order[n_train:n_train + n_val], "test": order[n_train + n_val:]}
    return {split: dataset.subset(present[torch.isin(dataset.groups[present], groups)], f"{dataset.name}/{split}")
            for split, groups in parts.items()}


@dataclass
class Episode:
    """One task (or a stack of tasks along a leading dimension): support and query sets, labels 0..N-1."""

    support_x: torch.Tensor  # (N*K, C, H, W) or (T, N*K, C, H, W)
    support_y: torch.Tensor  # (N*K,) or (T, N*K)
    query_x: torch.Tensor  # (N*Q, C, H, W) or (T, N*Q, C, H, W)
    query_y: torch.Tensor  # (N*Q,) or (T, N*Q)
    classes: torch.Tensor  # (N,) or (T, N): the dataset class id behind each episode label

    @property
    def num_tasks(self) -> int:
        """Tasks stacked in this episode (1 for a single task)."""
        return self.support_y.shape[0] if self.support_y.dim() == 2 else 1

    def task(self, i: int) -> "Episode":
        """Task i of a stack."""
        return Episode(self.support_x[i], self.support_y[i], self.query_x[i], self.query_y[i], self.classes[i])


def stack_episodes(episodes: list[Episode]) -> Episode:
    """Single-task episodes of equal shapes, stacked along a new leading task dimension."""
    if not episodes:
        raise ValueError("stack_episodes needs at least one episode")
    return Episode(*(torch.stack([getattr(e, f) for e in episodes])
                     for f in ("support_x", "support_y", "query_x", "query_y", "classes")))


class EpisodeSampler:
    """Draws N-way K-shot episodes with `query` examples per class from one split's classes.

    Its torch.Generator is the only randomness, so the same seed gives the same episodes, and
    `state_dict()` lets a checkpoint resume the sequence.
    """

    def __init__(self, dataset: FewShotDataset, n_way: int, k_shot: int, query: int, seed: int = 0) -> None:
        for name, value in (("n_way", n_way), ("k_shot", k_shot), ("query", query)):
            checks.integer(name, value)
        sizes = dataset.class_sizes()
        if n_way > len(sizes):
            raise ValueError(f"n_way={n_way} is larger than the {len(sizes)} classes of {dataset.name}")
        smallest = min(sizes, key=sizes.get)
        if k_shot + query > sizes[smallest]:
            raise ValueError(f"k_shot + query = {k_shot} + {query} = {k_shot + query} is larger than the "
                             f"{sizes[smallest]} examples of class {smallest} in {dataset.name}")
        self.dataset, self.n_way, self.k_shot, self.query = dataset, n_way, k_shot, query
        self.class_ids = torch.tensor(sorted(sizes))
        self.indices = [torch.nonzero(dataset.labels == c).flatten() for c in self.class_ids.tolist()]
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> Episode:
        """One episode; episode label j is class `classes[j]`, examples ordered class by class."""
        g = self.generator
        picks = torch.randperm(len(self.class_ids), generator=g)[: self.n_way]
        support, query = [], []
        for j in picks.tolist():
            idx = self.indices[j][torch.randperm(len(self.indices[j]), generator=g)[: self.k_shot + self.query]]
            support.append(idx[: self.k_shot])
            query.append(idx[self.k_shot:])
        s, q = torch.cat(support), torch.cat(query)
        labels = torch.arange(self.n_way)
        x = self.dataset.images
        return Episode(x[s], labels.repeat_interleave(self.k_shot), x[q], labels.repeat_interleave(self.query),
                       self.class_ids[picks])

    def sample_tasks(self, tasks: int) -> Episode:
        """`tasks` episodes stacked along a leading dimension."""
        checks.integer("tasks", tasks)
        return stack_episodes([self.sample() for _ in range(tasks)])

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def digits_fewshot(rotations: bool = True) -> FewShotDataset:
    """The embedded digits (1,797 real 8x8 images, 10 classes), with rotated copies as extra classes (40)."""
    from ..data import load_digits

    x, y = load_digits()
    dataset = fewshot_dataset(x, y, "digits")
    return with_rotations(dataset) if rotations else dataset
