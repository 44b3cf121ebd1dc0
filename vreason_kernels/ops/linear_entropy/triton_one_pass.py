"""``linear_entropy``'s one-pass partials kernel: W read once, for any number of rows.

Notation (docs/design.md §2.1): ``z = (W h + b) / tau``, ``p = softmax(z)``,
``H = logsumexp(z) - sum_j p_j z_j``, ``dH/dz_j = -p_j (z_j - mu)`` with ``mu = E_p[z]``.

``_forward_partials_kernel``, grid ``(row blocks, vocabulary splits)``: each program
streams its contiguous chunk of the vocabulary in ``BLOCK_V`` tiles and keeps, relative
to its running max ``m``::

    s = sum e^{z_j - m}             t = sum e^{z_j - m} (z_j - m)
    A = sum e^{z_j - m} w_j         B = sum e^{z_j - m} (z_j - m) w_j

``A``/``B`` (with the gradient only) are ``[BLOCK_R, D]`` and D reaches 8192, far beyond
registers, so they live in a fp32 scratch slab owned by the program and are
read-modify-written one D tile at a time per vocabulary tile: 16 bytes of slab traffic
per ``BLOCK_V`` bf16 W bytes and row. ``triton_backend.forward`` therefore sends the
gradient of more than one row elsewhere; the vocabulary-parallel op
(``vreason_kernels.distributed``), which needs each slice's A and B themselves, still
runs it. ``triton_splits._merge_kernel`` then folds the splits in a fixed order.

Determinism: block sizes, warps and the split count are functions of the shapes only;
the autotuner (CUDA only) chooses among pipelining depths (``triton_utils.autotune_configs``),
which change the schedule but not the arithmetic, so its timing-based pick cannot change
the bits.
"""

import torch
import triton
import triton.language as tl

from vreason_kernels.backend import triton_interpreted
from vreason_kernels.ops.linear_entropy.triton_splits import split_rows
from vreason_kernels.ops.triton_utils import NEG_INF, online_softmax_tile, precision, tuned


