"""value_delta_attention: every backend against the float64 reference (ops/value_delta_attention/naive.py).

Each backend's error (output, grad of query, grad of delta_v) is bounded by k x the error
of the plain PyTorch reference run in the same dtype (docs/design.md §5). Inputs are fresh
random draws with odd sizes; kernel outputs start as NaN (conftest), so an unwritten
element fails. Triton runs under the interpreter on CPU, so its N is kept small.
"""

import pytest
import torch
import torch.nn.functional as F

import vreason_kernels as vk
from python_tests.helpers import BACKENDS, DTYPES, check_vda, max_abs_err
from python_tests.helpers import vda_inputs as _inputs
from vreason_kernels.ops.value_delta_attention import naive


# (B, Hq, Hkv, T, N (torch/cpp), N (triton interpreter), D, causal): GQA 7 (28/4) and 8
# (16/2) scaled down; T = None means prefill (T = N).
CASES = {
    "decode-gqa7-d128": (2, 7, 1, 1, 1237, 131, 128, True),
    "decode3-gqa8-d80": (1, 16, 2, 3, 1237, 67, 80, True),
    "prefill-gqa8-d64": (1, 8, 1, None, 301, 61, 64, True),
    "prefill-gqa7-d80-noncausal": (2, 7, 1, None, 97, 37, 80, False),
}


def _run(fn, query, key, value, delta, span, grad_out, **kw):
    """Output and the grads of sum(grad_out * out) w.r.t. query and delta_v."""
    q = query.detach().clone().requires_grad_()
    dv = None if delta is None else delta.detach().clone().requires_grad_()
    out = fn(q, key, value, dv, span, **kw)
    leaves = [q] if dv is None else [q, dv]
    grads = torch.autograd.grad((out.double() * grad_out).sum(), leaves)
    return [out, *grads]


def _shape(case, backend):
    b, hq, hkv, t, n, n_triton, d, causal = CASES[case]
    n = n_triton if backend == "triton" else n
    return (b, hq, hkv, n if t is None else t, n, d), causal


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "case", [pytest.param(c, marks=pytest.mark.slow) if c.startswith("prefill") else c for c in CASES]
)
def test_matches_reference(backend, dtype, case):
    shape, causal = _shape(case, backend)
    check_vda(backend, *_inputs(*shape, dtype), causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_output_is_rounded_to_nearest(backend, dtype):
    """fp32 accumulation rounded once to the output dtype: the error is that of the float64
    result rounded to nearest (a truncating cast, as the Triton interpreter's fp32 -> bf16,
    doubles it)."""
    shape, causal = _shape("decode3-gqa8-d80", backend)
    query, key, value, delta, span = _inputs(*shape, dtype)
    out = vk.value_delta_attention(query, key, value, delta, span, causal=causal, backend=backend)
    ref = naive.value_delta_attention(*(x.double() for x in (query, key, value, delta)), span, causal=causal)
    rounded = max_abs_err(ref.to(dtype), ref)
    assert max_abs_err(out, ref) <= rounded + 1e-5 * ref.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "span,delta_scale", [("random", 0.0), ("random", 1e-3), ("random", 10.0), ("empty", 1.0), ("full", 1.0)]
)
def test_span_and_delta_size(backend, span, delta_scale):
    shape, _ = _shape("decode3-gqa8-d80", backend)
    check_vda(backend, *_inputs(*shape, torch.float32, span=span, delta_scale=delta_scale), scale=0.3)


