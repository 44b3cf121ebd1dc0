"""linear_entropy: every backend against the float64 reference (ops/linear_entropy/naive.py).

Each kernel's error is bounded by k x the error of the plain PyTorch implementation in the
same dtype (DESIGN.md §5). Inputs are fresh random draws with odd sizes; kernel outputs
start as NaN (conftest), so an unwritten element fails.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vreason_kernels as vk
from python_tests.utils import assert_close_to_reference
from vreason_kernels.ops.linear_entropy import naive

BACKENDS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims of hidden, V, D): odd sizes, D not a power of two.
SHAPES = [((1,), 37, 33), ((2, 3), 301, 80), ((5,), 129, 17)]


def _atol(dtype: torch.dtype, reference: torch.Tensor) -> float:
    scale = max(1.0, reference.abs().max().item())
    return (1e-5 if dtype == torch.float32 else 1e-3) * scale


def _inputs(lead, vocab, dim, dtype, *, bias=True, logit_scale=1.0):
    hidden = torch.randn(*lead, dim).to(dtype)
    weight = (torch.randn(vocab, dim) * (logit_scale / math.sqrt(dim))).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    return hidden, weight, b


def _run(fn, hidden, weight, bias, grad_entropy, grad_logits=None, **kw):
    """Entropy, logits and the grads of sum(g * H) (+ sum(G * logits)) w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (hidden, weight, bias)]
    out = fn(*leaves, return_logits=grad_logits is not None, **kw)
    entropy, logits = out if grad_logits is not None else (out, None)
    loss = (entropy.double() * grad_entropy).sum()
    if grad_logits is not None:
        loss = loss + (logits.double() * grad_logits).sum()
    loss.backward()
    grads = [t.grad if t is not None else None for t in leaves]
    return entropy, logits, grads


def _check_against_reference(backend, hidden, weight, bias, *, temperature=1.0, with_logits=False, k=4.0):
    dtype = hidden.dtype
    grad_entropy = torch.randn(hidden.shape[:-1], dtype=torch.float64)
    grad_logits = torch.randn(*hidden.shape[:-1], weight.shape[0], dtype=torch.float64) if with_logits else None
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    ref = _run(naive.linear_entropy, *as64, grad_entropy, grad_logits, temperature=temperature)
    base = _run(naive.linear_entropy, hidden, weight, bias, grad_entropy, grad_logits, temperature=temperature)
    got = _run(vk.linear_entropy, hidden, weight, bias, grad_entropy, grad_logits, temperature=temperature, backend=backend)

    assert got[0].dtype == torch.float32 and got[0].shape == hidden.shape[:-1]
    assert_close_to_reference(got[0], ref[0], base[0], k=k, atol=_atol(dtype, ref[0]), name="entropy")
    if with_logits:
        assert got[1].dtype == dtype
        assert_close_to_reference(got[1], ref[1], base[1], k=k, atol=_atol(dtype, ref[1]), name="logits")
    for name, g, r, b in zip(("grad hidden", "grad weight", "grad bias"), got[2], ref[2], base[2]):
        if r is not None:
            assert_close_to_reference(g, r, b, k=k, atol=_atol(dtype, r), name=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab,dim", SHAPES)
def test_matches_reference(backend, dtype, lead, vocab, dim):
    hidden, weight, bias = _inputs(lead, vocab, dim, dtype, bias=vocab != 129)
    _check_against_reference(backend, hidden, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature_and_logits(backend, dtype):
    hidden, weight, bias = _inputs((3,), 211, 45, dtype)
    _check_against_reference(backend, hidden, weight, bias, temperature=0.37, with_logits=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend):
    hidden, weight, bias = _inputs((4,), 157, 29, torch.float32)
    bias[torch.rand(157) < 0.5] = float("-inf")
    _check_against_reference(backend, hidden, weight, bias, temperature=1.7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_single_finite_logit_gives_zero_entropy_and_gradient(backend, dtype):
    hidden, weight, _ = _inputs((3,), 97, 21, dtype)
    bias = torch.full((97,), float("-inf"), dtype=dtype)
    bias[torch.randint(97, ()).item()] = 0.0
    entropy, _, grads = _run(vk.linear_entropy, hidden, weight, bias, torch.ones(3, dtype=torch.float64), backend=backend)
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
    _check_against_reference(backend, hidden, weight, bias)
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
    first, second = (
        _run(vk.linear_entropy, hidden, weight, bias, torch.ones(7, dtype=torch.float64), backend=backend)
        for _ in range(2)
    )
    assert torch.equal(first[0], second[0])
    for a, b in zip(first[2], second[2]):
        assert torch.equal(a, b)


def test_auto_backend_on_cpu_is_cpp_when_built():
    from vreason_kernels.backend import resolve_backend

    expected = "cpp" if vk._extension.HAS_EXTENSION else "torch"
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


def test_float64_only_on_torch_backend():
    hidden, weight, _ = _inputs((2,), 11, 5, torch.float64)
    assert vk.linear_entropy(hidden, weight).dtype == torch.float64  # auto falls back to the reference
    with pytest.raises(TypeError, match="float64"):
        vk.linear_entropy(hidden, weight, backend="cpp")


@pytest.mark.parametrize(
    "make_args,error,match",
    [
        (lambda h, w, b: (h[0, 0], w, None), ValueError, "hidden must have at least 1 dims"),
        (lambda h, w, b: (h, w[0], None), ValueError, "weight must have 2 dims"),
        (lambda h, w, b: (h[:, :0], w[:, :0], None), ValueError, "non-empty last dimension"),
        (lambda h, w, b: (h, w[:, :-1], None), ValueError, "D = hidden.shape"),
        (lambda h, w, b: (h, w[:0], None), ValueError, "non-empty vocabulary"),
        (lambda h, w, b: (h, w, b[:-1]), ValueError, "bias must have shape"),
        (lambda h, w, b: (h, w.half(), None), ValueError, "weight must have the same dtype"),
        (lambda h, w, b: (h, w, b.double()), ValueError, "bias must have the same dtype"),
        (lambda h, w, b: (h, w.to("meta"), None), ValueError, "weight must have the same device"),
        (lambda h, w, b: (h.long(), w, None), TypeError, "hidden must be a floating tensor"),
        (lambda h, w, b: (h.tolist(), w, None), TypeError, "hidden must be a torch.Tensor"),
    ],
    ids=["hidden-0d", "weight-1d", "empty-D", "D-mismatch", "empty-V", "bias-shape", "dtype", "bias-dtype", "device",
         "int-hidden", "not-a-tensor"],
)
def test_bad_input(make_args, error, match):
    hidden, weight, bias = _inputs((3,), 17, 8, torch.float32)
    with pytest.raises(error, match=match):
        vk.linear_entropy(*make_args(hidden, weight, bias))


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(temperature):
    hidden, weight, _ = _inputs((3,), 17, 8, torch.float32)
    with pytest.raises(ValueError, match="temperature"):
        vk.linear_entropy(hidden, weight, temperature=temperature)


def test_bad_backend():
    hidden, weight, _ = _inputs((3,), 17, 8, torch.float32)
    with pytest.raises(ValueError, match="backend must be one of"):
        vk.linear_entropy(hidden, weight, backend="cuda")
