"""Export a searched model out of the library: a `torch.export` program (or ONNX) that runs without supernet.

A search run folder keeps its retrained networks as `retrained_<name>.pt` (`supernet.retrain`: genotype,
network settings, input shape and weights). `export(run_dir, out)` rebuilds the derived one, traces it with torch.export
(batch size left dynamic), checks the program against the in-library model on a batch, then writes it
atomically. `subnet=True` exports the supernet's chosen path with its inherited weights instead.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import runs
from .retrain import load_retrained
from .search_network import recalibrate_batchnorm
from .search_run import load_run


class _Logits(nn.Module):
    """A model whose forward returns logits only, in eval mode (what an exported classifier runs)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def export_program(model: nn.Module, example: torch.Tensor, path: "str | Path", onnx: bool = False) -> Path:
    """Traces `model` on `example` (dynamic batch), checks the program gives the model's outputs, writes it."""
    model = _Logits(model).eval()
    batch = torch.export.Dim("batch", min=1)
    with torch.no_grad():
        expected = model(example)
        program = torch.export.export(model, (example,), dynamic_shapes=({0: batch},))
        got = program.module()(example)
    if not torch.allclose(got, expected, rtol=1e-4, atol=1e-5):
        worst = (got - expected).abs().max().item()
        raise ValueError(f"the exported program differs from the model by up to {worst:.3g}; nothing was written")
    if onnx:
        return _write_onnx(model, example, batch, Path(path))
    buffer = io.BytesIO()
    torch.export.save(program, buffer)
    return runs.atomic_write_bytes(buffer.getvalue(), path)


def _write_onnx(model: nn.Module, example: torch.Tensor, batch: Any, path: Path) -> Path:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError:
        raise ValueError("ONNX export needs the optional onnx extra: pip install 'supernet[onnx]'") from None
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        program = torch.onnx.export(model, (example,), dynamic_shapes=({0: batch},), dynamo=True, verbose=False)
        program.save(str(Path(tmp) / "model.onnx"))
        return runs.atomic_write_bytes((Path(tmp) / "model.onnx").read_bytes(), path)


def export(run_dir: "str | Path", out: "str | Path", *, subnet: bool = False, onnx: bool = False,
           data: "tuple[torch.Tensor, torch.Tensor] | None" = None) -> Path:
    """Exports a search run's model to `out`: the retrained derived network, or (`subnet=True`) the
    supernet's chosen path with inherited weights (batch norm re-estimated on training batches).

    Load it with `torch.export.load(out).module()` (no supernet needed), or with onnxruntime for `onnx=True`.
    `data` is the (images, labels) a run searched on tensors needs again for `subnet=True`.
    """
    if subnet:
        model, example = _chosen_subnet(run_dir, data)
    else:
        model, (h, w) = load_retrained(run_dir, "derived")
        example = torch.randn(2, model.in_channels, h, w, generator=torch.Generator().manual_seed(0))
    return export_program(model, example, out, onnx=onnx)


def _chosen_subnet(run_dir: "str | Path", data: Any) -> tuple[nn.Module, torch.Tensor]:
    run = load_run(run_dir, data=data)
    if run.genotype is None:
        raise ValueError(f"run {str(run_dir)!r} has not finished its search: no genotype was chosen yet")
    run.network.fused = False  # plain ATen ops only: the program must run without supernet's custom ops
    sub = run.network.subnet(run.genotype)
    x = run.split.train[0]
    recalibrate_batchnorm(sub, (x[i:i + 64] for i in range(0, min(len(x), 256), 64)))
    return sub.eval(), run.split.test[0][:2].contiguous()
