"""Load and export the original DARTS search network's state (quark0/darts `cnn/model_search.py`).

DARTS names an edge's candidates by position (`cells.0._ops.3._ops.4.op.1.weight`: cell 0, edge 3,
primitive 4 = sep_conv_3x3) and keeps its two alpha tensors outside the state_dict. Our network names
candidates by op (`cells.0.edges.3.ops.sep_conv_3x3.op.1.weight`) and registers the alphas.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from ..search_network import SearchNetwork
from ..spaces.darts import PRIMITIVES

_DARTS_EDGE = re.compile(r"^(cells\.\d+)\._ops\.(\d+)\._ops\.(\d+)\.(.+)$")
_DARTS_PRE = re.compile(r"^(cells\.\d+\.preprocess[01])\.op\.(.+)$")
_OURS_EDGE = re.compile(r"^(cells\.\d+)\.edges\.(\d+)\.ops\.([a-z0-9_]+)\.(.+)$")
_OURS_PRE = re.compile(r"^(cells\.\d+\.preprocess[01])\.(\d+\..+)$")
_ALPHAS = ("alphas_normal", "alphas_reduce")


def _to_ours(key: str) -> str:
    if m := _DARTS_EDGE.match(key):
        cell, edge, k, rest = m.groups()
        if int(k) >= len(PRIMITIVES):
            raise ValueError(f"DARTS key {key!r} names primitive {k}; DARTS has {len(PRIMITIVES)}")
        return f"{cell}.edges.{edge}.ops.{PRIMITIVES[int(k)]}.{rest}"
    if m := _DARTS_PRE.match(key):
        return f"{m[1]}.{m[2]}"
    return key


def _to_darts(key: str) -> str:
    if m := _OURS_EDGE.match(key):
        cell, edge, op, rest = m.groups()
        return f"{cell}._ops.{edge}._ops.{PRIMITIVES.index(op)}.{rest}"
    if m := _OURS_PRE.match(key):
        return f"{m[1]}.op.{m[2]}"
    return key


def _tensor(name: str, value: object) -> torch.Tensor:
    """`value` as a float32 tensor (DARTS alphas given as nested lists are accepted)."""
    if isinstance(value, torch.Tensor):
        return value
    try:
        return torch.tensor(value, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a tensor or a nested list of numbers, got {type(value).__name__}") from None


def from_darts(state_dict: Mapping[str, torch.Tensor], alphas_normal: torch.Tensor | None = None,
               alphas_reduce: torch.Tensor | None = None) -> SearchNetwork:
    """A softmax-mixing SearchNetwork holding a DARTS search network's weights and alphas.

    C, layers, classes and input channels are read from the tensors' shapes (DARTS's defaults of
    4 steps, multiplier 4 and stem multiplier 3). The alphas may also be entries of `state_dict`.
    """
    state = dict(state_dict)
    alphas = {}
    for name, given in zip(_ALPHAS, (alphas_normal, alphas_reduce)):
        value = given if given is not None else state.get(name)
        if value is None:
            raise ValueError(f"missing {name}: pass it, or include it in the state_dict")
        alphas[name] = _tensor(name, value)
        state.pop(name, None)
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"DARTS state_dict entry {key!r} is a {type(value).__name__}; expected a tensor")
    for required in ("stem.0.weight", "classifier.weight"):
        if required not in state:
            raise ValueError(f"not a DARTS search-network state_dict: key {required!r} is missing")
    stem = state["stem.0.weight"]
    if stem.shape[0] % 3:
        raise ValueError(f"stem has {stem.shape[0]} channels; DARTS's stem has 3*C")
    cells = {int(k.split(".")[1]) for k in state if k.startswith("cells.")}
    net = SearchNetwork("darts", C=stem.shape[0] // 3, layers=len(cells), num_classes=state["classifier.weight"].shape[0],
                        in_channels=stem.shape[1])
    ours = {_to_ours(k): v for k, v in state.items()}
    ours.update(alphas)
    for name in _ALPHAS:
        if tuple(ours[name].shape) != tuple(getattr(net, name).shape):
            raise ValueError(f"{name} has shape {tuple(ours[name].shape)}; expected {tuple(getattr(net, name).shape)}")
    expected = set(net.state_dict())
    missing, unexpected = sorted(expected - set(ours)), sorted(set(ours) - expected)
    if missing or unexpected:
        raise ValueError(f"state_dict does not match a DARTS search network with C={net.C}, layers={net.layers}: "
                         f"missing {[_to_darts(k) for k in missing][:5]}, unexpected {[_to_darts(k) for k in unexpected][:5]}")
    for k, v in net.state_dict().items():
        if tuple(ours[k].shape) != tuple(v.shape):
            raise ValueError(f"DARTS key {_to_darts(k)!r} has shape {tuple(ours[k].shape)}; expected {tuple(v.shape)}")
    net.load_state_dict(ours)
    return net


def to_darts(net: SearchNetwork) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """(DARTS-layout state_dict, alphas_normal, alphas_reduce) of a softmax-mixing darts SearchNetwork."""
    if net.space.name != "darts" or net.mixing.name != "softmax":
        raise ValueError(f"only a darts network with softmax mixing has a DARTS layout, got space "
                         f"{net.space.name!r} with mixing {net.mixing.name!r}")
    state = {_to_darts(k): v.detach().clone() for k, v in net.state_dict().items() if k not in _ALPHAS}
    return state, net.alphas_normal.detach().clone(), net.alphas_reduce.detach().clone()
