"""An fp32-output matrix product for ``linear_entropy``'s many-rows path (``triton_chunked``).

``C (+)= A @ B (+ bias)`` with fp32 accumulation and output, where A and B may be any
strided views (the path multiplies by ``W``, ``W^T`` and ``G^T`` without copying) and
of different dtypes (fp32 ``G`` times bf16 ``W``: both are then upcast, and
``input_precision`` says how ``tl.dot`` rounds them).

Why not ``torch.matmul``: it returns the inputs' dtype, so bf16 logits would be rounded
to 8 bits before the softmax, and it cannot multiply fp32 by bf16 without an fp32 copy
of ``W``. Why not atomics for split-K: the same input must give the same bits, so each
K split writes its own partial and the caller sums them in index order.
"""

import torch
import triton
import triton.language as tl

from vreason_kernels.backend import sm_count_or_none, triton_interpreted
from vreason_kernels.ops.triton_utils import split_plan, tuned


@triton.jit
def _matmul_kernel(
    a_ptr, b_ptr, bias_ptr, c_ptr,
    M, N, K, k_split,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cs, stride_cm, stride_cn,
    HAS_BIAS: tl.constexpr, ACCUMULATE: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One ``[BLOCK_M, BLOCK_N]`` tile of ``C[split] (+)= A[:, ks] @ B[ks, :] (+ bias)``, ``ks`` this split's K range.

    Program ids run down ``GROUP_M`` M tiles before moving to the next N tile (the Triton
    tutorial's grouped order), so programs launched together share their B columns and
    A rows in L2: ``logits = h W^T`` reads each W tile from HBM once for all row tiles.
    """
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_tiles = tl.cdiv(N, BLOCK_N)
    group = pid // (GROUP_M * n_tiles)
    first_m = group * GROUP_M
    group_rows = tl.minimum(tl.cdiv(M, BLOCK_M) - first_m, GROUP_M)
    pid_m = first_m + (pid % (GROUP_M * n_tiles)) % group_rows
    pid_n = (pid % (GROUP_M * n_tiles)) // group_rows

    # int64 offsets: a vocabulary index times W's row stride passes 2^31 at V x D = 152k x 16k.
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    m_ok = rm < M
    n_ok = rn < N
    k_start = split * k_split
    k_end = tl.minimum(k_start + k_split, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        ks = (k0 + tl.arange(0, BLOCK_K)).to(tl.int64)
        k_ok = ks < k_end
        a = tl.load(a_ptr + rm[:, None] * stride_am + ks[None, :] * stride_ak, mask=m_ok[:, None] & k_ok[None, :],
                    other=0.0)
        b = tl.load(b_ptr + ks[:, None] * stride_bk + rn[None, :] * stride_bn, mask=k_ok[:, None] & n_ok[None, :],
                    other=0.0)
        if UPCAST:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    c = c_ptr + split * stride_cs + rm[:, None] * stride_cm + rn[None, :] * stride_cn
    mask = m_ok[:, None] & n_ok[None, :]
    if ACCUMULATE:
        acc += tl.load(c, mask=mask, other=0.0)
    tl.store(c, acc, mask=mask)


_matmul = tuned(key=["BLOCK_M", "BLOCK_N", "BLOCK_K", "UPCAST", "HAS_BIAS", "ACCUMULATE"])(_matmul_kernel)


def matmul_blocks(rows: int, upcast: bool) -> dict:
    """Tiles: as many rows as the product has, 16 to 128 (``tl.dot`` needs 16); K tiles
    of 64 two-byte or 32 four-byte values. The interpreter pays per program and per loop
    step, not per element: there, tiles as large as still leave test shapes (V ~ 300,
    D ~ 40-80) a few of them (rows x V x D = 32 x 4096 x 128, forward and backward: 1.0 s;
    217 s with 16 x 32 x 16 tiles and one-row chunks)."""
    if triton_interpreted():
        return dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=32, GROUP_M=2)
    block_m = min(128, max(16, triton.next_power_of_2(rows)))
    return dict(BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=32 if upcast else 64, GROUP_M=8)


def split_k_plan(tiles: int, k: int, block_k: int, sm_count) -> tuple:
    """(K per split, splits): enough programs to fill the GPU twice over (4 under the
    interpreter), each split at least 4 K tiles long. Shapes and SM count only."""
    return split_plan(k, block_k, tiles, sm_count, interpreter_programs=4, min_tiles=4)


def matmul(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, *, precision: str, bias=None,
           accumulate: bool = False, split_k: bool = False) -> torch.Tensor:
    """``out (+)= a @ b (+ bias)``: ``a [M, K]``, ``b [K, N]`` of any strides and dtypes, ``out [M, N]`` fp32.

    ``split_k`` spreads a long K over more programs when the M x N tiles alone would
    leave SMs idle (``dH/dh = G W`` at a few rows: K is the vocabulary); the partials
    are then summed in split order. ``bias`` and ``accumulate`` take no split.
    """
    (m, k), n = a.shape, b.shape[1]
    # The interpreter's tl.dot multiplies bf16 operands as raw bits (triton 3.9: errors of
    # 1e10), so there it gets fp32 ones. The result is the same: a product of two bf16 or
    # fp16 values is exact in fp32, and the sums are fp32 either way.
    upcast = a.dtype != b.dtype or a.dtype == torch.float32 or triton_interpreted()
    blocks = matmul_blocks(m, upcast)
    tiles = triton.cdiv(m, blocks["BLOCK_M"]) * triton.cdiv(n, blocks["BLOCK_N"])
    k_split, splits = (split_k_plan(tiles, k, blocks["BLOCK_K"], sm_count_or_none(a.device)) if split_k
                       else (k, 1))
    if splits > 1 and (bias is not None or accumulate):
        raise ValueError("matmul: a split K takes neither bias nor accumulate")
    target = out if splits == 1 else torch.empty((splits, m, n), dtype=torch.float32, device=out.device)
    stride_s, stride_m, stride_n = (0, *out.stride()) if splits == 1 else target.stride()
    _matmul[(tiles, splits)](
        a_ptr=a, b_ptr=b, bias_ptr=bias, c_ptr=target,
        M=m, N=n, K=k, k_split=k_split,
        stride_am=a.stride(0), stride_ak=a.stride(1), stride_bk=b.stride(0), stride_bn=b.stride(1),
        stride_cs=stride_s, stride_cm=stride_m, stride_cn=stride_n,
        HAS_BIAS=bias is not None, ACCUMULATE=accumulate, UPCAST=upcast, PRECISION=precision, **blocks,
    )
    if splits > 1:
        torch.sum(target, dim=0, out=out)
    return out
