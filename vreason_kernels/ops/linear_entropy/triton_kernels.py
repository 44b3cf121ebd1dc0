"""The Triton backend of ``linear_entropy``: the one-pass kernels, and where each path runs.

Notation (DESIGN.md §2.1): ``z = (W h + b) / tau``, ``p = softmax(z)``,
``H = logsumexp(z) - sum_j p_j z_j``, ``dH/dz_j = -p_j (z_j - mu)`` with ``mu = E_p[z]``.

Which path ``forward`` takes:

- one row with the gradient (V-Reason's update step): ``triton_decode``'s kernel, W
  streamed once with h, A and B in registers, then ``_merge_kernel``;
- the entropy alone, at any row count: ``_forward_partials_kernel`` and ``_merge_kernel``
  below, one read of W;
- the gradient of more rows: ``triton_chunked``, statistics first and then ``dH/dh = G W``
  as a plain product (its docstring says why). ``weight_grad`` always goes there.

The one-pass forward takes two launches:

1. ``_forward_partials_kernel``, grid ``(row blocks, vocabulary splits)``. Each program
   streams its contiguous chunk of the vocabulary in ``BLOCK_V`` tiles and keeps, relative
   to its running max ``m``::

       s = sum e^{z_j - m}             t = sum e^{z_j - m} (z_j - m)
       A = sum e^{z_j - m} w_j         B = sum e^{z_j - m} (z_j - m) w_j

   ``A``/``B`` (with the gradient only) are ``[BLOCK_R, D]`` and D reaches 8192, far
   beyond registers, so they live in a fp32 scratch slab owned by the program and are
   read-modify-written one D tile at a time per vocabulary tile: 16 bytes of slab traffic
   per ``BLOCK_V`` bf16 W bytes and row. ``forward`` therefore sends the gradient of more
   than one row elsewhere; the vocabulary-parallel op (``vreason_kernels.distributed``),
   which needs each slice's A and B themselves, still runs it.
2. ``_merge_kernel``, grid ``(row blocks, D tiles)``, folds the splits in a fixed order
   (split 0, 1, ...): no atomics, so the same input gives the same bits on every run.

Determinism: block sizes, warps and the split count are functions of the shapes only;
the autotuner (CUDA only) chooses among pipelining depths (``num_stages``), which change
the schedule but not the arithmetic, so its timing-based pick cannot change the bits.
"""

import torch
import triton
import triton.language as tl

from vreason_kernels._alloc import new_output
from vreason_kernels.backend import sm_count_or_none, triton_interpreted

# Kernels may read module globals only as tl.constexpr (a GPU compile rejects a plain float).
_NEG_INF = tl.constexpr(float("-inf"))


# ----------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------


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
    return tl.where(col_ok[None, :], acc, _NEG_INF)


@triton.jit
def _rescale(m_old, m_new):
    """Factors that move sums kept relative to ``m_old`` onto ``m_new >= m_old``.

    Returns ``r = e^{m_old - m_new}`` and ``delta = m_old - m_new``. A max of -inf means
    "nothing seen yet": its sums are 0, and r = delta = 0 keeps -inf - (-inf) = NaN and
    0 * inf out of them (both operands are zeroed before the subtraction, so not even a
    discarded branch makes a NaN).
    """
    seen = m_old > _NEG_INF
    delta = tl.where(seen, m_old, 0.0) - tl.where(seen, m_new, 0.0)
    return tl.where(seen, tl.exp(delta), 0.0), delta


@triton.jit
def _online_softmax_tile(m, z):
    """One tile ``z [rows, cols]`` of the online sums kept relative to the running max ``m [rows]``.

    Returns ``(m', r, delta, e, ez)``: ``m' = max(m, max_j z_j)``, ``r, delta`` from
    ``_rescale(m, m')``, ``e = e^{z - m'}`` and ``ez = e (z - m')``, so that the caller
    updates ``t <- r (t + delta s) + sum ez`` and ``s <- r s + sum e`` (and, in the one-pass
    kernel, A and B). Masked entries (z = -inf) get weight exactly 0 via ``where`` rather
    than e^{-inf} * (-inf) = NaN; a NaN logit stays live, so that it makes the row's H NaN.
    """
    m_new = tl.maximum(m, tl.max(z, axis=1))
    r, delta = _rescale(m, m_new)
    live = z != _NEG_INF
    m_live = tl.where(m_new > _NEG_INF, m_new, 0.0)  # equals m' wherever an entry is live
    zc = tl.where(live, z - m_live[:, None], 0.0)  # z - m', with masked entries pinned to 0
    e = tl.where(live, tl.exp(zc), 0.0)
    return m_new, r, delta, e, e * zc


