"""What the tests judge kernels by: the float64 oracles, the input builders and the tolerance rule.

The tolerance rule (docs/design.md §5) is flash-attention's: a kernel is judged against a
float64 reference, relative to the error the same-dtype PyTorch implementation makes on
the same input, ``err(kernel) <= k * err(plain PyTorch) + floor`` with k = 2, where both
errors are measured against the same computation in float64.

The oracles: ``check_linear_entropy`` (linear_entropy against float64 autograd through
plain PyTorch), ``check_linear_logprob_entropy`` (the same for the label log-probability
and the entropy together), ``check_vda`` (value_delta_attention against float64 autograd through
ops/value_delta_attention/naive.py) and ``check_vda_cpp`` (the C++ backend against an
inline reference with V' materialised, independent of naive.py).
"""

import math
import os

import pytest
import torch

import vreason_kernels as vk
from vreason_kernels.backend import EXTENSION_STATUS
from vreason_kernels.ops.value_delta_attention import naive as vda_naive

# The backends every op test runs; `cpp` cases skip where the extension is not loaded (conftest.py).
BACKENDS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# For a test or module that needs the C++ extension without a `backend` parameter (those with
# one skip in conftest.py): skips, with the loader's reason, where the extension is not loaded,
# unless VREASON_REQUIRE_EXTENSION=1 (make test, make test-wheel) asks for a failure instead.
needs_extension = pytest.mark.skipif(
    not EXTENSION_STATUS.loaded and os.environ.get("VREASON_REQUIRE_EXTENSION") != "1",
    reason=f"C++ extension not loaded: {EXTENSION_STATUS.reason}",
)
# The C++ value_delta_attention suite's N: three chunks of the kernel's split.
VDA_CPP_N = 1237


# ---------------------------------------------------------------- the tolerance rule

