"""The best-reward-so-far curve of each strategy, as a PNG."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from supernet.runs import atomic_save_figure

from .base import Strategy


def plot_best_reward(results: dict[str, Strategy], path: "str | Path", ylabel: str = "best reward") -> Path:
    """One line per strategy: the best reward found against the number of evaluations."""
    if not results:
        raise ValueError("no strategies to plot")
    path = Path(path)
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for name, strategy in results.items():
        curve = strategy.best_so_far()
        ax.plot(range(1, len(curve) + 1), curve, label=f"{name} (seed {strategy.seed})", lw=1.5)
    ax.set_xlabel("evaluations")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return atomic_save_figure(fig, path, dpi=100)
