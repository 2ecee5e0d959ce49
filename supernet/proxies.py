"""Zero-cost proxies: scores of an untrained network built from a genotype, computed at initialisation.

Semantics follow the zero-cost-proxies paper's measures (Abdelfattah et al., 2021, "Zero-Cost Proxies for
Lightweight NAS") and NASWOT (Mellor et al., 2021); each is summed over the network's Conv2d and Linear
layers where it is per weight:

- `synflow`: sum |w * dR/dw| where R = sum of the outputs of the network with every parameter and buffer
  made non-negative (|.|), batch norm removed, in float64, on an all-ones input. Needs no data (only the
  input shape).
- `snip`: sum |w * dL/dw|, L the cross-entropy of one batch (= the gradient of a weight mask).
- `grad_norm`: sum over layers of the L2 norm of dL/dw.
- `jacov`: -sum(log(v + k) + 1 / (v + k)) over the eigenvalues v of the correlation matrix of the
  per-example input gradients of the summed logits, k = 1e-5 (the paper's `jacob_cov`); a non-finite
  result (e.g. every example has the same Jacobian) scores -inf.
- `naswot`: log|K| with K = sum over ReLUs of c c^T + (1 - c)(1 - c)^T, c the binary activation code
  (input > 0) of each example (NASWOT's score).
- `params`: trainable parameters (`count_parameters`). Needs no data.
- `flops`: multiply-adds of convolutions and linear layers for one example. Needs no data (only the
  input shape).

The network is `EvalNetwork(space, genotype, C, layers, num_classes, in_channels=...)`, initialised under
`torch.manual_seed(seed)` in training mode (batch norm uses batch statistics), so a score is a
deterministic function of (name, genotype, space, batches, seed, network size). The global random
state is left unchanged.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .eval_network import EvalNetwork, count_parameters
from .spaces import CellSpace, get_space

Batch = tuple[torch.Tensor, torch.Tensor]

# Network size per space when not given: NAS-Bench-201's (C=16, N=5); a small DARTS network.
DEFAULT_SIZE = {"nb201": (16, 5), "darts": (16, 8)}
DATA_FREE = ("synflow", "params", "flops")


def _layers(net: nn.Module) -> list[nn.Module]:
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _cross_entropy_grads(net: nn.Module, batches: Sequence[Batch]) -> None:
    net.zero_grad()
    for x, y in batches:
        nn.functional.cross_entropy(net(x), y).backward()


def _synflow(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    net = copy.deepcopy(net)
    for module in list(net.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.modules.batchnorm._BatchNorm):
                setattr(module, child_name, nn.Identity())
    net = net.double()
    with torch.no_grad():
        for tensor in net.state_dict().values():
            if tensor.is_floating_point():
                tensor.abs_()
    net.zero_grad()
    out = net(torch.ones((1,) + tuple(input_shape), dtype=torch.float64))
    out.sum().backward()
    with torch.no_grad():
        return float(sum((m.weight * m.weight.grad).abs().sum() for m in _layers(net) if m.weight.grad is not None))


def _snip(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    _cross_entropy_grads(net, batches)
    with torch.no_grad():
        return float(sum((m.weight * m.weight.grad).abs().sum() for m in _layers(net) if m.weight.grad is not None))


def _grad_norm(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    _cross_entropy_grads(net, batches)
    with torch.no_grad():
        return float(sum(m.weight.grad.norm() for m in _layers(net) if m.weight.grad is not None))


def _jacov(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    jacobians = []
    for x, _ in batches:
        x = x.clone().requires_grad_(True)
        net.zero_grad()
        y = net(x)
        y.backward(torch.ones_like(y))
        jacobians.append(x.grad.detach().reshape(len(x), -1))
    jac = torch.cat(jacobians).double().numpy()
    with np.errstate(all="ignore"):
        corrs = np.corrcoef(jac)
        if not np.isfinite(corrs).all():
            return -math.inf
        v = np.linalg.eigvalsh(corrs)
        k = 1e-5
        value = -float(np.sum(np.log(v + k) + 1.0 / (v + k)))
    return value if math.isfinite(value) else -math.inf


def _naswot(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    n = sum(len(x) for x, _ in batches)
    kernel = torch.zeros(n, n, dtype=torch.float64)
    offset = [0]

    def hook(module: nn.Module, inputs: Any) -> None:
        codes = (inputs[0].detach().reshape(len(inputs[0]), -1) > 0).double()
        lo = offset[0]
        hi = lo + len(codes)
        kernel[lo:hi, lo:hi] += codes @ codes.T + (1.0 - codes) @ (1.0 - codes).T

    handles = [m.register_forward_pre_hook(hook) for m in net.modules() if isinstance(m, nn.ReLU)]
    try:
        with torch.no_grad():
            for x, _ in batches:
                net(x)
                offset[0] += len(x)
    finally:
        for h in handles:
            h.remove()
    # Examples of different batches never share a ReLU pass: NASWOT scores one batch; with several,
    # the kernel is block-diagonal and its log-determinant the sum of the batches' scores.
    sign, logdet = torch.linalg.slogdet(kernel)
    return float(logdet) if sign > 0 else -math.inf


def _params(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    return float(count_parameters(net))


def _flops(net: nn.Module, batches: Sequence[Batch], input_shape: tuple[int, ...]) -> float:
    total = [0]

    def hook(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total[0] += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        else:
            total[0] += output[0].numel() * module.in_features

    handles = [m.register_forward_hook(hook) for m in _layers(net)]
    try:
        with torch.no_grad():
            net(torch.zeros((1,) + tuple(input_shape)))
    finally:
        for h in handles:
            h.remove()
    return float(total[0])


PROXIES: dict[str, Callable[[nn.Module, Sequence[Batch], tuple[int, ...]], float]] = {
    "synflow": _synflow, "snip": _snip, "grad_norm": _grad_norm, "jacov": _jacov, "naswot": _naswot,
    "params": _params, "flops": _flops,
}


def list_proxies() -> list[str]:
    """Names of the zero-cost proxies (higher = predicted better, for every one)."""
    return list(PROXIES)


def needs_data(name: str) -> bool:
    """Whether the proxy reads real batches (synflow, params and flops need only the input shape)."""
    check_proxy(name)
    return name not in DATA_FREE


def check_proxy(name: str) -> str:
    if name not in PROXIES:
        raise ValueError(f"unknown zero-cost proxy {name!r}; expected one of {list_proxies()}")
    return name


def build_network(genotype: Any, space: "str | CellSpace" = "nb201", seed: int = 0, C: int | None = None,
                  layers: int | None = None, num_classes: int = 10, in_channels: int = 1) -> EvalNetwork:
    """The network a proxy scores: `EvalNetwork` of the genotype, initialised under `seed`."""
    space = get_space(space)
    C0, layers0 = DEFAULT_SIZE.get(space.name, (16, 8))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = EvalNetwork(space, genotype, C=C or C0, layers=layers or layers0, num_classes=num_classes,
                          in_channels=in_channels)
    return net.train()


def score(name: str, genotype: Any, space: "str | CellSpace" = "nb201", batches: Sequence[Batch] | None = None,
          seed: int = 0, input_shape: Sequence[int] | None = None, C: int | None = None, layers: int | None = None,
          num_classes: int | None = None) -> float:
    """One zero-cost proxy of one genotype (higher = predicted better).

    `batches`: real (x, y) batches, needed by snip, grad_norm, jacov and naswot; the data-free proxies
    (synflow, params, flops) need only `input_shape` (C, H, W), taken from the batches when given.
    `num_classes` defaults to 1 + the largest label in the batches (10 without batches).
    """
    check_proxy(name)
    batches = list(batches or [])
    for i, batch in enumerate(batches):
        if (not isinstance(batch, (tuple, list)) or len(batch) != 2 or not isinstance(batch[0], torch.Tensor)
                or batch[0].dim() != 4):
            raise ValueError(f"batch {i} must be (images of shape (N, C, H, W), labels), got {type(batch).__name__}")
    if needs_data(name) and not batches:
        raise ValueError(f"zero-cost proxy {name!r} needs real batches; only {list(DATA_FREE)} need no data")
    if input_shape is None:
        if not batches:
            raise ValueError(f"zero-cost proxy {name!r} needs input_shape (C, H, W) or batches")
        input_shape = tuple(batches[0][0].shape[1:])
    input_shape = tuple(int(s) for s in input_shape)
    if len(input_shape) != 3 or min(input_shape) < 1:
        raise ValueError(f"input_shape must be (channels, height, width), got {input_shape}")
    if num_classes is None:
        num_classes = int(max(int(y.max()) for _, y in batches)) + 1 if batches else 10
    net = build_network(genotype, space, seed, C, layers, num_classes, input_shape[0])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return PROXIES[name](net, batches, input_shape)


def digits_batches(batch_size: int = 64, num_batches: int = 1, seed: int = 0) -> list[Batch]:
    """A seeded draw of real batches from scikit-learn's embedded digits (1,797 8x8 images, 1 channel)."""
    from .data import load_digits

    x, y = load_digits()
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(x), generator=g)[:batch_size * num_batches]
    return [(x[idx[i:i + batch_size]], y[idx[i:i + batch_size]]) for i in range(0, len(idx), batch_size)]


def rank_by_proxy(name: str, genotypes: Sequence[Any], space: "str | CellSpace" = "nb201",
                  batches: Sequence[Batch] | None = None, seed: int = 0, **options: Any) -> list[Any]:
    """The genotypes sorted by the proxy, best first (ties keep their order). Without `batches`, a
    proxy that needs data reads one seeded batch of 64 digits."""
    check_proxy(name)
    if batches is None:
        batches = digits_batches(seed=seed)
    scores = [score(name, g, space, batches, seed=seed, **options) for g in genotypes]
    order = sorted(range(len(genotypes)), key=lambda i: (-scores[i], i))
    return [genotypes[i] for i in order]
