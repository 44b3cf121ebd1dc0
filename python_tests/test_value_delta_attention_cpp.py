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

from python_tests.helpers import VDA_CPP_N as N
from python_tests.helpers import check_vda_cpp as check_against_reference
from python_tests.helpers import vda_cpp_inputs as make_inputs
from python_tests.helpers import needs_extension
from python_tests.helpers import vda_random_span as random_span
from vreason_kernels.ops.value_delta_attention import value_delta_attention

pytestmark = needs_extension


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