def _padded_mask(b, t, n, additive):
    """Left padding per batch row, plus one query row of batch 0 that sees no key at all."""
    keep = torch.ones(b, 1, t, n, dtype=torch.bool)
    for i in range(b):
        keep[i, :, :, : 3 * i + 2] = False
    keep[0, :, -1, :] = False
    return torch.zeros(keep.shape).masked_fill(~keep, float("-inf")) if additive else keep


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("additive", [False, True], ids=["bool", "additive"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_padded_batch_mask(backend, additive, dtype):
    b, hq, hkv, t, n, d = 3, 8, 2, 5, (53 if backend == "triton" else 211), 64
    inputs = _inputs(b, hq, hkv, t, n, d, dtype)
    mask = _padded_mask(b, t, n, additive)
    out, grad_q, grad_delta = check_vda(backend, *inputs, attention_mask=mask)
    # The fully masked row outputs exactly 0 and gets zero gradients.
    assert (out[0, :, -1] == 0).all() and (grad_q[0, :, -1] == 0).all()
    assert torch.isfinite(grad_delta).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("zeros", [False, True], ids=["none", "zeros"])
@pytest.mark.parametrize("causal", [True, False])
def test_plain_attention_equals_sdpa(backend, zeros, causal):
    b, hq, hkv, t, n, d = 2, 14, 2, 3, (41 if backend == "triton" else 301), 64
    query, key, value, delta, span = _inputs(b, hq, hkv, t, n, d, torch.float32)
    keep = _padded_mask(b, t, n, additive=False)
    keep[0, :, -1, :2] = True  # SDPA gives NaN on rows that see nothing: keep every row live
    got = vk.value_delta_attention(
        query, key, value, torch.zeros_like(delta) if zeros else None, span,
        attention_mask=keep, causal=causal, backend=backend,
    )  # fmt: skip
    if causal:
        keep = keep & torch.isfinite(naive.causal_bias(t, n, "cpu", torch.float32))
    want = F.scaled_dot_product_attention(query, key, value, attn_mask=keep, enable_gqa=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    shape, causal = _shape("decode3-gqa8-d80", backend)
    inputs = _inputs(*shape, torch.bfloat16)
    grad_out = torch.randn(inputs[0].shape, dtype=torch.float64)
    first, second = (_run(vk.value_delta_attention, *inputs, grad_out, backend=backend) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph(backend):
    query, key, value, delta, span = _inputs(1, 4, 2, 2, 37, 16, torch.float32)
    mask = _padded_mask(1, 2, 37, additive=False)

    def fn(q, dv):
        return vk.value_delta_attention(q, key, value, dv, span, attention_mask=mask, backend=backend)

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad_out = torch.randn(query.shape, dtype=torch.float64)
    got = _run(lambda q, k, v, dv, s: compiled(q, dv), query, key, value, delta, span, grad_out)
    eager = _run(lambda q, k, v, dv, s: fn(q, dv), query, key, value, delta, span, grad_out)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b)


def test_float64_torch_backend_matches_reference():
    query, key, value, delta, span = _inputs(1, 6, 2, 4, 29, 24, torch.float64)
    grad_out = torch.randn(query.shape, dtype=torch.float64)
    got = _run(vk.value_delta_attention, query, key, value, delta, span, grad_out, backend="torch")
    ref = _run(naive.value_delta_attention, query, key, value, delta, span, grad_out)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def _bad(query, key, value, delta, span):
    """(description, call kwargs, error type, message fragment) for each kind of bad input."""
    ok = dict(query=query, key=key, value=value, delta_v=delta, span=span)
    return [
        ("query rank", dict(ok, query=query[0]), ValueError, "query must have 4 dims"),
        ("head ratio", dict(ok, query=query[:, :3]), ValueError, "multiple of"),
        ("head dim", dict(ok, key=key[..., :-1], value=value[..., :-1]), ValueError, "key/value must have shape"),
        ("k/v shape", dict(ok, value=value[:, :, :-1]), ValueError, "same shape"),
        ("dtype", dict(ok, key=key.half()), ValueError, "key must have the same dtype"),
        ("int query", dict(ok, query=query.long()), TypeError, "query must be a floating"),
        ("span dtype", dict(ok, span=span.float()), TypeError, "span must be"),
        ("span range", dict(ok, span=span + key.shape[2]), ValueError, "span positions must lie in"),
        ("span order", dict(ok, span=span.flip(0)), ValueError, "sorted"),
        ("span unique", dict(ok, span=span.clone().fill_(2)), ValueError, "unique"),
        ("delta shape", dict(ok, delta_v=delta[:, :, :-1]), ValueError, "delta_v must have shape"),
        ("no span", dict(ok, span=None), ValueError, "span is required"),
        ("mask shape", dict(ok, attention_mask=torch.ones(1, 1, 3, 5, dtype=torch.bool)), ValueError,
         "attention_mask must be broadcastable"),
        ("mask dtype", dict(ok, attention_mask=torch.ones(1, 1, 1, key.shape[2], dtype=torch.int64)), TypeError,
         "attention_mask must be boolean"),
        ("scale", dict(ok, scale="0.1"), TypeError, "scale must be"),
        ("backend", dict(ok, backend="cuda"), ValueError, "backend must be one of"),
        ("key grad", dict(ok, key=key.clone().requires_grad_()), ValueError, "key requires grad"),
        ("value grad", dict(ok, value=value.clone().requires_grad_()), ValueError, "value requires grad"),
    ]  # fmt: skip


@pytest.mark.parametrize("case", range(18))
def test_bad_inputs(case):
    description, kwargs, error, message = _bad(*_inputs(2, 4, 2, 3, 11, 16, torch.float32))[case]
    kwargs.setdefault("backend", "torch")
    with pytest.raises(error, match=message):
        vk.value_delta_attention(**kwargs)
