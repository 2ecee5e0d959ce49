"""Architecture steps: the alpha updates of DARTS (first and second order), GDAS and PC-DARTS; regularisers.

The weights and the architecture parameters are separate parameter lists of one SearchNetwork
(`weight_parameters()` / `arch_parameters()`); an architecture step writes `.grad` of the latter
only and leaves the weights as it found them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .search_network import SearchNetwork, preserved_batchnorm

Batch = tuple[torch.Tensor, torch.Tensor]


def _no_reduce(tensors: list[torch.Tensor]) -> None:
    return None


@dataclass
class StepContext:
    """How a step's losses are computed: the module to call (compiled or not), autocast, the fp16 loss scale,
    and the average over ranks (`reduce`, in place). The default is one process in fp32."""

    model: nn.Module | None = None  # what is called on the images (default: the network itself)
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    scale: Callable[[torch.Tensor], torch.Tensor] = field(default=lambda loss: loss)
    reduce: Callable[[list[torch.Tensor]], None] = _no_reduce


def _batches(batch: "Batch | Sequence[Batch]") -> list[Batch]:
    """One (images, labels) batch, or a list of micro-batches, as a list."""
    if isinstance(batch, tuple) and len(batch) == 2 and isinstance(batch[0], torch.Tensor):
        return [batch]
    return list(batch)


def rng_state(device: torch.device) -> tuple:
    """The generator states a forward may draw from (torch's CPU one and the device's)."""
    return (torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None)


def set_rng_state(state: tuple, device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def mean_gradient(net: SearchNetwork, batch: "Batch | Sequence[Batch]", params: list[torch.Tensor],
                  ctx: StepContext | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """grad of the mean loss over micro-batches (and over ranks, through `ctx.reduce`) w.r.t. `params`.

    Every micro-batch sees the same random draws (Gumbel samples, SPOS paths): the generators are
    rewound before each, so the draws are those of one forward over the whole batch, as on every rank.
    Returns the (scaled, for fp16) gradients and the mean loss (unscaled, detached).
    """
    ctx = ctx or StepContext()
    batches = _batches(batch)
    if len(batches) == 1 and ctx.reduce is _no_reduce:
        with ctx.autocast():
            loss = loss_on(ctx.model or net, batches[0])
        return list(torch.autograd.grad(ctx.scale(loss), params, materialize_grads=True)), loss.detach().float()
    device = params[0].device
    start = rng_state(device)
    total, loss_sum = None, torch.zeros((), device=device)
    for i, b in enumerate(batches):
        if i:
            set_rng_state(start, device)
        with ctx.autocast():
            loss = loss_on(ctx.model or net, b)
        grads = torch.autograd.grad(ctx.scale(loss / len(batches)), params, materialize_grads=True)
        total = list(grads) if total is None else [t + g for t, g in zip(total, grads, strict=True)]
        loss_sum = loss_sum + loss.detach().float() / len(batches)
    ctx.reduce(total + [loss_sum])
    return total, loss_sum


def loss_on(net: SearchNetwork, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the network on one (images, labels) batch."""
    x, y = batch
    return F.cross_entropy(net(x), y)


def first_order_gradient(net: SearchNetwork, val: "Batch | Sequence[Batch]",
                         ctx: StepContext | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """grad_alpha L_val(w, alpha): DARTS first order, GDAS and PC-DARTS (`val`: a batch or micro-batches)."""
    return mean_gradient(net, val, net.arch_parameters(), ctx)


def unrolled_gradient(net: SearchNetwork, train: "Batch | Sequence[Batch]", val: "Batch | Sequence[Batch]", xi: float,
                      radius: float = 0.01, ctx: StepContext | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DARTS second order: the gradient of L_val(w - xi * grad_w L_train(w, alpha), alpha) w.r.t. alpha.

        w'  = w - xi * grad_w L_train(w, alpha)                       (one virtual SGD step)
        hyper = grad_alpha L_val(w', alpha) - xi * H v,   v = grad_w' L_val(w', alpha)
        H v  ~= (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps)
        w+-  = w +- eps * v,   eps = radius / ||v||    (DARTS: radius 0.01)

    The virtual step is plain SGD as the DARTS paper writes it (no momentum or weight decay).
    Weights are moved in place and restored exactly; batch-norm statistics are left untouched.
    Returns the hypergradient per architecture parameter and L_val(w', alpha). Under data parallelism
    (`ctx.reduce`) grad_w L_train and v are averaged over the ranks before they move the weights, so
    every rank takes the same virtual step and finite difference as one process with the whole batch.
    """
    weights, arch = net.weight_parameters(), net.arch_parameters()
    with preserved_batchnorm(net):
        saved = [w.detach().clone() for w in weights]
        grad_train, _ = mean_gradient(net, train, weights, ctx)
        try:  # every move of the weights happens inside: an error anywhere leaves them as they were
            with torch.no_grad():
                torch._foreach_add_(weights, grad_train, alpha=-xi)  # w -> w'
            grads, val_loss = mean_gradient(net, val, arch + weights, ctx)
            d_arch, v = grads[:len(arch)], grads[len(arch):]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v))).item()
            eps = radius / max(norm, 1e-12)
            with torch.no_grad():
                torch._foreach_copy_(weights, saved)
                torch._foreach_add_(weights, v, alpha=eps)  # w+
            g_plus, _ = mean_gradient(net, train, arch, ctx)
            with torch.no_grad():
                torch._foreach_add_(weights, v, alpha=-2 * eps)  # w-
            g_minus, _ = mean_gradient(net, train, arch, ctx)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, saved)
    scale = xi / (2 * eps)
    hyper = [d - scale * (p - m) for d, p, m in zip(d_arch, g_plus, g_minus, strict=True)]
    return hyper, val_loss


def dirichlet_kl(alphas: Sequence[torch.Tensor], prior: float = 1.0) -> torch.Tensor:
    """DrNAS's regulariser: sum over edges of KL(Dirichlet(elu(alpha) + 1) || Dirichlet(prior))."""
    total = torch.zeros((), device=alphas[0].device)
    for a in alphas:
        q = torch.distributions.Dirichlet(F.elu(a.float()) + 1)
        p = torch.distributions.Dirichlet(torch.full_like(a, prior, dtype=torch.float32))
        total = total + torch.distributions.kl_divergence(q, p).sum()
    return total


def beta_decay(alphas: Sequence[torch.Tensor]) -> torch.Tensor:
    """beta-DARTS's regulariser: the mean over edges (of every cell type) of logsumexp(alpha_edge)."""
    return torch.cat([torch.logsumexp(a.float(), dim=-1) for a in alphas]).mean()


REGULARISERS: dict[str, Callable[[Sequence[torch.Tensor]], torch.Tensor]] = {
    "dirichlet-kl": dirichlet_kl, "beta-decay": beta_decay}


def regulariser_gradient(net: SearchNetwork, name: str, weight: float,
                         ctx: StepContext | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """grad w.r.t. every architecture parameter of weight * REGULARISERS[name](alphas), scaled as the loss is
    (fp16), and the term's (unscaled, detached) value. The term depends on the alphas alone, so every rank
    computes the same one: added to the validation loss's gradient, it is the gradient of the sum."""
    ctx = ctx or StepContext()
    arch = net.arch_parameters()
    alphas = [net.alphas(ct) for ct in net.space.cell_types]
    term = weight * REGULARISERS[name](alphas)
    grads = torch.autograd.grad(ctx.scale(term), arch, materialize_grads=True, allow_unused=True)
    return list(grads), term.detach()


def apply_gradient(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Sets `.grad` of `params` to `grads` and takes one optimizer step."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
