"""mixed_sum: the Triton kernels (interpreted without a GPU) and the dispatch custom op against the reference."""

import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.mixed_sum import mixed_sum_reference, mixed_sum_triton
from supernet import dispatch
from tests.compare import assert_close

pytestmark = pytest.mark.usefixtures("nan_fill")
DEVICE = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}


def relative_rms(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected||: steadier than elementwise bounds for reductions."""
    e = expected.double()
    return ((actual.double() - e).norm() / e.norm().clamp_min(1e-30)).item()


shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])


def candidates(shape, k, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dtype).to(DEVICE).requires_grad_() for _ in range(k)]


@settings(max_examples=12, deadline=None)
@given(shape=shapes, k=st.integers(2, 8), dtype=dtypes, weighted=st.booleans(), seed=st.integers(0, 2**16))
def test_triton_matches_reference_forward_and_backward(shape, k, dtype, weighted, seed):
    outputs = candidates(shape, k, dtype, seed)
    weights = torch.softmax(torch.randn(k), 0).to(DEVICE).requires_grad_() if weighted else None
    atol, rtol = TOLERANCES[dtype]
    fused = mixed_sum_triton(outputs, weights)
    # the reference in fp32, cast back: the kernel accumulates in fp32
    expected = mixed_sum_reference([o.float() for o in outputs], weights)
    assert_close(fused, expected.to(dtype), atol, rtol, "forward")
    grad = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1)).to(dtype).to(DEVICE)
    inputs = outputs + ([weights] if weighted else [])
    got = torch.autograd.grad(fused, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad.float())
    for i, (a, e) in enumerate(zip(got[:k], want[:k])):
        assert_close(a, e.to(dtype), atol, rtol, f"grad of candidate {i}")
    if weighted:
        assert got[k].dtype == weights.dtype
        assert relative_rms(got[k], want[k]) < 1e-5, "weight gradients (a two-stage reduction)"


def test_weight_gradient_reduction_spans_many_programs():
    # 5000 elements: several programs each write a partial sum that the finishing kernel adds up
    outputs = candidates((5000,), 3, torch.float32, 0)
    weights = torch.randn(3, device=DEVICE, requires_grad=True)
    got = torch.autograd.grad(mixed_sum_triton(outputs, weights).sum(), weights)[0]
    want = torch.autograd.grad(mixed_sum_reference(outputs, weights).sum(), weights)[0]
    assert relative_rms(got, want) < 1e-6


def test_hard_straight_through_weights_give_gdas_gradients_without_leaving_the_device():
    # GDAS: one-hot values, softmax gradients; the kernel sees ordinary device weights
    alphas = torch.randn(5, device=DEVICE, requires_grad=True)
    probs = F.softmax(alphas / 0.5, dim=0)
    hard = (probs - probs.detach()) + F.one_hot(probs.argmax(), 5).to(probs.dtype)
    outputs = candidates((3, 4, 5), 5, torch.float32, 3)
    fused = mixed_sum_triton(outputs, hard)
    expected = mixed_sum_reference(outputs, hard)
    chosen = int(probs.argmax())
    assert torch.equal(fused, outputs[chosen].detach()), "the forward value is exactly the sampled candidate"
    got = torch.autograd.grad(fused.square().sum(), [alphas, *outputs], retain_graph=True)
    want = torch.autograd.grad(expected.square().sum(), [alphas, *outputs])
    assert relative_rms(got[0], want[0]) < 1e-5
    assert got[0].abs().sum() > 0, "every alpha gets a straight-through gradient"
    for a, e in zip(got[1:], want[1:]):
        assert_close(a, e, 1e-6, 1e-6, "candidate gradient")


def test_unweighted_sum_passes_no_weight_gradient():
    outputs = candidates((7, 3), 4, torch.float32, 1)
    fused = mixed_sum_triton(outputs, None)
    assert_close(fused, mixed_sum_reference(outputs, None), 1e-6, 1e-6, "unweighted sum")
    grads = torch.autograd.grad(fused.sum(), outputs)
    assert all(torch.equal(g, torch.ones_like(g)) for g in grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("weighted", [True, False])
def test_dispatch_custom_op_matches_reference(dtype, weighted):
    k = 4
    outputs = candidates((2, 3, 5, 7), k, dtype, 7)
    weights = torch.randn(k, device=DEVICE, requires_grad=True) if weighted else None
    fused = dispatch.mixed_sum(outputs, weights, fused=True)
    expected = dispatch.mixed_sum(outputs, weights, fused=False)
    atol, rtol = TOLERANCES[dtype]
    assert_close(fused, expected, atol, rtol, "custom op forward")
    inputs = outputs + ([weights] if weighted else [])
    grad = torch.randn_like(fused)
    got = torch.autograd.grad(fused, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for i, (a, e) in enumerate(zip(got[:k], want[:k])):
        assert_close(a, e, atol, rtol, f"custom op grad of candidate {i}")
    if weighted:
        assert relative_rms(got[k], want[k]) < (1e-5 if dtype == torch.float32 else 2e-2)


def test_dispatch_custom_op_registrations_pass_opcheck():
    outputs = candidates((2, 3, 5), 3, torch.float32, 2)
    torch.library.opcheck(torch.ops.supernet.mixed_sum.default, (outputs, torch.randn(3, device=DEVICE, requires_grad=True)))
    torch.library.opcheck(torch.ops.supernet.mixed_sum.default, (outputs, None))


def test_mixed_precision_candidates_sum_in_the_promoted_dtype():
    # under autocast, conv outputs are half while a skip carries an fp32 state
    outputs = [torch.randn(3, 4).half().to(DEVICE), torch.randn(3, 4).to(DEVICE)]
    weights = torch.tensor([0.25, 0.75]).to(DEVICE)
    for result in (mixed_sum_triton(outputs, weights), dispatch.mixed_sum(outputs, weights, fused=True)):
        assert result.dtype == torch.float32
        assert_close(result, mixed_sum_reference(outputs, weights), 1e-6, 1e-6, "mixed dtypes")


@pytest.mark.parametrize("bad, message", [
    (lambda: mixed_sum_triton([], None), "at least one candidate"),
    (lambda: mixed_sum_triton([torch.zeros(2, 3), torch.zeros(3, 2)], None), r"candidate 1 has shape \(3, 2\)"),
    (lambda: mixed_sum_triton([torch.zeros(2), torch.zeros(2)], torch.ones(3)), r"weights have shape \(3,\)"),
])
def test_bad_input_is_refused_with_the_value_named(bad, message):
    with pytest.raises(ValueError, match=message):
        bad()
