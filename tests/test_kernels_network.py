"""SearchNetwork(fused=True) against the reference path: logits, gradients, statistics, search steps, compile."""

import copy
import random

import pytest
import torch

from supernet import SearchNetwork, get_space

SIZES = {"darts": dict(C=4, layers=3), "nb201": dict(C=4, layers=1)}  # darts: a normal and two reduction cells
INPUT = {"darts": (2, 3, 9, 9), "nb201": (2, 3, 8, 8)}  # darts runs odd sides too (nb201 reduces by 2 exactly)


def twin_networks(space, mixing, seed=0):
    torch.manual_seed(seed)
    genotype = get_space(space).random_genotype(random.Random(seed)) if mixing == "fixed" else None
    ref = SearchNetwork(space, num_classes=5, in_channels=3, mixing=mixing, genotype=genotype, fused=False,
                        **SIZES[space])
    fused = copy.deepcopy(ref)
    fused.fused = True
    return ref, fused


def assert_gradients_close(ref, fused):
    names = [n for n, p in ref.named_parameters() if p.grad is not None]
    assert names, "some parameter got a gradient"
    # biases in front of a batch norm have gradients that are zero up to rounding: scale atol by the largest
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    for (name, p), q in zip(ref.named_parameters(), fused.parameters()):
        assert (p.grad is None) == (q.grad is None), f"{name}: gradient present in one path only"
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=2e-5 * scale, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("mixing", ["softmax", "gumbel", "sample", "partial", "fixed"])
@pytest.mark.parametrize("space", ["darts", "nb201"])
def test_fused_network_gives_the_reference_logits_gradients_and_statistics(implementation, space, mixing):
    ref, fused = twin_networks(space, mixing)
    x = torch.randn(INPUT[space], generator=torch.Generator().manual_seed(1))
    outs = []
    for net in (ref, fused):
        torch.manual_seed(2)  # the same Gumbel / path draws
        out = net(x)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert_gradients_close(ref, fused)
    for (name, a), b in zip(ref.named_buffers(), fused.buffers()):
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("space, mixing", [("darts", "softmax"), ("nb201", "gumbel")])
def test_twenty_search_steps_give_the_same_alphas(space, mixing):
    # Learning rates where training is not chaotic: at lr 0.5 on the alphas a 1e-12 nudge of the
    # reference's own weights grew to O(1) alpha differences within 5 steps, hiding any real difference.
    # float64, since in float32 a max-pool tie or a ReLU at zero can flip on rounding alone.
    ref, fused = (net.double() for net in twin_networks(space, mixing, seed=3))
    data = torch.Generator().manual_seed(4)
    side = 7 if space == "darts" else 8
    batches = [(torch.randn(4, 3, side, side, generator=data, dtype=torch.float64), torch.randint(0, 5, (4,), generator=data))
               for _ in range(4)]
    optimizers = {}
    for net in (ref, fused):
        optimizers[net] = (torch.optim.SGD(net.weight_parameters(), lr=0.01, momentum=0.9),
                           torch.optim.SGD(net.arch_parameters(), lr=0.1))
    initial = [a.detach().clone() for a in ref.arch_parameters()]
    for step in range(20):
        x, y = batches[step % len(batches)]
        for net in (ref, fused):
            for opt in optimizers[net]:
                torch.manual_seed(step)  # the same Gumbel draws
                opt.zero_grad()
                torch.nn.functional.cross_entropy(net(x), y).backward()
                opt.step()
    for a, b, a0 in zip(ref.arch_parameters(), fused.arch_parameters(), initial):
        assert (a - a0).abs().max() > 1e-4, "the alphas moved"
        torch.testing.assert_close(b, a, atol=1e-12, rtol=1e-10)


def test_compiled_fused_search_step_has_no_graph_breaks():
    # fullgraph=True raises on any graph break; aot_eager also runs the fake and autograd registrations
    ref, fused = twin_networks("nb201", "softmax")
    x = torch.randn(INPUT["nb201"], generator=torch.Generator().manual_seed(1))
    step = torch.compile(lambda inp: fused(inp).square().mean(), fullgraph=True, backend="aot_eager")
    loss = step(x)
    loss.backward()
    expected = ref(x).square().mean()
    expected.backward()
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(fused.alphas("cell").grad, ref.alphas("cell").grad, atol=1e-6, rtol=1e-4)
