"""The Triton backend of ``value_delta_attention``, behind the backend contract of naive.py:
the launch configuration and the launches of ``triton_kernels``' kernels.

Block sizes, warps and split counts depend on the shapes (and the SM count) only, so
the same input gives the same bits.
"""

import torch
import triton

from vreason_kernels._alloc import new_output
from vreason_kernels.backend import sm_count_or_none, triton_interpreted
from vreason_kernels.ops.triton_utils import precision, split_plan
from vreason_kernels.ops.value_delta_attention.triton_kernels import (
    _backward_dq_kernel, _backward_dv_kernel, _forward_kernel, _merge_dq_kernel, _merge_kernel,
)

# Interpreter tiles are small so that test shapes (N ~ 70-300) still span several tiles
# and splits.
_MAX_FUSED_ROWS = 64


def _fp32_prefill(rows: int, dtype: torch.dtype) -> bool:
    """fp32 inputs (PRECISION=ieee) on the row-tiled path: the tiles that need their own config."""
    return dtype == torch.float32 and rows > _MAX_FUSED_ROWS and not triton_interpreted()


def _blocks(rows: int, dim: int, dtype: torch.dtype, backward: bool = False) -> dict:
    """Tiles (tl.dot needs every dim >= 16). All packed rows of a group in one tile when
    they fit (decode), so each K/V tile is loaded once for the whole group.

    Key tiles are 32 wide on the GPU (16 for decode at D <= 64): K, V, V' and delta are
    upcast to fp32 at load, and 64-key tiles spilled registers on the decode path and
    overflowed A100 shared memory in prefill (benchmarks/results/triton_resources.md).
    fp32 prefill takes 32 x 16 tiles: ieee products hold full fp32 operands, and at
    64 x 32 ptxas spilled up to 8 KB per thread in _backward_dq_kernel. The bf16/fp16
    prefill backward takes 32-row tiles: at 64, _backward_dq_kernel spilled 1.4 KB per
    thread on sm_80 (200 B on sm_90); the forward at 64 rows does not spill.
    """
    interpreted = triton_interpreted()
    fused = rows <= _MAX_FUSED_ROWS
    block_d = max(16, triton.next_power_of_2(dim))
    if _fp32_prefill(rows, dtype):
        return dict(BLOCK_M=32, BLOCK_N=16, BLOCK_D=block_d)
    if fused:
        block_m = max(16, triton.next_power_of_2(rows))
    else:
        block_m = 16 if interpreted else (32 if backward else 64)
    block_n = 16 if interpreted or (fused and block_d <= 64) else 32
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d)


# 8 warps for every tile: with 4, ptxas spilled even the 16 x 64 fp32 decode tiles.
_LAUNCH_OPTS = dict(num_warps=8, num_stages=2)


def _launch_opts(rows: int, dtype: torch.dtype) -> dict:
    """No software pipelining for fp32 prefill: its second stage of fp32 K/V buffers
    spilled registers (up to 0.6 KB per thread) even at 32 x 16 tiles."""
    return dict(_LAUNCH_OPTS, num_stages=1) if _fp32_prefill(rows, dtype) else _LAUNCH_OPTS


def _chunk(programs: int, n: int, block_n: int, sm_count, num_splits=None) -> int:
    """Keys per split: enough splits to fill the GPU twice over (under the interpreter, 3
    split-programs), each a whole number of tiles; ``num_splits`` overrides the count."""
    return split_plan(n, block_n, programs, sm_count, interpreter_programs=3, num_splits=num_splits)[0]


def _kv_args(key, value, delta_v, span_index, attn_bias) -> dict:
    """The K/V/delta/mask pointers and strides every kernel takes (None and zero strides
    for an absent mask; None for an absent delta)."""
    bias_strides = attn_bias.stride() if attn_bias is not None else (0, 0, 0, 0)
    return dict(
        k_ptr=key, v_ptr=value, dlt_ptr=delta_v, idx_ptr=span_index, bias_ptr=attn_bias,
        stride_kb=key.stride(0), stride_kh=key.stride(1), stride_kn=key.stride(2),
        stride_vb=value.stride(0), stride_vh=value.stride(1), stride_vn=value.stride(2),
        stride_bb=bias_strides[0], stride_bh=bias_strides[1], stride_bt=bias_strides[2], stride_bn=bias_strides[3],
    )


def _shape(query, key, delta_v):
    b, hq, t, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    s = 0 if delta_v is None else delta_v.shape[2]
    return b, hkv, hq // hkv, t, n, d, s