# ----------------------------------------------------------------------------------------
# Forward: per-split partials, then a fixed-order merge
# ----------------------------------------------------------------------------------------


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

    (the rescales are DESIGN.md §2.1's). Masked entries (z = -inf) get weight exactly 0
    via ``where`` rather than e^{-inf} * (-inf) = NaN. Writes this split's (m, s, t) at
    ``[split, row]`` and its (A, B) at ``[split, row, :]``.
    """
    pid_r = tl.program_id(0)
    split = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R
    rows64 = rows.to(tl.int64)
    v_start = split * chunk
    v_end = tl.minimum(v_start + chunk, V)
    slab = (split * R + rows64) * D  # this split's A/B rows in the scratch slab

    m = tl.full((BLOCK_R,), _NEG_INF, dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)  # chunks are whole tiles: only the last tile crosses V
        logits = _logits_tile(h_ptr, w_ptr, b_ptr, rows, cols, R, V, D, stride_w, HAS_BIAS, BLOCK_D, PRECISION)
        if STORE_LOGITS:
            out = logits_ptr + rows64[:, None] * V + cols[None, :]
            tl.store(out, logits.to(logits_ptr.dtype.element_ty), mask=row_ok[:, None] & (cols < V)[None, :])
        m_new, r, delta, e, ez = _online_softmax_tile(m, logits / tau)
        if NEED_GRAD:
            # Slab rows that have seen no live entry hold zeros: skip reading them (this
            # also covers the chunk's first tile, whose slab is still uninitialised).
            _update_moments(w_ptr, a_ptr, bb_ptr, slab, row_ok, row_ok & (m > _NEG_INF), cols, V, D, stride_w,
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


@triton.jit
def _merge_kernel(
    m_ptr, s_ptr, t_ptr, a_ptr, bb_ptr,
    entropy_ptr, row_max_ptr, log_sum_ptr, mean_ptr, dh_ptr,
    R, D, SPLITS, tau,
    NEED_GRAD: tl.constexpr, STORE_MEAN: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Fold the splits, in order, onto the global max ``M = max_k m_k``, then finish.

    With ``r_k = e^{m_k - M}``, ``delta_k = m_k - M``:

        S = sum_k r_k s_k                 T = sum_k r_k (t_k + delta_k s_k)
        A = sum_k r_k A_k                 B = sum_k r_k (B_k + delta_k A_k)

    so ``S``, ``T``, ``A``, ``B`` are the whole-vocabulary sums relative to M, and

        H = log S - T/S,   mu = M + T/S,
        dH/dh = sum_j -p_j (z_j - mu) w_j / tau = -(B - (T/S) A) / (S tau).

    H is taken from the relative sums, not as lse - mu, which would cancel catastrophically
    for logits of magnitude 1e4. Program (i, 0) also writes the row statistics M and
    log S (lse = M + log S), kept apart for the same reason (see ``triton_chunked._logit_grad_kernel``).
    STORE_MEAN: it also writes ``mu - M = T/S``, the centre ``triton_chunked`` needs exact.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R

    m_max = tl.full((BLOCK_R,), _NEG_INF, dtype=tl.float32)
    for k in range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(m_ptr + k * R + rows, mask=row_ok, other=_NEG_INF))
    total_s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    total_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(SPLITS):
        r, delta = _rescale(tl.load(m_ptr + k * R + rows, mask=row_ok, other=_NEG_INF), m_max)
        s_k = tl.load(s_ptr + k * R + rows, mask=row_ok, other=0.0)
        total_t += r * (tl.load(t_ptr + k * R + rows, mask=row_ok, other=0.0) + delta * s_k)
        total_s += r * s_k
    total_s = tl.where(row_ok, total_s, 1.0)  # padding rows: keep log/divide finite
    mean = total_t / total_s  # mu - M
    if pid_d == 0:
        log_s = tl.log(total_s)
        tl.store(entropy_ptr + rows, log_s - mean, mask=row_ok)
        tl.store(row_max_ptr + rows, m_max, mask=row_ok)
        tl.store(log_sum_ptr + rows, log_s, mask=row_ok)
        if STORE_MEAN:
            tl.store(mean_ptr + rows, mean, mask=row_ok)
    if NEED_GRAD:
        ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = row_ok[:, None] & (ds < D)[None, :]
        rows_d = rows.to(tl.int64)[:, None] * D + ds[None, :]
        a = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        b = tl.zeros((BLOCK_R, BLOCK_D), dtype=tl.float32)
        a_k_ptr = a_ptr + rows_d
        b_k_ptr = bb_ptr + rows_d
        for k in range(SPLITS):
            r, delta = _rescale(tl.load(m_ptr + k * R + rows, mask=row_ok, other=_NEG_INF), m_max)
            a_k = tl.load(a_k_ptr, mask=mask, other=0.0)
            b += r[:, None] * (tl.load(b_k_ptr, mask=mask, other=0.0) + delta[:, None] * a_k)
            a += r[:, None] * a_k
            # Step pointers split by split: k * R * D itself could overflow int32.
            a_k_ptr += R * D
            b_k_ptr += R * D
        dh = -(b - mean[:, None] * a) / (total_s * tau)[:, None]
        tl.store(dh_ptr + rows_d, dh, mask=mask)


# ----------------------------------------------------------------------------------------
# Launch configuration
# ----------------------------------------------------------------------------------------

# Interpreter tiles are small so that test shapes (V ~ 300, D ~ 80) still span several tiles.
_INTERPRETER_BLOCKS = dict(BLOCK_R=16, BLOCK_V=32, BLOCK_D=32)
_INTERPRETER_SPLITS = 4


def _forward_blocks(rows: int, dtype: torch.dtype) -> dict:
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


def _merge_blocks() -> dict:
    return dict(BLOCK_R=16, BLOCK_D=32) if triton_interpreted() else dict(BLOCK_R=16, BLOCK_D=128)


def _num_splits(rows: int, vocab: int, block_r: int, block_v: int, sm_count) -> int:
    """Vocabulary splits: enough programs to fill the GPU twice over, at least one tile each.

    A function of the shapes (and the device's SM count; None = interpreter) only, never of timing.
    """
    programs = _INTERPRETER_SPLITS if sm_count is None else 2 * sm_count
    return max(1, min(triton.cdiv(programs, triton.cdiv(rows, block_r)), triton.cdiv(vocab, block_v)))


def _split_plan(rows: int, vocab: int, blocks: dict, sm_count, num_splits=None) -> tuple:
    """(vocabulary rows per split, split count) for the partials kernel's grid.

    Whole tiles per split, then the splits left empty by the rounding are dropped, so
    every split is non-empty. ``num_splits`` overrides ``_num_splits`` (tests of the merge).
    """
    if num_splits is None:
        num_splits = _num_splits(rows, vocab, blocks["BLOCK_R"], blocks["BLOCK_V"], sm_count)
    chunk = triton.cdiv(triton.cdiv(vocab, num_splits), blocks["BLOCK_V"]) * blocks["BLOCK_V"]
    return chunk, triton.cdiv(vocab, chunk)


def _autotune_configs() -> list:
    """Every config the autotuner may try; one under the interpreter.

    8 warps for every tile: with 4, ptxas spilled registers at each of them (fp32 partials
    and dW tiles 1.1 and 6.2 KB per thread, the 16 x 16 x 256 tile of 16 rows up to 208 B,
    bf16 dW 16 B; benchmarks/results/triton_resources.md).
    """
    if triton_interpreted():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    # 4 stages overflowed A100 shared memory at fp32 (benchmarks/results/triton_resources.md).
    return [triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3)]


def _tuned(*, key):
    """Autotune over pipelining depth on CUDA; exactly one config under the interpreter."""
    return triton.autotune(configs=_autotune_configs(), key=[] if triton_interpreted() else key)


_forward_partials = _tuned(key=["D", "BLOCK_R", "BLOCK_V", "BLOCK_D", "NEED_GRAD", "STORE_LOGITS"])(
    _forward_partials_kernel
)


def _precision(dtype: torch.dtype) -> str:
    # tf32 holds bf16/fp16 values exactly; fp32 inputs need full-precision products.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------
# Backend contract (see naive.py)
# ----------------------------------------------------------------------------------------


def forward_partials(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool,
                     num_splits=None):
    """Each vocabulary split's partial sums, unmerged: ``(stats, moments, logits)``.

    ``stats [3, splits, R]`` holds (m, s, t) and ``moments [2, splits, R, D]`` holds (A, B)
    (without a gradient, an unread stand-in). ``logits [R, V] | [0]``. For ``rows >= 1``.
    The vocabulary-parallel op (``vreason_kernels.distributed``) folds these itself.
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    logits = new_output((rows, vocab) if return_logits else (0,), dtype=hidden.dtype, device=device)

    from vreason_kernels.ops.linear_entropy import triton_decode  # imports this module

    decode = triton_decode.decode_kernel_applies(rows, dim)
    blocks = triton_decode.decode_blocks(dim) if decode else _forward_blocks(rows, hidden.dtype)
    chunk, num_splits = _split_plan(rows, vocab, dict(blocks, BLOCK_R=1) if decode else blocks,
                                    sm_count_or_none(device), num_splits)
    stats = torch.empty((3, num_splits, rows), **f32)  # fully written by the partials kernel
    # Without a gradient the moment pointers are never read: stats stands in for them.
    moments = torch.empty((2, num_splits, rows, dim), **f32) if need_grad else stats[:2]
    if decode:
        triton_decode.launch_partials(hidden, weight, bias, logits, stats, moments, temperature, chunk, blocks,
                                      need_grad, return_logits)
    else:
        _forward_partials[(triton.cdiv(rows, blocks["BLOCK_R"]), num_splits)](
            hidden, weight, hidden if bias is None else bias, logits if return_logits else hidden,
            stats[0], stats[1], stats[2], moments[0], moments[1],
            rows, vocab, dim, weight.stride(0), float(temperature), chunk,
            HAS_BIAS=bias is not None, NEED_GRAD=need_grad, STORE_LOGITS=return_logits,
            PRECISION=_precision(hidden.dtype), **blocks,
        )
    return stats, moments, logits


def forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    """(entropy f32 [R], dH/dh f32 [R, D] | [0], row_max f32 [R], log_sum f32 [R], logits [R, V] | [0]).

    One pass over W (``one_pass_forward``) where the gradient's A/B fit on chip or are not
    wanted: the T=1 kernel, and the entropy alone. The gradient of more rows takes the
    statistics-first path (``triton_chunked``), whose module docstring says why.
    """
    rows, dim = hidden.shape
    from vreason_kernels.ops.linear_entropy import triton_chunked, triton_decode  # both import this module

    if rows > 0 and need_grad and not triton_decode.decode_kernel_applies(rows, dim):
        return triton_chunked.forward(hidden, weight, bias, temperature, return_logits)
    return one_pass_forward(hidden, weight, bias, temperature, need_grad, return_logits)


def one_pass_forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool,
                     num_splits=None):
    """``forward`` from the partials kernels and ``_merge_kernel``, at any row count.

    ``num_splits`` overrides the vocabulary split count (tests of the merge); by default
    it comes from ``_num_splits``.
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    entropy, row_max, log_sum = (new_output((rows,), **f32) for _ in range(3))
    dh = new_output((rows, dim) if need_grad else (0,), **f32)
    if rows == 0:
        logits = new_output((0, vocab) if return_logits else (0,), dtype=hidden.dtype, device=hidden.device)
        return entropy, dh, row_max, log_sum, logits
    stats, moments, logits = forward_partials(hidden, weight, bias, temperature, need_grad, return_logits,
                                              num_splits)
    merge = _merge_blocks()
    grid = (triton.cdiv(rows, merge["BLOCK_R"]), triton.cdiv(dim, merge["BLOCK_D"]) if need_grad else 1)
    _merge_kernel[grid](
        stats[0], stats[1], stats[2], moments[0], moments[1],
        entropy, row_max, log_sum, entropy, dh if need_grad else entropy,
        rows, dim, stats.shape[1], float(temperature),
        NEED_GRAD=need_grad, STORE_MEAN=False, **merge,
    )
    return entropy, dh, row_max, log_sum, logits


def weight_grad(hidden, weight, bias, temperature: float, row_max, log_sum, entropy, grad_entropy, need_bias: bool):
    """dW_j = sum_r g_r (dH_r/dz_rj) h_r / tau (f32 [V, D]), db_j = sum_r g_r dH_r/dz_rj / tau (f32 [V] | [0]).

    The logits once, then one product with h (``triton_chunked``).
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    if rows == 0:  # nothing to sum; also keeps empty tensors out of the launch
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return torch.zeros((vocab, dim), **f32), torch.zeros(vocab if need_bias else 0, **f32)
    from vreason_kernels.ops.linear_entropy import triton_chunked  # imports this module

    return triton_chunked.weight_grad(hidden, weight, bias, temperature, row_max, log_sum, entropy, grad_entropy,
                                      need_bias)
