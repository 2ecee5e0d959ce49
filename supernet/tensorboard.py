"""TensorBoard event files in a run folder (the optional `tensorboard` extra), for search, sample and meta runs.

`open_events(run_dir, enabled)` gives a writer whose methods do nothing when TensorBoard logging is off,
so a run calls them unconditionally. Events go to `<run_dir>/tensorboard/`; `tensorboard --logdir runs`
shows every run side by side.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

EVENTS = "tensorboard"  # folder inside a run folder


class Events:
    """Scalars, per-edge alpha softmaxes and figures for TensorBoard; a no-op when `writer` is None."""

    def __init__(self, writer: Any = None) -> None:
        self.writer = writer

    def scalars(self, step: int, values: Mapping[str, float], prefix: str = "") -> None:
        """One scalar per key (None values are skipped), at `step`."""
        if self.writer is None:
            return
        for name, value in values.items():
            if value is not None:
                self.writer.add_scalar(f"{prefix}{name}", float(value), step)

    def alphas(self, step: int, softmaxed: Mapping[str, Sequence[Sequence[float]]], ops: Sequence[str],
               edges: Sequence[tuple[int, int]]) -> None:
        """Each edge's softmaxed alphas as one chart per (cell type, edge), one line per op."""
        if self.writer is None:
            return
        for cell_type, rows in softmaxed.items():
            for (node, src), row in zip(edges, rows):
                self.writer.add_scalars(f"alphas/{cell_type}/{src}->{node}", dict(zip(ops, map(float, row))), step)

    def image_file(self, tag: str, path: "str | Path", step: int = 0) -> None:
        """A PNG the run wrote (cell drawings, curves), as an image."""
        if self.writer is not None:
            from matplotlib.image import imread

            self.writer.add_image(tag, imread(str(path))[..., :3], step, dataformats="HWC")

    def trials(self, name: str, history: Sequence[Any]) -> None:
        """A strategy's trials: reward, best reward so far and every metric, against the evaluation count."""
        best = -float("inf")
        for i, trial in enumerate(history, start=1):
            best = max(best, trial.reward)
            self.scalars(i, {"reward": trial.reward, "best_reward": best, **trial.metrics}, prefix=f"{name}/")

    def text(self, tag: str, text: str, step: int = 0) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def open_events(run_dir: "str | Path", enabled: bool) -> Events:
    """The run's TensorBoard events (a no-op writer when not enabled); ValueError if the extra is missing."""
    if not enabled:
        return Events()
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the optional tensorboard extra: pip install 'supernet[tensorboard]'") from None
    return Events(SummaryWriter(log_dir=str(Path(run_dir) / EVENTS)))


def check_available(enabled: bool) -> None:
    """ValueError before a run starts if TensorBoard logging is asked for but not installed."""
    if enabled:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise ValueError("--tensorboard needs the optional tensorboard extra: "
                             "pip install 'supernet[tensorboard]'") from None
