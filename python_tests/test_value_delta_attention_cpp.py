"""C++-specific checks of value_delta_attention (csrc/cpu/value_delta_attention.cpp).

The shared backend suite (test_value_delta_attention.py) covers the op contract; here:
decode shapes that exercise the kv-group rows and the chunk split (N = 1237 gives three
chunks), span layouts, fully masked rows, gradients, bitwise determinism across calls and
thread counts, and the kernel's own argument checks. The reference is written inline
(a materialised V' and a plain softmax with K/V repeated per q-head), independent of
naive.py, and run in float64 and, as the baseline, in the inputs' dtype.
"""

import pytest
import torch
from python_tests.utils import assert_close_to_reference

from vreason_kernels._extension import HAS_EXTENSION
from vreason_kernels.ops.value_delta_attention import value_delta_attention

pytestmark = pytest.mark.skipif(not HAS_EXTENSION, reason="C++ extension not built")

N = 1237


def reference(query, key, value, delta_v, span, bias, scale, causal):
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


def make_inputs(b, hq, hkv, t, d, dtype, span):
    q = torch.randn(b, hq, t, d, dtype=dtype)
    k = torch.randn(b, hkv, N, d, dtype=dtype)
    v = torch.randn(b, hkv, N, d, dtype=dtype)
    delta = None if span is None else torch.randn(b, hkv, span.numel(), d, dtype=dtype)
    if span is not None and span.numel() > 1:
        v[:, :, span[1]] = 0  # a zero row stays zero whatever its delta
    return q, k, v, delta


def random_span(size):
    return torch.randperm(N)[:size].sort().values


def check_against_reference(q, k, v, delta, span, *, mask=None, causal=True, scale=0.3, grad_out=None):
    """Forward (and with grad_out, dQ and d delta) of backend='cpp' against float64."""
    leaves = [q] + ([] if delta is None else [delta])
    for x in leaves:
        x.requires_grad_(True)
    out = value_delta_attention(q, k, v, delta, span, attention_mask=mask, scale=scale, causal=causal, backend="cpp")

    def run(dtype):
        xs = [x.detach().to(dtype).requires_grad_(True) for x in leaves]
        qx, dx = xs[0], (xs[1] if delta is not None else None)
        o, _ = reference(qx, k.to(dtype), v.to(dtype), dx, span, mask, scale, causal)
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


@pytest.mark.parametrize(
    "b,hq,hkv,t,d,dtype",
    [
        (2, 7, 1, 1, 64, torch.float32),  # GQA 7:1 decode
        (1, 8, 1, 3, 80, torch.bfloat16),  # GQA 8:1, three queries
        (1, 14, 2, 3, 128, torch.float16),
        (1, 4, 2, 2, 72, torch.float32),  # D not a multiple of the 16 vector lanes
        (1, 8, 1, 40, 64, torch.float32),  # prefill-sized T, causal over the last 40 keys
    ],
)
def test_forward_and_grads_match_reference(b, hq, hkv, t, d, dtype):
    span = random_span(300)
    q, k, v, delta = make_inputs(b, hq, hkv, t, d, dtype, span)
    check_against_reference(q, k, v, delta, span, grad_out=torch.randn(b, hq, t, d, dtype=dtype))


@pytest.mark.parametrize("layout", ["none", "empty", "full", "contiguous"])
def test_span_layouts(layout):
    span = {
        "none": None,
        "empty": torch.zeros(0, dtype=torch.long),
        "full": torch.arange(N),
        "contiguous": torch.arange(100, 1100),
    }[layout]
    q, k, v, delta = make_inputs(1, 8, 1, 3, 80, torch.float32, span)
    check_against_reference(q, k, v, delta, span, grad_out=torch.randn(1, 8, 3, 80))


