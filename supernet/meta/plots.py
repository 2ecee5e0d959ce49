"""Meta-training curves as PNG (built on `matplotlib.figure.Figure`, so it never touches pyplot's backend)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

from ..runs import atomic_save_figure

LABELS = {"meta": "meta-learned architecture + weights", "fixed": "fixed architecture (alphas frozen)"}


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_meta_curves(histories: dict[str, dict], path: "str | Path", no_meta_val: float | None = None) -> Path:
    """Post-adaptation query loss on meta-training tasks, and meta-validation accuracy, per learner."""
    if not histories or not any(h["train"] for h in histories.values()):
        raise ValueError("no meta-training history to plot")
    path = Path(path)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    loss_ax, val_ax = fig.subplots(1, 2)
    for name, history in histories.items():
        steps = [r["step"] for r in history["train"]]
        losses = [r["query_loss"] for r in history["train"]]
        window = max(1, len(losses) // 20)
        loss_ax.plot(steps, _smooth(losses, window), label=LABELS.get(name, name))
        if history["val"]:
            val_ax.plot([r["step"] for r in history["val"]], [100 * r["accuracy"] for r in history["val"]],
                        marker="o", ms=3, label=LABELS.get(name, name))
    if no_meta_val is not None:
        val_ax.axhline(100 * no_meta_val, color="gray", ls="--", lw=1, label="no meta-training")
    loss_ax.set(xlabel="meta-step", ylabel="query loss after adaptation",
                title="meta-training tasks (moving average)")
    val_ax.set(xlabel="meta-step", ylabel="accuracy after adaptation (%)", title="meta-validation episodes")
    loss_ax.legend(fontsize=8)
    val_ax.legend(fontsize=8)
    return atomic_save_figure(fig, path, dpi=90)