def forward(query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool, num_splits=None):
    """(out [B, Hq, T, D] in query's dtype, lse f32 [B, Hq, T]).

    ``num_splits`` overrides the N split count (tests of the merge).
    """
    b, hkv, g, t, n, d, s = _shape(query, key, delta_v)
    query = query.contiguous()
    delta_v = None if delta_v is None or s == 0 else delta_v.contiguous()
    out = new_output(query.shape, dtype=query.dtype, device=query.device)
    lse = new_output((b, hkv * g, t), dtype=torch.float32, device=query.device)
    blocks = _blocks(g * t, d, query.dtype)
    row_tiles = triton.cdiv(g * t, blocks["BLOCK_M"])
    chunk = _chunk(b * hkv * row_tiles, n, blocks["BLOCK_N"], sm_count_or_none(query.device), num_splits)
    splits = triton.cdiv(n, chunk)
    f32 = dict(dtype=torch.float32, device=query.device)
    # The splits' partials (flash-decoding), fully written; none with one split.
    acc = torch.empty((splits, b * hkv * g * t * d), **f32) if splits > 1 else None
    ml = torch.empty((splits, b * hkv * g * t, 2), **f32) if splits > 1 else None
    opts = _launch_opts(g * t, query.dtype)
    _forward_kernel[(b * hkv, row_tiles, splits)](
        q_ptr=query, **_kv_args(key, value, delta_v, span_index, attn_bias),
        out_ptr=out, lse_ptr=lse, acc_ptr=acc, ml_ptr=ml,
        Hkv=hkv, G=g, T=t, N=n, D=d, S=s, chunk=chunk, scale=float(scale),
        HAS_DELTA=delta_v is not None, HAS_BIAS=attn_bias is not None, CAUSAL=causal, SPLIT=splits > 1,
        PRECISION=precision(query.dtype), **blocks, **opts,
    )
    if splits > 1:
        _merge_kernel[(b * hkv, row_tiles)](
            acc_ptr=acc, ml_ptr=ml, out_ptr=out, lse_ptr=lse, Hkv=hkv, G=g, T=t, D=d, SPLITS=splits,
            BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"], **opts,
        )
    return out, lse


def backward(grad_out, query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool, lse):
    """(grad_query f32 [B, Hq, T, D], grad_delta_v f32 [B, Hkv, S, D] | [0])."""
    b, hkv, g, t, n, d, s = _shape(query, key, delta_v)
    device = query.device
    f32 = dict(dtype=torch.float32, device=device)
    query, grad_out, lse = query.contiguous(), grad_out.contiguous(), lse.contiguous()
    grad_delta = new_output(delta_v.shape if delta_v is not None else (0,), **f32)
    has_delta = delta_v is not None and s > 0
    delta_v = delta_v.contiguous() if has_delta else None
    blocks = _blocks(g * t, d, query.dtype, backward=True)
    fuse_dq = g * t <= blocks["BLOCK_M"]
    common = dict(q_ptr=query, **_kv_args(key, value, delta_v, span_index, attn_bias), do_ptr=grad_out, lse_ptr=lse,
                  Hkv=hkv, G=g, T=t, N=n, D=d, S=s, scale=float(scale),
                  HAS_DELTA=has_delta, HAS_BIAS=attn_bias is not None, CAUSAL=causal,
                  PRECISION=precision(query.dtype), **blocks, **_launch_opts(g * t, query.dtype))
    grad_query = new_output(query.shape, **f32)
    if not fuse_dq:  # prefill: each program owns a tile of dQ rows and loops over the keys
        if has_delta:
            _backward_dv_kernel[(b * hkv, triton.cdiv(n, blocks["BLOCK_N"]))](
                **common, gdlt_ptr=grad_delta, dq_ptr=None, kbar_ptr=None, stat_ptr=None, chunk=blocks["BLOCK_N"],
                FUSE_DQ=False,
            )
        _backward_dq_kernel[(b * hkv, triton.cdiv(g * t, blocks["BLOCK_M"]))](**common, dq_ptr=grad_query)
        return grad_query, grad_delta
    # Decode: few key chunks, each summing its centred dQ partial over many tiles (K and V
    # read once for the whole backward), folded in chunk order by _merge_dq_kernel.
    chunk = _chunk(b * hkv, n, blocks["BLOCK_N"], sm_count_or_none(device))
    chunks = triton.cdiv(n, chunk)
    rows = b * hkv * g * t
    dq_parts = torch.empty((chunks, rows * d), **f32)  # fully written: every chunk stores every row
    kbar_parts = torch.empty_like(dq_parts)
    stats = torch.empty((chunks, rows, 2), **f32)
    _backward_dv_kernel[(b * hkv, chunks)](
        **common, gdlt_ptr=grad_delta if has_delta else None, dq_ptr=dq_parts, kbar_ptr=kbar_parts, stat_ptr=stats,
        chunk=chunk, FUSE_DQ=True,
    )
    _merge_dq_kernel[(b * hkv, 1)](
        dq_ptr=dq_parts, kbar_ptr=kbar_parts, stat_ptr=stats, grad_ptr=grad_query, Hkv=hkv, G=g, T=t, D=d,
        CHUNKS=chunks, scale=float(scale), BLOCK_M=blocks["BLOCK_M"], BLOCK_D=blocks["BLOCK_D"], **_LAUNCH_OPTS,
    )
    return grad_query, grad_delta