def test_fully_masked_row_is_zero_with_zero_grads():
    span = random_span(200)
    q, k, v, delta = make_inputs(2, 7, 1, 3, 64, torch.float32, span)
    mask = torch.zeros(2, 1, 3, N)
    mask[0, 0, 1] = float("-inf")  # query t=1 of batch 0 sees nothing, in every head
    mask[1, 0, :, ::3] = float("-inf")
    grad_out = torch.randn(2, 7, 3, 64)
    out, (grad_q, grad_delta) = check_against_reference(q, k, v, delta, span, mask=mask, grad_out=grad_out)
    assert torch.all(out[0, :, 1] == 0)
    assert torch.all(grad_q[0, :, 1] == 0)
    assert torch.isfinite(grad_delta).all()
    # The raw kernel reports lse = -inf for the blind rows, finite elsewhere.
    si = torch.full((N,), -1, dtype=torch.int32)
    si[span] = torch.arange(span.numel(), dtype=torch.int32)
    _, lse = torch.ops.vreason_C.value_delta_attention_fwd(q, k, v, delta, si, mask, 0.3, True)
    blind = torch.zeros_like(lse, dtype=torch.bool)
    blind[0, :, 1] = True
    assert torch.all(lse[blind] == float("-inf")) and torch.isfinite(lse[~blind]).all()


def test_non_contiguous_inputs():
    """Strided heads (a sliced static cache) and a transposed query read in place."""
    span = random_span(150)
    q = torch.randn(1, 1, 8, 64).transpose(1, 2)  # [B, Hq, T=1, D] with a non-unit head stride
    cache_k = torch.randn(1, 2, N + 50, 64)
    cache_v = torch.randn(1, 2, N + 50, 64)
    k, v = cache_k[:, 1:, :N], cache_v[:, 1:, :N]
    delta = torch.randn(1, 1, 150, 64)
    check_against_reference(q.contiguous(), k, v, delta, span)
    out_strided = value_delta_attention(q, k, v, delta, span, scale=0.3, backend="cpp")
    out_dense = value_delta_attention(q.contiguous(), k.contiguous(), v.contiguous(), delta, span, scale=0.3,
                                      backend="cpp")  # fmt: skip
    assert torch.equal(out_strided, out_dense)


def _fwd_bwd(q, k, v, delta, si, mask, grad_out):
    out, lse = torch.ops.vreason_C.value_delta_attention_fwd(q, k, v, delta, si, mask, 0.125, True)
    grads = torch.ops.vreason_C.value_delta_attention_bwd(grad_out, q, k, v, delta, si, mask, 0.125, True, lse)
    return (out, lse) + tuple(grads)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bitwise_deterministic_across_calls_and_threads(dtype):
    span = random_span(400)
    q, k, v, delta = make_inputs(2, 8, 2, 3, 80, dtype, span)
    si = torch.full((N,), -1, dtype=torch.int32)
    si[span] = torch.arange(span.numel(), dtype=torch.int32)
    mask = torch.where(torch.rand(2, 1, 3, N) < 0.1, float("-inf"), 0.0).expand(2, 8, 3, N)
    grad_out = torch.randn(2, 8, 3, 80, dtype=dtype)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        first = _fwd_bwd(q, k, v, delta, si, mask, grad_out)
        second = _fwd_bwd(q, k, v, delta, si, mask, grad_out)
        torch.set_num_threads(1)
        single = _fwd_bwd(q, k, v, delta, si, mask, grad_out)
    finally:
        torch.set_num_threads(threads)
    for a, b, c in zip(first, second, single):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_argument_checks_name_the_argument():
    q, k, v, delta = make_inputs(1, 4, 2, 1, 64, torch.float32, random_span(10))
    si = torch.full((N,), -1, dtype=torch.int32)
    si[:10] = torch.arange(10, dtype=torch.int32)
    op = torch.ops.vreason_C.value_delta_attention_fwd
    with pytest.raises(RuntimeError, match="span_index"):
        op(q, k, v, delta, si.long(), None, 0.1, True)
    bad = si.clone()
    bad[20] = 3  # row 3 mapped twice
    with pytest.raises(RuntimeError, match="span_index maps two positions"):
        op(q, k, v, delta, bad, None, 0.1, True)
    with pytest.raises(RuntimeError, match="delta_v"):
        op(q, k, v, delta[:, :1], si, None, 0.1, True)
    with pytest.raises(RuntimeError, match="attn_bias"):
        op(q, k, v, delta, si, torch.zeros(1, 4, 2, N), 0.1, True)
    with pytest.raises(RuntimeError, match="Hkv"):
        op(torch.randn(1, 3, 1, 64), k, v, delta, si, None, 0.1, True)
