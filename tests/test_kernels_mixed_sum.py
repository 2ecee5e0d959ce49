"""mixed_sum: the custom op's wrapper with each implementation (Triton, interpreted without a GPU; the CPU's own
in-place accumulation) against a float64 run, and what dispatch sends through it."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kernels import mixed_sum as kernel
from kernels.mixed_sum import MixedSum, mixed_sum_reference
from supernet import dispatch
from tests.compare import assert_close, assert_error_bounded

pytestmark = pytest.mark.usefixtures("nan_fill")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: steadier than elementwise bounds for reductions."""
    e = expected.double()
    return ((actual.double() - e).norm() / e.norm().clamp_min(1e-30)).item()


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def candidates(shape, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(DEVICE).requires_grad_() for _ in range(k)]


def float64_twins(tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def check_against_float64(outputs, weights, seed, path):
    """path(outputs, weights) against the reference, both measured from a float64 run, forward and backward."""
    inputs = outputs + ([weights] if weights is not None else [])
    exact_inputs = float64_twins(inputs)
    exact_weights = exact_inputs[len(outputs)] if weights is not None else None
    got = path(outputs, weights)
    ref = mixed_sum_reference(outputs, weights)
    exact = mixed_sum_reference(exact_inputs[:len(outputs)], exact_weights)
    assert_error_bounded(got, ref, exact, "forward")
    grad = torch.randn(got.shape, generator=torch.Generator().manual_seed(seed + 1)).to(got.dtype).to(DEVICE)
    got_grads = torch.autograd.grad(got, inputs, grad)
    ref_grads = torch.autograd.grad(ref, inputs, grad)
    exact_grads = torch.autograd.grad(exact, exact_inputs, grad.double())
    for i, (a, r, e) in enumerate(zip(got_grads, ref_grads, exact_grads)):
        assert_error_bounded(a, r, e, "weight gradient" if i == len(outputs) else f"gradient of candidate {i}")


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shape=shapes, k=st.integers(2, 8), dtype=dtypes, weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_wrapper_is_as_close_to_float64_as_the_reference(implementation, shape, k, dtype, weighted, seed):
    outputs = candidates(shape, k, dtype, seed)
    weights = torch.softmax(torch.randn(k), 0).to(DEVICE).requires_grad_() if weighted else None
    check_against_float64(outputs, weights, seed, kernel.mixed_sum)


@pytest.mark.parametrize("weighted", [True, False])
def test_each_implementation_runs_its_own_code(monkeypatch, implementation, weighted):
    calls = []
    for name in ("mixed_sum_forward", "mixed_sum_backward", "mixed_sum_cpu_forward", "mixed_sum_cpu_backward",
                 "mixed_sum_reference"):
        original = getattr(kernel, name)
        monkeypatch.setattr(kernel, name, lambda *a, name=name, original=original: calls.append(name) or original(*a))
    outputs = candidates((3, 5), 4, torch.float32, 0)
    weights = torch.randn(4, device=DEVICE, requires_grad=True) if weighted else None
    kernel.mixed_sum(outputs, weights).sum().backward()
    expected = {"triton": ["mixed_sum_forward", "mixed_sum_backward"],
                "torch": ["mixed_sum_cpu_forward", "mixed_sum_cpu_backward"]}[implementation]
    assert calls == expected


def test_weight_gradient_reduction_spans_many_programs(implementation):
    # 5000 elements: several programs each write a partial sum that the finishing kernel adds up
    outputs = candidates((5000,), 3, torch.float32, 0)
    weights = torch.randn(3, device=DEVICE, requires_grad=True)
    check_against_float64(outputs, weights, 0, kernel.mixed_sum)


def test_hard_straight_through_weights_give_gdas_gradients_without_leaving_the_device(implementation):
    # GDAS: one-hot values, softmax gradients; the kernel sees ordinary device weights
    alphas = torch.randn(5, device=DEVICE, requires_grad=True)
    probs = F.softmax(alphas / 0.5, dim=0)
    hard = (probs - probs.detach()) + F.one_hot(probs.argmax(), 5).to(probs.dtype)
    outputs = candidates((3, 4, 5), 5, torch.float32, 3)
    fused = kernel.mixed_sum(outputs, hard)
    expected = mixed_sum_reference(outputs, hard)
    chosen = int(probs.argmax())
    assert torch.equal(fused, outputs[chosen].detach()), "the forward value is exactly the sampled candidate"
    got = torch.autograd.grad(fused.square().sum(), [alphas, *outputs], retain_graph=True)
    want = torch.autograd.grad(expected.square().sum(), [alphas, *outputs])
    assert relative_rms(got[0], want[0]) < 1e-5
    assert got[0].abs().sum() > 0, "every alpha gets a straight-through gradient"
    for a, e in zip(got[1:], want[1:]):
        assert_close(a, e, 1e-6, 1e-6, "candidate gradient")


def test_unweighted_sum_passes_ones_to_every_candidate(implementation):
    outputs = candidates((7, 3), 4, torch.float32, 1)
    grads = torch.autograd.grad(kernel.mixed_sum(outputs, None).sum(), outputs)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_dispatch_sends_enough_candidates_through_the_wrapper(implementation, dtype, weighted):
    k = dispatch.CPU_MIN_CANDIDATES
    outputs = candidates((2, 3, 5, 7), k, dtype, 7)
    weights = torch.randn(k, device=DEVICE, requires_grad=True) if weighted else None
    got = dispatch.mixed_sum(outputs, weights, fused=True)
    assert type(got.grad_fn).__name__ == MixedSum.__name__ + "Backward", "the fused call runs the kernel's wrapper"
    check_against_float64(outputs, weights, 7, lambda o, w: dispatch.mixed_sum(o, w, fused=True))


def test_dispatch_sums_few_cpu_candidates_with_plain_torch_ops():
    # below CPU_MIN_CANDIDATES the wrapper's call costs more than it saves on the CPU (bench/README.md)
    outputs = [torch.randn(3, 4, requires_grad=True) for _ in range(dispatch.CPU_MIN_CANDIDATES - 1)]
    got = dispatch.mixed_sum(outputs, torch.ones(len(outputs)), fused=True)
    assert type(got.grad_fn).__name__ != MixedSum.__name__ + "Backward"


def test_custom_op_registrations_pass_opcheck(implementation):
    # the ops are forward-only (MixedSum is their autograd): checked on inputs that do not require grad
    outputs = [o.detach() for o in candidates((2, 3, 5), 3, torch.float32, 2)]
    weights = torch.randn(3, device=DEVICE)
    torch.library.opcheck(torch.ops.supernet.mixed_sum.default, (outputs, weights))
    torch.library.opcheck(torch.ops.supernet.mixed_sum.default, (outputs, None))
    grad = torch.randn(2, 3, 5, device=DEVICE)
    torch.library.opcheck(torch.ops.supernet.mixed_sum_backward.default, (outputs, weights, grad, True))
    torch.library.opcheck(torch.ops.supernet.mixed_sum_backward.default, (outputs, None, grad, False))


def test_mixed_precision_candidates_sum_in_the_promoted_dtype(implementation):
    # under autocast, conv outputs are half while a skip carries an fp32 state
    k = dispatch.CPU_MIN_CANDIDATES
    outputs = [torch.randn(3, 4).half().to(DEVICE) for _ in range(k - 1)] + [torch.randn(3, 4).to(DEVICE)]
    weights = torch.softmax(torch.randn(k), 0).to(DEVICE)
    ref = mixed_sum_reference(outputs, weights)
    exact = mixed_sum_reference([o.double() for o in outputs], weights.double())
    for result in (kernel.mixed_sum(outputs, weights), dispatch.mixed_sum(outputs, weights, fused=True)):
        assert result.dtype == torch.float32
        assert_error_bounded(result, ref, exact, "mixed dtypes")


@pytest.mark.parametrize("bad, message", [
    (lambda: kernel.mixed_sum([], None), "at least one candidate"),
    (lambda: kernel.mixed_sum([torch.zeros(2, 3), torch.zeros(3, 2)], None), r"candidate 1 has shape \(3, 2\)"),
    (lambda: kernel.mixed_sum([torch.zeros(2), torch.zeros(2)], torch.ones(3)), r"weights have shape \(3,\)"),
])
def test_bad_input_is_refused_with_the_value_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
