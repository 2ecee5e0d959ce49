"""DARTS second order: the unrolled hypergradient against a finite-difference estimate."""

import pytest
import torch
import torch.nn.functional as F

from supernet import SearchNetwork
from supernet.architect import first_order_gradient, unrolled_gradient


def unrolled_val_loss(net, train, val, xi):
    """L_val(w - xi * grad_w L_train(w, alpha), alpha), computed directly (weights restored after)."""
    weights = net.weight_parameters()
    saved = [w.detach().clone() for w in weights]
    grads = torch.autograd.grad(F.cross_entropy(net(train[0]), train[1]), weights, materialize_grads=True)
    with torch.no_grad():
        for w, g in zip(weights, grads, strict=True):
            w.sub_(xi * g)
        loss = F.cross_entropy(net(val[0]), val[1]).item()
        for w, s in zip(weights, saved, strict=True):
            w.copy_(s)
    return loss


@pytest.fixture(scope="module")
def problem():
    torch.manual_seed(0)
    net = SearchNetwork("darts", C=4, layers=1, num_classes=3, in_channels=1).double()
    with torch.no_grad():
        for a in net.arch_parameters():
            a.normal_(0, 0.5)  # away from uniform, so the alphas matter
    train = (torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (32,)))
    val = (torch.randn(32, 1, 8, 8, dtype=torch.float64), torch.randint(0, 3, (32,)))
    return net, train, val


def directional_fd(net, train, val, xi, direction, h=1e-5):
    """Central finite difference of alpha -> L_val(w - xi grad_w L_train(w, alpha), alpha) along `direction`."""
    arch = net.arch_parameters()

    def at(sign):
        with torch.no_grad():
            for a, d in zip(arch, direction, strict=True):
                a.add_(sign * h * d)
        value = unrolled_val_loss(net, train, val, xi)
        with torch.no_grad():
            for a, d in zip(arch, direction, strict=True):
                a.sub_(sign * h * d)
        return value

    return (at(1) - at(-1)) / (2 * h)


def dot(grads, direction):
    return sum(float((g * d).sum()) for g, d in zip(grads, direction, strict=True))


def test_unrolled_hypergradient_matches_finite_differences(problem):
    net, train, val = problem
    xi = 0.1
    torch.manual_seed(1)
    direction = [torch.randn_like(a) for a in net.arch_parameters()]
    fd = directional_fd(net, train, val, xi, direction)
    weights_before = [w.detach().clone() for w in net.weight_parameters()]
    buffers_before = [b.clone() for b in net.buffers()]

    exact_hvp, _ = unrolled_gradient(net, train, val, xi, radius=1e-6)  # tiny radius: the HVP is near exact
    darts, _ = unrolled_gradient(net, train, val, xi)  # the paper's radius 0.01
    # The weights come back bit for bit, and batch-norm statistics are untouched.
    assert all(torch.equal(w, b) for w, b in zip(net.weight_parameters(), weights_before, strict=True))
    assert all(torch.equal(a, b) for a, b in zip(list(net.buffers()), buffers_before, strict=True))
    first, _ = first_order_gradient(net, val)

    assert abs(dot(exact_hvp, direction) - fd) <= 1e-4 * abs(fd)
    err_first = abs(dot(first, direction) - fd)
    assert err_first > 0.1 * abs(fd), "the second-order term should matter at this xi"
    # The paper's radius crosses ReLU and max-pool kinks, so it is only roughly right; still better than first order.
    assert abs(dot(darts, direction) - fd) < 0.6 * err_first


def test_zero_step_is_the_first_order_gradient(problem):
    net, train, val = problem
    hyper, _ = unrolled_gradient(net, train, val, xi=0.0)
    first, _ = first_order_gradient(net, val)
    for h, f in zip(hyper, first, strict=True):
        torch.testing.assert_close(h, f, rtol=1e-9, atol=1e-12)


def test_an_error_inside_the_unrolled_step_leaves_the_weights_as_they_were(problem, monkeypatch):
    from supernet import architect

    net, train, val = problem
    before = [w.detach().clone() for w in net.weight_parameters()]
    real_loss_on, calls = architect.loss_on, []

    def failing_loss_on(net, batch):  # the second loss is the one at the moved weights w'
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("interrupted at w'")
        return real_loss_on(net, batch)

    monkeypatch.setattr(architect, "loss_on", failing_loss_on)
    with pytest.raises(RuntimeError, match="interrupted at w'"):
        unrolled_gradient(net, train, val, xi=0.5)
    for w, b in zip(net.weight_parameters(), before, strict=True):
        assert torch.equal(w, b)
