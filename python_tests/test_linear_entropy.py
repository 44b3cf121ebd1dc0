"""linear_entropy: every backend against float64, within 2x of plain PyTorch's error.

The reference is plain PyTorch in float64: ``Categorical(logits=lm_head(h) / tau).entropy()``
and autograd through it. The baseline is the same code in the input dtype (the linear
layer in that dtype, then the entropy in at least float32, as verl and Liger upcast), and
each backend's error must stay within ``2 x`` the baseline's plus a floor (a few rounding
units of the output dtype, and what float32 logits alone cost: see
``check_against_reference``; docs/design.md §5, flash-attention's rule). Inputs are
fresh random draws with odd sizes; kernel outputs start as NaN (conftest), so an
unwritten element fails.
"""

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vreason_kernels as vk
from python_tests.utils import assert_close_to_reference, max_abs_err, rounding_floor
from vreason_kernels.ops.linear_entropy import naive

BACKENDS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (leading dims of hidden, V, D): odd sizes, D not a power of two.
SHAPES = [((1,), 37, 33), ((2, 3), 301, 80), ((5,), 129, 17)]


def plain_pytorch(hidden, weight, bias=None, *, temperature=1.0, return_logits=False, z_offset=None):
    """What a user writes without this package, in the inputs' dtype (float32 math after the lm_head).

    ``Categorical(logits=z).entropy()``'s computation, -sum p (z - lse), with the 0 * -inf
    of masked logits kept out by ``where``: Categorical itself clamps -inf to the dtype's
    min, whose float64 backward gives NaN gradients for masked vocabularies.

    ``z_offset`` is added to the values of z, not to its gradient (see ``check_against_reference``).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if z_offset is not None:
        z = z + z_offset
    log_p = torch.log_softmax(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    entropy = -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)
    return (entropy, logits) if return_logits else entropy


def _inputs(lead, vocab, dim, dtype, *, bias=True, logit_scale=1.0):
    hidden = torch.randn(*lead, dim).to(dtype)
    weight = (torch.randn(vocab, dim) * (logit_scale / math.sqrt(dim))).to(dtype)
    b = torch.randn(vocab).to(dtype) if bias else None
    return hidden, weight, b


def run_with_grads(fn, inputs, grad_entropy, grad_logits=None, *, requires_grad=(True, True, True), **kw):
    """(entropy, logits, [grad of each input]) for the backward of ``grad_entropy``
    (and ``grad_logits``), passed as given: expanded, strided or dense.

    Inputs are fresh leaves (``None`` stays ``None``); the grads are cast to each
    output's dtype with their layout kept.
    """
    leaves = [
        None if t is None else t.detach().clone().requires_grad_(bool(rg)) for t, rg in zip(inputs, requires_grad)
    ]
    out = fn(*leaves, return_logits=grad_logits is not None, **kw)
    entropy, logits = out if grad_logits is not None else (out, None)
    outputs, grads = [entropy], [_cast_keeping_layout(grad_entropy, entropy.dtype)]
    if grad_logits is not None:
        outputs.append(logits)
        grads.append(_cast_keeping_layout(grad_logits, logits.dtype))
    torch.autograd.backward(outputs, grads)
    return entropy, logits, [None if t is None or not t.requires_grad else t.grad for t in leaves]


def _cast_keeping_layout(t, dtype):
    """``t`` in ``dtype`` with the same strides (``Tensor.to`` would make an expanded tensor
    dense): the view is rebuilt on its cast base, which must be contiguous."""
    base = t if t._base is None else t._base
    assert base.is_contiguous() and base.storage_offset() == 0
    return base.to(dtype).as_strided(t.size(), t.stride(), t.storage_offset())


def _logit_error_draws(inputs, temperature, draws):
    """Perturbations of z as large as float32's logit errors: in each row, every entry
    moved by +-(the row's largest |z32 - z64|); 0 where z is not finite.

    The first two draws move each row's largest logit up and the rest down, then the
    reverse: near one-hot rows depend on little but the gap to the top, which random signs
    leave unchanged whenever the top two entries draw the same sign. With three random
    draws that happens to all three for one row in eight; at tau = 1e-3 the floor then
    fell 600x below PyTorch's own error. The other draws have random signs.
    """
    z32, z64 = (
        torch.nn.functional.linear(*[None if t is None else t.to(dtype) for t in inputs]).double() / temperature
        for dtype in (torch.float32, torch.float64)
    )
    finite = torch.isfinite(z64)
    size = torch.where(finite, z32 - z64, torch.zeros_like(z64)).abs().amax(-1, keepdim=True)
    top = z64 == z64.amax(-1, keepdim=True)
    signs = [torch.where(top, 1.0, -1.0), torch.where(top, -1.0, 1.0)]
    signs += [torch.randint(0, 2, z64.shape) * 2.0 - 1 for _ in range(max(0, draws - 2))]
    return [torch.where(finite, size * sign, 0.0) for sign in signs[:draws]]


def _product_scales(inputs64, temperature, grad_entropy, grad_logits):
    """Largest entry of |G| @ |W|, |G|^T @ |h| and sum |G| over rows, where G is the float64
    loss gradient with respect to the logits: the scales of the sums that end dh, dW, db."""
    hidden, weight, bias = inputs64
    logits = torch.nn.functional.linear(hidden, weight, bias).detach().requires_grad_()
    z = logits / temperature
    log_p = torch.log_softmax(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    loss = (-(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1) * grad_entropy).sum()
    if grad_logits is not None:
        loss = loss + (logits * grad_logits).sum()
    g = torch.autograd.grad(loss, logits)[0].abs().reshape(-1, weight.shape[0])
    rows = hidden.detach().abs().reshape(-1, hidden.shape[-1])
    scales = [(g @ weight.detach().abs()).max(), (g.transpose(0, 1) @ rows).max(), g.sum(0).max()]
    return [x.item() if x.numel() else 0.0 for x in scales]


def check_against_reference(
    backend, hidden, weight, bias, *, temperature=1.0, grad_entropy=None, grad_logits=None,
    requires_grad=(True, True, True), k=2.0,
):
    """Entropy, logits (with ``grad_logits``) and every input's gradient against float64.

    The floor is what no float32 computation escapes: a few rounding units of the output
    dtype, plus the error that float32 logits alone cause. Kernels and PyTorch sum
    z = W h + b in different orders, so each draws its own logit errors; near one-hot rows
    the entropy's error then rests on one or two entries, and the max-norm ratio of two
    such draws varies 5-10x from seed to seed (measured: the C++ backend's error then
    equals the exact math on its own float32 logits). So the floor adds k x the largest
    error of the float64 computation on z moved by float32-sized logit errors (see
    ``_logit_error_draws``) over a few draws: the error bound is k x the larger of
    PyTorch's error and float32 logits' unavoidable one. Gradients also get k x one float32
    rounding of their final sums (``_product_scales``): a weight column shared by every
    word (the +1000 offset through W h) makes dH/dh there an exact 0 that every float32
    sum only reaches up to eps x 1000 x sum |dH/dz|.
    """
    dtype = hidden.dtype
    if grad_entropy is None:
        grad_entropy = torch.randn(hidden.shape[:-1], dtype=torch.float64)
    inputs = (hidden, weight, bias)
    as64 = [None if t is None else t.double() for t in inputs]
    kw = dict(grad_logits=grad_logits, requires_grad=requires_grad, temperature=temperature)
    ref = run_with_grads(plain_pytorch, as64, grad_entropy, **kw)
    base = run_with_grads(plain_pytorch, inputs, grad_entropy, **kw)
    jitters = [
        run_with_grads(plain_pytorch, as64, grad_entropy, z_offset=offset, **kw)
        for offset in _logit_error_draws(inputs, temperature, draws=4)
    ]
    got = run_with_grads(vk.linear_entropy, inputs, grad_entropy, backend=backend, **kw)

    assert got[0].dtype == torch.float32 and got[0].shape == hidden.shape[:-1]
    jittered = [[j[0] for j in jitters]] + [[j[2][i] for j in jitters] for i in range(3)]
    eps32 = torch.finfo(torch.float32).eps
    sum_floors = [0.0] + [eps32 * c for c in _product_scales(as64, temperature, grad_entropy, grad_logits)]
    checks = [("entropy", got[0], ref[0], base[0], jittered[0], 0.0)]
    if grad_logits is not None:
        assert got[1].dtype == dtype
        checks.append(("logits", got[1], ref[1], base[1], [], 0.0))
    names = ("grad hidden", "grad weight", "grad bias")
    checks += zip(names, got[2], ref[2], base[2], jittered[1:], sum_floors[1:])
    for name, actual, reference, baseline, jittered_outputs, sum_floor in checks:
        if reference is None:
            assert actual is None, f"{name} should be None"
            continue
        assert actual.dtype == (torch.float32 if name == "entropy" else dtype), name
        floor = rounding_floor(reference, actual.dtype) + k * sum_floor
        floor += k * max((max_abs_err(j, reference) for j in jittered_outputs), default=0.0)
        assert_close_to_reference(actual, reference, baseline, k=k, atol=floor, name=name)
    return got


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,vocab,dim", SHAPES)
def test_matches_reference(backend, dtype, lead, vocab, dim):
    hidden, weight, bias = _inputs(lead, vocab, dim, dtype, bias=vocab != 129)
    check_against_reference(backend, hidden, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature_and_logits(backend, dtype):
    hidden, weight, bias = _inputs((3,), 211, 45, dtype)
    grad_logits = torch.randn(3, 211, dtype=torch.float64)
    check_against_reference(backend, hidden, weight, bias, temperature=0.37, grad_logits=grad_logits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend):
    hidden, weight, bias = _inputs((4,), 157, 29, torch.float32)
    bias[torch.rand(157) < 0.5] = float("-inf")
    check_against_reference(backend, hidden, weight, bias, temperature=1.7)


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
    check_against_reference(backend, hidden, weight, bias)
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