@triton.jit
def _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, R, V, D, stride_w,
                 HAS_BIAS: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """``logits[r, j] = sum_d h[r, d] W[j, d] + b[j]`` in fp32 for one [rows x cols] tile.

    Columns past the vocabulary come back as -inf (p = 0 there); rows past R are
    computed from zeros and never stored. Inputs are upcast at load, so every product
    and sum is fp32 (PRECISION="tf32" is exact for values that came from bf16/fp16).
    """
    row_ok = rows < R
    col_ok = cols < V
    acc = tl.zeros((rows.shape[0], cols.shape[0]), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(h_ptr + rows[:, None] * D + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc = tl.dot(h.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return tl.where(col_ok[None, :], acc, NEG_INF)


@triton.jit
def _forward_partials_kernel(
    h_ptr, w_ptr, b_ptr, logits_ptr,
    m_ptr, s_ptr, t_ptr, a_ptr, bb_ptr,
    R, V, D, stride_w, tau, chunk,
    HAS_BIAS: tl.constexpr, NEED_GRAD: tl.constexpr, STORE_LOGITS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax statistics of one vocabulary chunk, for one block of rows.

    For every vocabulary tile, with ``m' = max(m, max_j z_j)``, ``r = e^{m - m'}``:

        t <- r (t + (m - m') s) + sum_j e^{z_j - m'} (z_j - m')
        s <- r s               + sum_j e^{z_j - m'}
        B <- r (B + (m - m') A) + [e^{z - m'} (z - m')] @ W_tile
        A <- r A               + [e^{z - m'}] @ W_tile

    (the rescales are docs/design.md §2.1's). Masked entries (z = -inf) get weight exactly 0
    via ``where`` rather than e^{-inf} * (-inf) = NaN. Writes this split's (m, s, t) at
    ``[split, row]`` and its (A, B) at ``[split, row, :]``.
    """
    rows, row_ok, split, v_start, v_end = split_rows(R, V, chunk, BLOCK_R)
    rows64 = rows.to(tl.int64)
    slab = (split * R + rows64) * D  # this split's A/B rows in the scratch slab

    m = tl.full((BLOCK_R,), NEG_INF, dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # chunks are whole tiles: only the last tile crosses V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, R, V, D, stride_w, HAS_BIAS, BLOCK_D, PRECISION)
        if STORE_LOGITS:
            out = logits_ptr + rows64[:, None] * V + cols[None, :]
            tl.store(out, logits.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])
        m_new, r, delta, e, ez = online_softmax_tile(m, logits / tau)
        if NEED_GRAD:
            # Slab rows that have seen no live entry hold zeros: skip reading them (this
            # also covers the chunk's first tile, whose slab is still uninitialised).
            _update_moments(w_ptr, a_ptr, bb_ptr, slab, row_ok, row_ok & (m > NEG_INF), cols, V, D, stride_w,
                            r, delta, e, ez, BLOCK_D, PRECISION)
        t = r * (t + delta * s) + tl.sum(ez, axis=1)
        s = r * s + tl.sum(e, axis=1)
        m = m_new
    tl.store(m_ptr + split * R + rows, m, mask=row_ok)
    tl.store(s_ptr + split * R + rows, s, mask=row_ok)
    tl.store(t_ptr + split * R + rows, t, mask=row_ok)


@triton.jit
def _update_moments(w_ptr, a_ptr, bb_ptr, slab, row_ok, row_has_prev, cols, V, D, stride_w,
                    r, delta, e, ez, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr):
    """``B <- r (B + delta A) + ez @ W_tile`` and ``A <- r A + e @ W_tile``, one D tile at a time.

    Rows with ``row_has_prev`` false read nothing and take ``A = B = 0``; every row is
    written.
    """
    col_ok = cols < V
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        w = w.to(tl.float32)
        offs = slab[:, None] + ds[None, :]
        mask = row_ok[:, None] & d_ok[None, :]
        read = row_has_prev[:, None] & d_ok[None, :]
        a = tl.load(a_ptr + offs, mask=read, other=0.0)
        b = tl.load(bb_ptr + offs, mask=read, other=0.0)
        b = r[:, None] * (b + delta[:, None] * a) + tl.dot(ez, w, input_precision=PRECISION)
        a = r[:, None] * a + tl.dot(e, w, input_precision=PRECISION)
        tl.store(a_ptr + offs, a, mask=mask)
        tl.store(bb_ptr + offs, b, mask=mask)


# Interpreter tiles are small so that test shapes (V ~ 300, D ~ 80) still span several tiles.
_INTERPRETER_BLOCKS = dict(BLOCK_R=16, BLOCK_V=32, BLOCK_D=32)


def forward_blocks(rows: int, dtype: torch.dtype) -> dict:
    """Tiles for the partials kernel (tl.dot needs every dim >= 16).

    Decode (few rows) is a GEMV: thin vocabulary tiles keep each program's W tile
    (BLOCK_V x D, 114 KB at D=3584) resident in L2 between its two uses. Many rows are a
    GEMM: wider tiles raise the flops per byte of A/B scratch traffic (6 BLOCK_V / 16).
    Rows come 32 to a tile: at 64 x 128, ptxas spilled up to 1.9 KB per thread (bf16,
    sm_80) and 6.7 KB (fp32); fp32 inputs (PRECISION=ieee) also take 64-wide vocabulary
    tiles (benchmarks/results/triton_resources.md).
    """
    if triton_interpreted():
        return dict(_INTERPRETER_BLOCKS)
    if rows <= 16:
        return dict(BLOCK_R=16, BLOCK_V=16, BLOCK_D=256)
    return dict(BLOCK_R=32, BLOCK_V=64 if dtype == torch.float32 else 128, BLOCK_D=64)


_forward_partials = tuned(key=["D", "BLOCK_R", "BLOCK_V", "BLOCK_D", "NEED_GRAD", "STORE_LOGITS"])(
    _forward_partials_kernel
)


def launch_partials(hidden, weight, bias, logits, stats, moments, temperature: float, chunk: int, blocks: dict):
    """Write each split's (m, s, t) to ``stats[:, split]`` and, given ``moments``, its
    (A, B) to ``moments[:, split]``; given ``logits``, the logits."""
    rows, dim = hidden.shape
    _forward_partials[(triton.cdiv(rows, blocks["BLOCK_R"]), stats.shape[1])](
        h_ptr=hidden, w_ptr=weight, b_ptr=bias, logits_ptr=logits,
        m_ptr=stats[0], s_ptr=stats[1], t_ptr=stats[2],
        a_ptr=None if moments is None else moments[0], bb_ptr=None if moments is None else moments[1],
        R=rows, V=weight.shape[0], D=dim, stride_w=weight.stride(0), tau=float(temperature), chunk=chunk,
        HAS_BIAS=bias is not None, NEED_GRAD=moments is not None, STORE_LOGITS=logits is not None,
        PRECISION=precision(hidden.dtype), **blocks,
    )
