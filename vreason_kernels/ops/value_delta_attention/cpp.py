"""The C++ CPU backend (csrc/cpu/value_delta_attention.cpp), behind the backend contract of naive.py.

The kernel is fused for decode: the few query rows of a kv-head group share one pass over
K and V, and V' is formed per row on the fly. For prefill-sized T the work is two large
matmuls, which the torch backend hands to BLAS, so longer queries go there.
"""

import torch

from vreason_kernels.ops.value_delta_attention import naive

# Above this many queries the torch backend is faster (see the module docstring).
MAX_FUSED_QUERY_LEN = 16


def forward(query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool):
    if query.shape[2] > MAX_FUSED_QUERY_LEN:
        return naive.forward(query, key, value, delta_v, span_index, attn_bias, scale, causal)
    return torch.ops.vreason_C.value_delta_attention_fwd(
        query, key, value, delta_v, span_index, attn_bias, scale, causal
    )


def backward(grad_out, query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool, out, lse):
    if query.shape[2] > MAX_FUSED_QUERY_LEN:
        return naive.backward(grad_out, query, key, value, delta_v, span_index, attn_bias, scale, causal, out, lse)
    return torch.ops.vreason_C.value_delta_attention_bwd(
        grad_out, query, key, value, delta_v, span_index, attn_bias, scale, causal, out, lse
    )
