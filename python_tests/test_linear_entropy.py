"""linear_entropy: every backend against float64, within 2x of plain PyTorch's error.

The reference is plain PyTorch in float64: ``Categorical(logits=lm_head(h) / tau).entropy()``
and autograd through it. The baseline is the same code in the input dtype (the linear
layer in that dtype, then the entropy in at least float32, as verl and Liger upcast), and
each backend's error must stay within ``2 x`` the baseline's plus a floor (a few rounding
units of the output dtype, and what float32 logits alone cost: see
``helpers.check_linear_entropy``; docs/design.md §5, flash-attention's rule). Inputs are
fresh random draws with odd sizes; kernel outputs start as NaN (conftest), so an
unwritten element fails.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vreason_kernels as vk
from python_tests.helpers import BACKENDS, DTYPES, check_linear_entropy, needs_extension, run_with_grads
from python_tests.helpers import linear_entropy_inputs as _inputs
from vreason_kernels.ops.linear_entropy import naive

# (leading dims of hidden, V, D): odd sizes, D not a power of two.
SHAPES = [((1,), 37, 33), ((2, 3), 301, 80), ((5,), 129, 17)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab,dim", SHAPES)
def test_matches_reference(backend, dtype, lead, vocab, dim):
    hidden, weight, bias = _inputs(lead, vocab, dim, dtype, bias=vocab != 129)
    check_linear_entropy(backend, hidden, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature_and_logits(backend, dtype):
    hidden, weight, bias = _inputs((3,), 211, 45, dtype)
    grad_logits = torch.randn(3, 211, dtype=torch.float64)
    check_linear_entropy(backend, hidden, weight, bias, temperature=0.37, grad_logits=grad_logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend):
    hidden, weight, bias = _inputs((4,), 157, 29, torch.float32)
    bias[torch.rand(157) < 0.5] = float("-inf")
    check_linear_entropy(backend, hidden, weight, bias, temperature=1.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_finite_logit_gives_zero_entropy_and_gradient(backend, dtype):
    hidden, weight, _ = _inputs((3,), 97, 21, dtype)
    bias = torch.full((97,), float("-inf"), dtype=dtype)
    bias[torch.randint(97, ()).item()] = 0.0
    entropy, _, grads = run_with_grads(vk.linear_entropy, (hidden, weight, bias), torch.ones(3), backend=backend)
    assert torch.equal(entropy, torch.zeros(3))
    for name, g in zip(("hidden", "weight", "bias"), grads):
        assert torch.isfinite(g).all(), f"grad {name} has non-finite values"
        assert g.abs().max().item() <= 1e-6, f"grad {name} should vanish, max {g.abs().max().item():.2e}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "logit_scale", [1e-4, 30.0, 2e4], ids=["near-uniform", "near-one-hot", "magnitude-1e4"]
)
def test_extreme_logits(backend, logit_scale):
    hidden, weight, bias = _inputs((3,), 113, 40, torch.float32, bias=False, logit_scale=logit_scale)
    check_linear_entropy(backend, hidden, weight, bias)
    if logit_scale == 1e-4:
        entropy = vk.linear_entropy(hidden, weight, backend=backend)
        assert torch.allclose(entropy, torch.full_like(entropy, math.log(113)), atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_gets_no_grad(backend):
    hidden, weight, bias = _inputs((2,), 53, 19, torch.float32)
    hidden.requires_grad_()
    vk.linear_entropy(hidden, weight, bias, backend=backend).sum().backward()
    assert hidden.grad is not None and weight.grad is None and bias.grad is None
    ref_h = hidden.detach().double().requires_grad_()
    naive.linear_entropy(ref_h, weight.double(), bias.double()).sum().backward()
    assert torch.allclose(hidden.grad.double(), ref_h.grad, atol=1e-5)


class _CountMatmuls(TorchDispatchMode):
    """Counts the matrix products dispatched while active."""

    OPS = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default)

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.calls += func in self.OPS
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_logits_for_sampling_cost_no_second_pass(backend):
    """With return_logits=True and a loss on the entropy only (V-Reason's update step), the
    backward only scales the one-pass dH/dh: no product with the weight for the logits."""
    hidden, weight, bias = _inputs((3,), 97, 21, torch.float32)
    hidden.requires_grad_()
    entropy, _ = vk.linear_entropy(hidden, weight, bias, return_logits=True, backend=backend)
    with _CountMatmuls() as counter:
        entropy.sum().backward()
    assert counter.calls == 0
    ref_h = hidden.detach().double().requires_grad_()
    naive.linear_entropy(ref_h, weight.double(), bias.double()).sum().backward()
    assert torch.allclose(hidden.grad.double(), ref_h.grad, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradient_through_logits_only(backend):
    hidden, weight, bias = _inputs((2,), 41, 13, torch.float32)
    grad_logits = torch.randn(2, 41, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    _, logits = vk.linear_entropy(*leaves, return_logits=True, backend=backend)
    (logits.double() * grad_logits).sum().backward()
    refs = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    (torch.nn.functional.linear(*refs) * grad_logits).sum().backward()
    for got, ref in zip(leaves, refs):
        assert torch.allclose(got.grad.double(), ref.grad, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_empty_rows(backend):
    hidden, weight, _ = _inputs((4,), 61, 23, torch.float32)
    with torch.no_grad():
        entropy = vk.linear_entropy(hidden.requires_grad_(), weight, backend=backend)
    assert entropy.grad_fn is None
    empty = vk.linear_entropy(torch.randn(2, 0, 23), weight, backend=backend)
    assert empty.shape == (2, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    hidden, weight, bias = _inputs((7,), 331, 37, torch.bfloat16)
    grad = torch.randn(7)
    first, second = (run_with_grads(vk.linear_entropy, (hidden, weight, bias), grad, backend=backend) for _ in range(2))
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_auto_backend_on_cpu_is_cpp_when_built():
    from vreason_kernels.backend import resolve_backend

    expected = "cpp" if vk.backend.EXTENSION_STATUS.loaded else "torch"
    assert resolve_backend("auto", torch.device("cpu")) == expected


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    hidden, weight, bias = _inputs((2, 3), 67, 24, torch.float32)
    hidden.requires_grad_()

    @torch.compile(fullgraph=True, backend="aot_eager")
    def loss_fn(h):
        return vk.linear_entropy(h, weight, bias, temperature=0.9, backend=backend).sum()

    loss = loss_fn(hidden)
    loss.backward()
    ref_h = hidden.detach().double().requires_grad_()
    ref = naive.linear_entropy(ref_h, weight.double(), bias.double(), temperature=0.9).sum()
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-4
    assert torch.allclose(hidden.grad.double(), ref_h.grad, atol=1e-5)


@needs_extension  # backend="cpp" is resolved before the dtype check
def test_float64_only_on_torch_backend():
    hidden, weight, _ = _inputs((2,), 11, 5, torch.float64)
    assert vk.linear_entropy(hidden, weight).dtype == torch.float64  # auto falls back to the reference
    with pytest.raises(TypeError, match="float64"):
        vk.linear_entropy(hidden, weight, backend="cpp")
