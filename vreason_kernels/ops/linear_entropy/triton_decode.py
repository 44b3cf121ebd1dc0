"""The T=1 (decode) partials kernel of ``linear_entropy``: W streamed once, A/B on chip.

Same sums as ``triton_one_pass._forward_partials_kernel`` (docs/design.md §2.1), for one row::

    s = sum e^{z_j - m}        t = sum e^{z_j - m} (z_j - m)
    A = sum e^{z_j - m} w_j    B = sum e^{z_j - m} (z_j - m) w_j

Why a kernel of its own: the general kernel tiles rows for ``tl.dot`` (16 at least), so at
T=1 it keeps A/B in a global scratch slab and re-reads each W tile for the A/B update.
Per vocabulary tile that is a read-modify-write of ``2 D`` fp32 values (0.5 byte of slab
traffic per byte of bf16 W at BLOCK_V=16) plus the W re-read, all of which must stay in
L2 (benchmarks/results/triton_resources.md). Here one program holds the whole row:
``h``, ``A`` and ``B`` are ``[BLOCK_D >= D]`` register tensors, each ``[BLOCK_V, D]`` W tile
is loaded once and used for the logits (a GEMV: ``sum(w * h)``) and for the A/B update
while still in registers, and the program writes its (m, s, t, A, B) once at the end, in
the slab layout ``_merge_kernel`` folds (``[split, row=0, :]``). HBM sees W once plus
``2 x splits x D`` fp32 partials (about 1% of W for the 7B head).

No ``tl.dot``: the products and sums are plain fp32 FMAs, so fp32 inputs get fp32 (not
tf32) products as well.
"""

import os

import triton
import triton.language as tl

from vreason_kernels.backend import triton_interpreted
from vreason_kernels.ops.triton_utils import NEG_INF, online_softmax_tile

# Elements of one W tile: 16K values (32 KB of bf16) keeps a few loads in flight per SM
# without the tile crowding out h/A/B from the registers. Under the interpreter, small
# tiles make test shapes (V ~ 300) span several tiles and splits.
_TILE_ELEMENTS = 16384
_INTERPRETER_TILE_ELEMENTS = 512
# Double-buffered W tiles: 64 KB of shared memory for bf16, 128 KB for fp32.
NUM_STAGES = 2


@triton.jit
def _decode_partials_kernel(
    h_ptr, w_ptr, b_ptr, logits_ptr,
    m_ptr, s_ptr, t_ptr, a_ptr, bb_ptr,
    V, D, stride_w, tau, chunk,
    HAS_BIAS: tl.constexpr, NEED_GRAD: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Online softmax statistics of vocabulary rows ``[split chunk, (split + 1) chunk)`` for one hidden row.

    Per tile, with ``m' = max(m, max_j z_j)`` and ``r = e^{m - m'}`` (docs/design.md §2.1):
    ``t <- r (t + (m - m') s) + sum e (z - m')``, ``s <- r s + sum e``,
    ``B <- r (B + (m - m') A) + sum_j e_j (z_j - m') w_j``, ``A <- r A + sum_j e_j w_j``.
    Masked entries (z = -inf, or past the chunk) get weight exactly 0.
    """
    split = tl.program_id(0)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    h = tl.load(h_ptr + ds, mask=d_ok, other=0.0).to(tl.float32)
    v_start = split * chunk
    v_end = tl.minimum(v_start + chunk, V)

    m = tl.full((1,), NEG_INF, dtype=tl.float32)
    s = tl.zeros((1,), dtype=tl.float32)
    t = tl.zeros((1,), dtype=tl.float32)
    a = tl.zeros((BLOCK_D,), dtype=tl.float32)
    b = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        w = tl.load(w_ptr + cols.to(tl.int64)[:, None] * stride_w + ds[None, :],
                    mask=col_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        logits = tl.sum(w * h[None, :], axis=1)
        if HAS_BIAS:
            logits += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        logits = tl.where(col_ok, logits, NEG_INF)
        if STORE_LOGITS:
            tl.store(logits_ptr + cols, logits.to(logits_ptr.dtype.element_ty), mask=col_ok)
        m, r, delta, e, ez = online_softmax_tile(m, logits / tau)  # one row: m, s, t are [1]
        if NEED_GRAD:
            b = r * (b + delta * a) + tl.sum(ez[:, None] * w, axis=0)
            a = r * a + tl.sum(e[:, None] * w, axis=0)
        t = r * (t + delta * s) + tl.sum(ez, axis=0)
        s = r * s + tl.sum(e, axis=0)
    one = tl.arange(0, 1)
    tl.store(m_ptr + split + one, m)
    tl.store(s_ptr + split + one, s)
    tl.store(t_ptr + split + one, t)
    if NEED_GRAD:
        slab = split.to(tl.int64) * D + ds
        tl.store(a_ptr + slab, a, mask=d_ok)
        tl.store(bb_ptr + slab, b, mask=d_ok)


def decode_blocks(dim: int) -> dict:
    """The whole row in one tile (BLOCK_D >= D), BLOCK_V rows of W per load; from
    D = 8192 one row per load (two spilled registers even at 16 warps)."""
    block_d = triton.next_power_of_2(dim)
    elements = _INTERPRETER_TILE_ELEMENTS if triton_interpreted() else _TILE_ELEMENTS
    return dict(BLOCK_V=1 if block_d >= 8192 else max(1, elements // block_d), BLOCK_D=block_d)


def decode_num_warps(block_d: int) -> int:
    # h, A, B are 3 BLOCK_D fp32 vectors spread over the block: 16 warps keep D = 8192 at
    # 48 registers per thread for them, leaving room for the W tile.
    return 16 if block_d >= 8192 else 8


# h, A and B live in registers: compiled without spills up to this D (the §6 heads' largest).
MAX_DIM = 8192


def decode_kernel_applies(rows: int, dim: int) -> bool:
    """T=1 takes this kernel; VREASON_LINEAR_ENTROPY_DECODE_KERNEL=0 sends it to the many-rows
    path (``triton_chunked``: W read twice), kept for A/B timing on a GPU: the choice rests on
    the bytes model, not on a measurement."""
    return rows == 1 and dim <= MAX_DIM and os.environ.get("VREASON_LINEAR_ENTROPY_DECODE_KERNEL", "1") != "0"


def launch_partials(hidden, weight, bias, logits, stats, moments, temperature: float, chunk: int, blocks: dict):
    """Write each split's (m, s, t) to ``stats[:, split, 0]`` and, given ``moments``, its
    (A, B) to ``moments[:, split, 0]``; given ``logits``, the logits."""
    _decode_partials_kernel[(stats.shape[1],)](
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, logits_ptr=logits,
        m_ptr=stats[0], s_ptr=stats[1], t_ptr=stats[2],
        a_ptr=None if moments is None else moments[0], bb_ptr=None if moments is None else moments[1],
        V=weight.shape[0], D=hidden.shape[1], stride_w=weight.stride(0), tau=float(temperature), chunk=chunk,
        HAS_BIAS=bias is not None, NEED_GRAD=moments is not None, STORE_LOGITS=logits is not None,
        num_warps=decode_num_warps(blocks["BLOCK_D"]), num_stages=NUM_STAGES, **blocks,
    )