def max_abs_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |actual - reference| over the entries where the reference is finite."""
    finite = torch.isfinite(reference)
    if not finite.any():
        return 0.0
    return (actual.detach().double()[finite] - reference.detach().double()[finite]).abs().max().item()


def rounding_floor(reference64: torch.Tensor, dtype: torch.dtype, ulps: float = 2.0) -> float:
    """``ulps`` units of ``dtype``'s epsilon at the largest finite magnitude of the reference.

    The error an exact result makes once rounded to ``dtype`` is half a unit; the floor
    absorbs a few such roundings that land by chance on the entry holding the max error.
    Kernels compute in float32, whose values below its smallest normal number are
    subnormal or flushed to zero (GPUs' fast exp and log flush them): at tau = 1e-3 a
    near one-hot row's entropy can be 1e-39, and an error of that size carries no
    information. So the floor is never below ``ulps`` float32 smallest normals.
    """
    finite = reference64[torch.isfinite(reference64)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return ulps * max(torch.finfo(dtype).eps * scale, torch.finfo(torch.float32).tiny)


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    k: float = 2.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """``|actual - ref64| <= k * |baseline - ref64| + atol`` in max norm.

    ``baseline`` is the plain PyTorch implementation run in ``actual``'s dtype. Where the
    reference is finite, ``actual`` must be finite; where it is not (masked logits of
    -inf, NaN rows), ``actual`` must hold the same non-finite value.
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    actual = actual.detach().double()
    finite_ref = torch.isfinite(reference64)
    bad = ~torch.isfinite(actual) & finite_ref
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    nonfinite_ref = reference64[~finite_ref].double()
    assert torch.equal(actual[~finite_ref].isnan(), nonfinite_ref.isnan()), f"{name}: NaN pattern differs"
    inf_ref = ~finite_ref & ~reference64.isnan()
    assert torch.equal(actual[inf_ref], reference64[inf_ref].double()), f"{name}: infinities differ"
    err = max_abs_err(actual, reference64)
    base = max_abs_err(baseline, reference64)
    assert err <= k * base + atol, f"{name}: max error {err:.3e} > {k} x baseline {base:.3e} + {atol:.1e}"


# ---------------------------------------------------------------- linear_entropy

def plain_pytorch(hidden, weight, bias=None, *, temperature=1.0, return_logits=False, z_offset=None):
    """What a user writes without this package, in the inputs' dtype (float32 math after the lm_head).

    ``Categorical(logits=z).entropy()``'s computation, -sum p (z - lse), with the 0 * -inf
    of masked logits kept out by ``where``: Categorical itself clamps -inf to the dtype's
    min, whose float64 backward gives NaN gradients for masked vocabularies.

    ``z_offset`` is added to the values of z, not to its gradient (see ``check_linear_entropy``).
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    entropy = _log_softmax_and_entropy(logits, temperature, z_offset)[1]
    return (entropy, logits) if return_logits else entropy


def _log_softmax_and_entropy(logits, temperature, z_offset=None):
    """``(log_softmax(z), entropy)`` of ``z = logits / temperature (+ z_offset)`` in at least float32."""
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if z_offset is not None:
        z = z + z_offset
    log_p = torch.log_softmax(z, dim=-1)
    p = torch.softmax(z, dim=-1)
    return log_p, -(p * torch.where(p > 0, log_p, torch.zeros_like(log_p))).sum(-1)


def linear_entropy_inputs(lead, vocab, dim, dtype=torch.float32, *, bias=True, logit_scale=1.0, offset=0.0, device=None):
    """(hidden [*lead, D], weight [V, D], bias [V] or None): logits of about ``logit_scale``
    per unit hidden, the bias shifted by ``offset``."""
    lead = (lead,) if isinstance(lead, int) else tuple(lead)
    hidden = torch.randn(*lead, dim, device=device).to(dtype)
    weight = (torch.randn(vocab, dim, device=device) * (logit_scale / math.sqrt(dim))).to(dtype)
    b = (torch.randn(vocab, device=device) + offset).to(dtype) if bias else None
    return hidden, weight, b


def run_with_grads(fn, inputs, grad_entropy, grad_logits=None, *, requires_grad=(True, True, True), **kw):
    """(entropy, logits, [grad of each input]) for the backward of ``grad_entropy``
    (and ``grad_logits``), passed as given: expanded, strided or dense.

    Inputs are fresh leaves (``None`` stays ``None``); the grads are cast to each
    output's dtype with their layout kept.
    """
    leaves = _fresh_leaves(inputs, requires_grad)
    out = fn(*leaves, return_logits=grad_logits is not None, **kw)
    entropy, logits = out if grad_logits is not None else (out, None)
    outputs, grads = [entropy], [_cast_keeping_layout(grad_entropy, entropy.dtype)]
    if grad_logits is not None:
        outputs.append(logits)
        grads.append(_cast_keeping_layout(grad_logits, logits.dtype))
    torch.autograd.backward(outputs, grads)
    return entropy, logits, _grads_of(leaves)


def _fresh_leaves(inputs, requires_grad):
    """Each input as a new leaf (``None`` stays ``None``) requiring grad as asked."""
    return [None if t is None else t.detach().clone().requires_grad_(bool(rg)) for t, rg in zip(inputs, requires_grad)]


def _grads_of(leaves):
    return [None if t is None or not t.requires_grad else t.grad for t in leaves]


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


def _sum_floors(inputs64, loss_of_logits):
    """One float32 rounding (eps x) of the largest entry of |G| @ |W|, |G|^T @ |h| and sum |G|
    over rows, where G is the float64 gradient of ``loss_of_logits(logits)`` (None: no
    loss) with respect to the logits: the scales of the sums that end dh, dW, db."""
    hidden, weight, bias = inputs64
    logits = torch.nn.functional.linear(hidden, weight, bias).detach().requires_grad_()
    loss = loss_of_logits(logits)
    g = torch.zeros_like(logits) if loss is None else torch.autograd.grad(loss, logits)[0]
    g = g.abs().reshape(-1, weight.shape[0])
    rows = hidden.detach().abs().reshape(-1, hidden.shape[-1])
    scales = [(g @ weight.detach().abs()).max(), (g.transpose(0, 1) @ rows).max(), g.sum(0).max()]
    return [torch.finfo(torch.float32).eps * x.item() if x.numel() else 0.0 for x in scales]


def check_linear_entropy(
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
    rounding of their final sums (``_sum_floors``): a weight column shared by every
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

    def loss(logits):
        entropy = _log_softmax_and_entropy(logits, temperature)[1]
        return (entropy * grad_entropy).sum() + (0.0 if grad_logits is None else (logits * grad_logits).sum())

    sum_floors = [0.0] + _sum_floors(as64, loss)
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


# ---------------------------------------------------------------- linear_logprob_entropy

def plain_logprob_entropy(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100, z_offset=None):
    """What a user writes without this package: the logits, ``log_softmax`` gathered at the
    label (0 on ``ignore_index`` rows) and ``plain_pytorch``'s entropy, in the inputs' dtype
    up to the logits and float32 (float64 for float64 input) after them."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return _logprob_entropy_of(logits, labels, temperature, ignore_index, z_offset)


def _logprob_entropy_of(logits, labels, temperature, ignore_index, z_offset=None):
    log_p, entropy = _log_softmax_and_entropy(logits, temperature, z_offset)
    keep = labels != ignore_index
    logp = log_p.gather(-1, torch.where(keep, labels, 0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, logp, torch.zeros_like(logp)), entropy


def run_logprob_entropy(fn, inputs, labels, grad_logp, grad_entropy, *, requires_grad=(True, True, True), **kw):
    """``(logp, entropy, [grad of each input])``; the backward runs from the outputs whose
    gradient is given (``None``: that output is unused), passed in the layout given."""
    leaves = _fresh_leaves(inputs, requires_grad)
    logp, entropy = fn(leaves[0], leaves[1], labels, leaves[2], **kw)
    pairs = [(out, _cast_keeping_layout(g, out.dtype)) for out, g in ((logp, grad_logp), (entropy, grad_entropy))
             if g is not None]
    if pairs and any(t is not None and t.requires_grad for t in leaves):
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
    return logp, entropy, _grads_of(leaves)


def check_linear_logprob_entropy(backend, hidden, weight, labels, bias, *, temperature=1.0, ignore_index=-100,
                                 grad_logp=None, grad_entropy=None, requires_grad=(True, True, True), k=2.0):
    """``vk.linear_logprob_entropy`` against float64 autograd through ``plain_logprob_entropy``,
    by ``check_linear_entropy``'s rule (its docstring gives the floors: float32-sized logit
    jitter and one float32 rounding of each gradient's final sum). Returns
    ``{name: (error, plain PyTorch's error)}``."""
    dtype = hidden.dtype
    inputs = (hidden, weight, bias)
    as64 = [None if t is None else t.double() for t in inputs]
    kw = dict(temperature=temperature, ignore_index=ignore_index)
    grads = dict(grad_logp=grad_logp, grad_entropy=grad_entropy, requires_grad=requires_grad)
    ref = run_logprob_entropy(plain_logprob_entropy, as64, labels, **grads, **kw)
    base = run_logprob_entropy(plain_logprob_entropy, inputs, labels, **grads, **kw)
    jitters = [run_logprob_entropy(plain_logprob_entropy, as64, labels, z_offset=offset, **grads, **kw)
               for offset in _logit_error_draws(inputs, temperature, draws=4)]
    got = run_logprob_entropy(vk.linear_logprob_entropy, inputs, labels, backend=backend, **grads, **kw)

    def loss(logits):
        outputs = zip(_logprob_entropy_of(logits, labels, temperature, ignore_index), (grad_logp, grad_entropy))
        terms = [(out * g.double()).sum() for out, g in outputs if g is not None]
        return sum(terms) if terms else None

    sum_floors = _sum_floors(as64, loss)

    keep = labels != ignore_index
    assert torch.equal(got[0].detach()[~keep], torch.zeros_like(got[0])[~keep]), "logp must be 0 at ignore_index"
    assert bool((got[0].detach()[keep] <= 0).all()), f"logp > 0: max {got[0].detach()[keep].max().item()}"
    errors = {}
    checks = [("logp", 0, None), ("entropy", 1, None)] + [(n, 2, i) for i, n in enumerate(("grad hidden",
                                                                                             "grad weight",
                                                                                             "grad bias"))]
    for name, slot, i in checks:
        pick = (lambda r: r[slot]) if i is None else (lambda r: r[2][i])
        actual, reference, baseline = pick(got), pick(ref), pick(base)
        if reference is None:
            assert actual is None, f"{name} should be None"
            continue
        want = (torch.float64 if dtype == torch.float64 else torch.float32) if i is None else dtype
        assert actual.dtype == want and actual.shape == reference.shape, (name, actual.dtype, actual.shape)
        floor = rounding_floor(reference, actual.dtype)
        floor += k * max((max_abs_err(pick(j), reference) for j in jitters), default=0.0)
        floor += k * (0.0 if i is None else sum_floors[i])
        assert_close_to_reference(actual, reference, baseline, k=k, atol=floor, name=name)
        errors[name] = (max_abs_err(actual, reference), max_abs_err(baseline, reference))
    return errors


# ---------------------------------------------------------------- value_delta_attention

def vda_floor(reference: torch.Tensor, dtype: torch.dtype) -> float:
    """A few roundings to ``dtype`` at the reference's magnitude, plus 1e-6 of it."""
    scale = max(1.0, reference.abs().max().item()) if reference.numel() else 1.0
    return rounding_floor(reference, dtype) + 1e-6 * scale


def vda_inputs(b, hq, hkv, t, n, d, dtype, *, span="random", delta_scale=0.5):
    """[query, key, value, delta_v, span]. ``span``: "random" (a sorted non-contiguous two
    thirds of the N positions), "full", "empty", or the positions themselves. The value row
    at the first span position is zero (a zero value row must stay zero)."""
    query = torch.randn(b, hq, t, d)
    key = torch.randn(b, hkv, n, d)
    value = torch.randn(b, hkv, n, d)
    if isinstance(span, torch.Tensor):
        positions = span
    elif span == "random":  # a non-contiguous subset
        positions = torch.randperm(n)[: max(1, (2 * n) // 3)].sort().values
    elif span == "full":
        positions = torch.arange(n)
    else:
        positions = torch.zeros(0, dtype=torch.long)
    if positions.numel() and not isinstance(span, torch.Tensor):
        value[:, :, positions[0]] = 0.0
    delta = torch.randn(b, hkv, positions.numel(), d) * delta_scale
    return [x.to(dtype) for x in (query, key, value, delta)] + [positions if isinstance(span, torch.Tensor) else positions.to(torch.int32)]


def grad_in_layout(form: str, shape, dtype: torch.dtype) -> torch.Tensor:
    """A gradient for an output of ``shape`` in ``dtype``: expanded, strided or dense."""
    if form == "sum":
        return torch.ones((), dtype=dtype).expand(shape)
    if form == "mean":
        return torch.full((), 1.0 / torch.Size(shape).numel(), dtype=dtype).expand(shape)
    if form == "transposed":
        return torch.randn(*shape[:-2], shape[-1], shape[-2], dtype=dtype).transpose(-1, -2)
    if form == "strided":
        return torch.randn(*shape, 3, dtype=dtype)[..., 1]
    return torch.randn(shape, dtype=dtype)


def run_vda(fn, query, key, value, delta, span, form, grad, requires_grad, **kw):
    """Output and the grads of the inputs in ``requires_grad`` (None for the others), the
    backward called as a user would: ``out.sum()``, ``out.mean()`` or ``out.backward(grad)``."""
    q = query.detach().clone().requires_grad_(requires_grad[0])
    dv = delta.detach().clone().requires_grad_(requires_grad[1])
    out = fn(q, key, value, dv, span, **kw)
    if form == "sum":
        out.sum().backward()
    elif form == "mean":
        out.mean().backward()
    else:
        out.backward(grad.to(out.dtype) if grad.dtype != out.dtype else grad)
    return out, q.grad, dv.grad


def check_vda(backend, query, key, value, delta, span, *, form="random", requires_grad=(True, True),
                            k=2.0, **kw):
    """Output and the grads of ``backend`` against float64 within k x the same-dtype reference's error."""
    dtype = query.dtype
    grad = grad_in_layout(form, query.shape, dtype)
    as64 = [x.double() for x in (query, key, value, delta)]
    ref = run_vda(vda_naive.value_delta_attention, *as64, span, form, grad.double(), requires_grad, **kw)
    base = run_vda(vda_naive.value_delta_attention, query, key, value, delta, span, form, grad, requires_grad, **kw)
    got = run_vda(vk.value_delta_attention, query, key, value, delta, span, form, grad, requires_grad,
              backend=backend, **kw)  # fmt: skip
    for name, actual, reference, baseline in zip(("output", "grad query", "grad delta_v"), got, ref, base):
        if reference is None:
            assert actual is None, f"{name} should be None"
            continue
        assert actual.dtype == dtype, name
        floor = vda_floor(reference, dtype)
        assert_close_to_reference(actual, reference, baseline, k=k, atol=floor, name=name)
    return got


def vda_materialised_reference(query, key, value, delta_v, span, bias, scale, causal):
    """(out, lse) with V' materialised; rows that see no key give out = 0, lse = -inf."""
    t, n = query.shape[2], key.shape[2]
    if delta_v is not None:
        v_span = value[:, :, span]
        u = v_span + delta_v
        v_new = u * v_span.norm(dim=-1, keepdim=True) / u.norm(dim=-1, keepdim=True).clamp_min(1e-6)
        value = value.index_copy(2, span, v_new)
    group = query.shape[1] // key.shape[1]
    s = scale * query @ key.repeat_interleave(group, 1).transpose(-1, -2)
    if bias is not None:
        s = s + bias.to(s.dtype)
    if causal:
        hidden = torch.arange(n) > torch.arange(t).unsqueeze(1) + (n - t)
        s = s.masked_fill(hidden, float("-inf"))
    blind = torch.isinf(s).all(-1, keepdim=True)
    p = torch.softmax(s.masked_fill(blind, 0.0), -1).masked_fill(blind, 0.0)
    lse = torch.logsumexp(s, -1)
    return p @ value.repeat_interleave(group, 1), lse


def vda_cpp_inputs(b, hq, hkv, t, d, dtype, span):
    q = torch.randn(b, hq, t, d, dtype=dtype)
    k = torch.randn(b, hkv, VDA_CPP_N, d, dtype=dtype)
    v = torch.randn(b, hkv, VDA_CPP_N, d, dtype=dtype)
    delta = None if span is None else torch.randn(b, hkv, span.numel(), d, dtype=dtype)
    if span is not None and span.numel() > 1:
        v[:, :, span[1]] = 0  # a zero row stays zero whatever its delta
    return q, k, v, delta


def vda_random_span(size):
    return torch.randperm(VDA_CPP_N)[:size].sort().values


def check_vda_cpp(q, k, v, delta, span, *, mask=None, causal=True, scale=0.3, grad_out=None):
    """Forward (and with grad_out, dQ and d delta) of backend='cpp' against float64."""
    leaves = [q] + ([] if delta is None else [delta])
    for x in leaves:
        x.requires_grad_(True)
    out = vk.value_delta_attention(q, k, v, delta, span, attention_mask=mask, scale=scale, causal=causal, backend="cpp")

    def run(dtype):
        xs = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        qx, dx = xs[0], (xs[1] if delta is not None else None)
        o, _ = vda_materialised_reference(qx, k.to(dtype), v.to(dtype), dx, span, mask, scale, causal)
        grads = torch.autograd.grad(o, xs, grad_out.to(dtype)) if grad_out is not None else ()
        return o, grads

    out64, grads64 = run(torch.float64)
    base, grads_base = run(q.dtype)
    assert_close_to_reference(out, out64, base, name="out")
    if grad_out is None:
        return out
    grads = torch.autograd.grad(out, leaves, grad_out)
    for name, g, g64, gb in zip(("grad_query", "grad_delta_v"), grads, grads64, grads_base):
        assert g.dtype == q.dtype
        assert_close_to_reference(g, g64, gb, name=name)
    return out, grads
