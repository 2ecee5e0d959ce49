"""Architecture steps: the alpha updates of DARTS (first and second order), GDAS and PC-DARTS.

The weights and the architecture parameters are separate parameter lists of one SearchNetwork
(`weight_parameters()` / `arch_parameters()`); an architecture step writes `.grad` of the latter
only and leaves the weights as it found them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .search_network import SearchNetwork, preserved_batchnorm

Batch = tuple[torch.Tensor, torch.Tensor]


def loss_on(net: SearchNetwork, batch: Batch) -> torch.Tensor:
    """Cross-entropy of the network on one (images, labels) batch."""
    x, y = batch
    return F.cross_entropy(net(x), y)


def first_order_gradient(net: SearchNetwork, val: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """grad_alpha L_val(w, alpha): DARTS first order, GDAS and PC-DARTS."""
    loss = loss_on(net, val)
    return list(torch.autograd.grad(loss, net.arch_parameters(), materialize_grads=True)), loss.detach()


def unrolled_gradient(net: SearchNetwork, train: Batch, val: Batch, xi: float,
                      radius: float = 0.01) -> tuple[list[torch.Tensor], torch.Tensor]:
    """DARTS second order: the gradient of L_val(w - xi * grad_w L_train(w, alpha), alpha) w.r.t. alpha.

        w'  = w - xi * grad_w L_train(w, alpha)                       (one virtual SGD step)
        hyper = grad_alpha L_val(w', alpha) - xi * H v,   v = grad_w' L_val(w', alpha)
        H v  ~= (grad_alpha L_train(w+, alpha) - grad_alpha L_train(w-, alpha)) / (2 eps)
        w+-  = w +- eps * v,   eps = radius / ||v||    (DARTS: radius 0.01)

    The virtual step is plain SGD as the DARTS paper writes it (no momentum or weight decay).
    Weights are moved in place and restored exactly; batch-norm statistics are left untouched.
    Returns the hypergradient per architecture parameter and L_val(w', alpha).
    """
    weights, arch = net.weight_parameters(), net.arch_parameters()
    with preserved_batchnorm(net):
        saved = [w.detach().clone() for w in weights]
        grad_train = torch.autograd.grad(loss_on(net, train), weights, materialize_grads=True)
        with torch.no_grad():
            torch._foreach_add_(weights, grad_train, alpha=-xi)  # w -> w'
        val_loss = loss_on(net, val)
        grads = torch.autograd.grad(val_loss, arch + weights, materialize_grads=True)
        d_arch, v = grads[:len(arch)], grads[len(arch):]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v))).item()
        eps = radius / max(norm, 1e-12)
        try:
            with torch.no_grad():
                torch._foreach_copy_(weights, saved)
                torch._foreach_add_(weights, v, alpha=eps)  # w+
            g_plus = torch.autograd.grad(loss_on(net, train), arch, materialize_grads=True)
            with torch.no_grad():
                torch._foreach_add_(weights, v, alpha=-2 * eps)  # w-
            g_minus = torch.autograd.grad(loss_on(net, train), arch, materialize_grads=True)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(weights, saved)
    scale = xi / (2 * eps)
    hyper = [d - scale * (p - m) for d, p, m in zip(d_arch, g_plus, g_minus, strict=True)]
    return hyper, val_loss.detach()


def apply_gradient(optimizer: torch.optim.Optimizer, params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """Sets `.grad` of `params` to `grads` and takes one optimizer step."""
    for p, g in zip(params, grads, strict=True):
        p.grad = g
    optimizer.step()
