"""Metrics of a candidate: classification quality, cost (parameters, FLOPs, latency), rewards, Pareto fronts."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from supernet import checks

from .base import Trial

Reward = Union[str, Callable[[Mapping[str, float]], float]]


def classification_metrics(predictions: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict[str, float]:
    """Accuracy, macro precision, macro recall and macro-F1, in percent.

    Macro averages run over the classes present in the labels or the predictions; a class never
    predicted has precision 0 (as scikit-learn's zero_division=0).
    """
    if predictions.shape != labels.shape or predictions.dim() != 1 or labels.numel() == 0:
        raise ValueError(f"predictions {tuple(predictions.shape)} and labels {tuple(labels.shape)} must be "
                         f"matching non-empty 1-D tensors")
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.reshape(num_classes, num_classes).double()  # rows: true class, columns: predicted
    true_positive = confusion.diag()
    predicted = confusion.sum(0)
    actual = confusion.sum(1)
    present = (predicted + actual) > 0
    precision = torch.where(predicted > 0, true_positive / predicted.clamp(min=1), torch.zeros_like(predicted))
    recall = torch.where(actual > 0, true_positive / actual.clamp(min=1), torch.zeros_like(actual))
    denominator = precision + recall
    f1 = torch.where(denominator > 0, 2 * precision * recall / denominator.clamp(min=1e-12), torch.zeros_like(precision))
    return {"accuracy": 100.0 * float(true_positive.sum() / confusion.sum()),
            "precision": 100.0 * float(precision[present].mean()),
            "recall": 100.0 * float(recall[present].mean()),
            "f1": 100.0 * float(f1[present].mean())}


@torch.no_grad()
def profile(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Parameters of the modules one forward actually runs, and its multiply-adds per example (FLOPs as
    DARTS and NAS-Bench-201 count them: convolutions and linear layers)."""
    ran: dict[int, nn.Module] = {}
    flops = [0]

    def hook(module: nn.Module, inputs: Any, output: Any) -> None:
        ran[id(module)] = module
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            flops[0] += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            flops[0] += output[0].numel() * module.in_features

    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        model(x[:1])
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for m in ran.values() for p in m.parameters(recurse=False))
    return {"params": float(params), "flops": float(flops[0])}


@torch.no_grad()
def measure_latency(model: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> float:
    """Median wall time of one forward on `x`, in milliseconds."""
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        times.append(1000.0 * (time.perf_counter() - start))
    return statistics.median(times)


class TargetReward:
    """MnasNet's reward: metric * (cost / target) ** weight, the weight applying only above the target
    when `hard` (a constraint) and on both sides otherwise (a trade-off)."""

    def __init__(self, metric: str, cost: str, target: float, weight: float = -0.07, hard: bool = False) -> None:
        checks.number(f"target (a {cost} value)", target, positive=True)
        checks.number("weight", weight)
        self.metric, self.cost, self.target, self.weight, self.hard = metric, cost, float(target), float(weight), hard

    def __call__(self, metrics: Mapping[str, float]) -> float:
        for key in (self.metric, self.cost):
            if key not in metrics:
                raise ValueError(f"reward needs metric {key!r}; the evaluator gives {sorted(metrics)}")
        ratio = metrics[self.cost] / self.target
        if self.hard and ratio <= 1.0:
            return float(metrics[self.metric])
        return float(metrics[self.metric] * ratio ** self.weight)

    def __repr__(self) -> str:
        return (f"TargetReward({self.metric!r}, {self.cost!r}, target={self.target}, weight={self.weight}, "
                f"hard={self.hard})")


def reward_of(reward: Reward, metrics: Mapping[str, float]) -> float:
    """A reward given as a metric name or as a function of the metrics."""
    if isinstance(reward, str):
        if reward not in metrics:
            raise ValueError(f"unknown reward metric {reward!r}; expected one of {sorted(metrics)}")
        return float(metrics[reward])
    return float(reward(metrics))


def pareto_front(trials: Sequence[Trial], objectives: Mapping[str, str]) -> list[Trial]:
    """Trials no other trial dominates; `objectives` maps a metric (or 'reward') to 'max' or 'min'."""
    for key, sense in objectives.items():
        if sense not in ("max", "min"):
            raise ValueError(f"objective {key!r} must be 'max' or 'min', got {sense!r}")

    def values(trial: Trial) -> tuple[float, ...]:
        out = []
        for key, sense in objectives.items():
            if key == "reward":
                v = trial.reward
            elif key in trial.metrics:
                v = trial.metrics[key]
            else:
                raise ValueError(f"trial {trial.arch} has no metric {key!r}; it has {sorted(trial.metrics)}")
            out.append(v if sense == "max" else -v)
        return tuple(out)

    scored = [(values(t), t) for t in trials]
    front, seen = [], set()
    for v, t in scored:
        dominated = any(all(a >= b for a, b in zip(w, v)) and w != v for w, _ in scored)
        if not dominated and (t.arch, v) not in seen:
            seen.add((t.arch, v))
            front.append(t)
    return front
