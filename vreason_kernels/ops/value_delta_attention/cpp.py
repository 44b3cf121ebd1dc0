"""The C++ CPU backend (csrc/cpu/value_delta_attention.cpp), behind the backend contract of naive.py.

The kernel is tuned for decode (the few query rows of a kv-head group share one pass over
K and V) but takes any T: measured on 1 thread at N = 8k, 28/4 heads, D = 128, it stays
2x faster than the torch backend up to T = 256 and holds no [T, N] score matrix, so
prefill-sized queries need no fallback.
"""

import torch


def forward(query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool):
    return torch.ops.vreason_C.value_delta_attention_fwd(
        query, key, value, delta_v, span_index, attn_bias, scale, causal
    )


def backward(grad_out, query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool, lse):
    return torch.ops.vreason_C.value_delta_attention_bwd(
        grad_out, query, key, value, delta_v, span_index, attn_bias, scale, causal, lse
    )
