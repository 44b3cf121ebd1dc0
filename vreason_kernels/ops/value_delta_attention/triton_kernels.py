"""The Triton kernels of ``value_delta_attention``: the value delta applied inside the kernel
(their launches are ``triton_backend``'s).

Notation (docs/design.md §2.2-2.3): a span row ``i`` of kv-head ``h`` has
``u = v_i + delta_j`` (``j = span_index[i]``), ``n = max(||u||, eps)`` and
``v'_i = u ||v_i|| / n``; other rows keep ``v'_i = v_i``. Attention is then the usual
``out = softmax(scale q k^T + bias) v'`` with GQA and a bottom-right causal mask.

Row packing. The ``G = Hq / Hkv`` q-heads of one kv-head and their ``T`` queries form
``R = G T`` packed rows ``r = g T + t`` (contiguous in a contiguous ``[B, Hq, T, D]``
query). Every kernel tiles these rows, so a K/V tile, once loaded and modulated, serves
all q-heads of its group: for decode (R = 7 for Qwen2.5-VL-7B) K, V and delta are read
once per kv-head, for prefill the tiles are FA2's.

Forward (``_forward_kernel``, grid ``(B Hkv, row tiles, N splits)``): per K/V tile, load
``span_index`` for the positions, gather the delta rows where it is >= 0, apply the map in
fp32, then the online softmax. With one split (prefill) the program finishes the rows;
with several (flash-decoding: small T, long N) each split writes ``(acc, m, l)`` to
scratch and ``_merge_kernel`` folds the splits in a fixed order.

Backward (P recomputed from lse): ``dQ = scale (P * (dP - D)) K`` with ``dP = dO V'^T`` and
FA's row term ``D = rowsum(dO * O)`` taken as ``sum_j P_j dP_j / sum_j P_j`` from the same
fp32 dP, not from the output rounded to fp16/bf16 (whose V' differs from the fp32 V' of
dP by that rounding): a row whose P is one-hot gets dQ = 0 exactly, as its softmax is
constant. D is known only after the last key, so dQ is kept centred on the running mean
of dP (``_centred_dq_step``) and re-centred on D at the end.
- ``_backward_dv_kernel``, grid ``(B Hkv, N chunks)``: each program owns its positions,
  loops over every packed row tile, accumulates ``dV' = P^T dO`` and, at span rows, writes
  ``d delta = (||v||/n) (g - (g.u_hat) u_hat)`` straight to the row ``span_index`` names
  (each row has exactly one owner). When all rows fit one tile (decode) it also
  accumulates the chunk's centred dQ partial, so K and V are read once for the whole
  backward; ``_merge_dq_kernel`` folds the chunks in order afterwards.
- ``_backward_dq_kernel``, grid ``(B Hkv, row tiles)`` (many rows: prefill): each
  program loops over the N tiles its rows can see and owns its dQ rows.

No atomics anywhere: every output element has one writer and every sum a fixed order,
so the same input gives the same bits. Block sizes, warps and split counts depend on the
shapes (and the SM count) only.

Rows that see no key: ``m`` stays -inf and ``l`` 0, the row outputs 0 and lse is -inf; the
backward's ``P = e^{s - lse}`` is then e^{-inf} = 0 (see ``_finite_or_zero``) (a finite score implies a
finite lse), so those rows get zero gradients without a special case.
"""

import triton
import triton.language as tl

from vreason_kernels.ops.triton_utils import NEG_INF
from vreason_kernels.ops.value_delta_attention.contract import EPS

# Kernels may read module globals only as tl.constexpr (a GPU compile rejects a plain float).
_INF = tl.constexpr(float("inf"))
_EPS = tl.constexpr(EPS)


# ----------------------------------------------------------------------------------------
# Device helpers
# ----------------------------------------------------------------------------------------


@triton.jit
def _values(v_ptr, dlt_ptr, idx_ptr, v_off, dlt_off, cols, col_ok, ds, d_ok, stride_vn, D):
    """fp32 ``(v, u = v + delta, in_span)`` for one ``[BLOCK_N, BLOCK_D]`` tile.

    Off the span (index -1) the gather is masked, so ``u = v`` there and no delta row is read.
    """
    mask = col_ok[:, None] & d_ok[None, :]
    v = tl.load(v_ptr + v_off + cols.to(tl.int64)[:, None] * stride_vn + ds[None, :], mask=mask, other=0.0)
    v = v.to(tl.float32)
    idx = tl.load(idx_ptr + cols, mask=col_ok, other=-1)
    in_span = idx >= 0
    rows = dlt_off + tl.maximum(idx, 0).to(tl.int64) * D
    delta = tl.load(dlt_ptr + rows[:, None] + ds[None, :], mask=mask & in_span[:, None], other=0.0)
    return v, v + delta.to(tl.float32), in_span


@triton.jit
def _norms(v, u):
    """``(||v||, n = max(||u||, eps))`` per row; sqrt is a plain instruction, not libdevice.

    The max is a ``where`` that keeps a NaN norm: ``tl.maximum`` returns eps for it, and
    a NaN delta then gave its row a gain of ||v|| / eps, huge finite values beside the NaN.
    """
    norm_u = _row_norm(u)
    return _row_norm(v), tl.where(norm_u < _EPS, _EPS, norm_u)


@triton.jit
def _row_norm(x):
    """``||x||`` per row. Where the plain sum of squares overflows although the entries are
    finite (rows past ~1.8e19), the row is divided by its largest ``|x_d|`` first: inf
    there made v' = u ||v|| / inf = 0. Other rows keep the plain value, bit for bit."""
    plain = tl.sqrt(tl.sum(x * x, axis=1))
    big = tl.max(tl.abs(x), axis=1)
    y = x * (1.0 / tl.where(big > 0, big, 1.0))[:, None]
    return tl.where(plain == _INF, big * tl.sqrt(tl.sum(y * y, axis=1)), plain)


@triton.jit
def _modulated(v, u, in_span):
    """v' = u ||v|| / n at span rows, v elsewhere (a v = 0 row stays 0: ||v|| = 0)."""
    norm_v, n = _norms(v, u)
    return tl.where(in_span[:, None], u * (norm_v / n)[:, None], v)


@triton.jit
def _value_tile(v_ptr, dlt_ptr, idx_ptr, v_off, dlt_off, cols, col_ok, ds, d_ok, stride_vn, D,
                HAS_DELTA: tl.constexpr):
    """fp32 ``V'`` for one ``[BLOCK_N, BLOCK_D]`` tile: the modulated values with a delta,
    the values themselves (and no delta row read) without one."""
    if HAS_DELTA:
        v, u, in_span = _values(v_ptr, dlt_ptr, idx_ptr, v_off, dlt_off, cols, col_ok, ds, d_ok, stride_vn, D)
        v_mod = _modulated(v, u, in_span)
    else:
        v_mod = _key_tile(v_ptr, v_off, cols, col_ok, ds, d_ok, stride_vn)
    return v_mod


@triton.jit
def _key_tile(k_ptr, k_off, cols, col_ok, ds, d_ok, stride_kn):
    mask = col_ok[:, None] & d_ok[None, :]
    return tl.load(k_ptr + k_off + cols.to(tl.int64)[:, None] * stride_kn + ds[None, :], mask=mask, other=0.0).to(
        tl.float32
    )


@triton.jit
def _scores(q, k, t, head, row_ok, cols, col_ok, bias_ptr, bias_off, stride_bh, stride_bt, stride_bn,
            scale, N, T, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """``scale q k^T + bias`` for a [rows x keys] tile, -inf wherever a row may not see a key.

    Causal is bottom-right aligned: row ``t`` sees key ``i`` iff ``i <= t + N - T``.
    """
    s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
    ok = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        offs = bias_off + head.to(tl.int64)[:, None] * stride_bh + t.to(tl.int64)[:, None] * stride_bt
        s += tl.load(bias_ptr + offs + cols.to(tl.int64)[None, :] * stride_bn, mask=ok, other=0.0)
    if CAUSAL:
        ok = ok & (cols[None, :] <= t[:, None] + (N - T))
    return tl.where(ok, s, NEG_INF)


@triton.jit
def _finite_or_zero(m):
    """The max to subtract before exp: 0 while a row has seen no key (m = -inf).

    Such a row's scores are all -inf, so e^{s - 0} = 0 and e^{m_old - 0} = 0 as they
    should be, and -inf - (-inf) = NaN is never formed. Otherwise m is finite and used.
    """
    return tl.where(m > NEG_INF, m, 0.0)


@triton.jit
def _rows(pid_bh, pid_m, Hkv, G, T, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Packed rows of one tile: (rows, row_ok, t, q-head, element offsets [rows, D] of q/o/dO, ds, d_ok)."""
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < G * T
    head = (pid_bh % Hkv) * G + rows // T
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    offs = (pid_bh.to(tl.int64) * G * T + rows)[:, None] * D + ds[None, :]
    return rows, row_ok, rows % T, head, offs, ds, d_ok


@triton.jit
def _kv_head(pid_bh, Hkv, S, D, stride_kb, stride_kh, stride_vb, stride_vh, stride_bb):
    """The prologue every kernel shares: the element offsets of program ``pid_bh``'s
    (batch, kv-head) in K and V, in delta (``[B Hkv, S, D]``, contiguous) and its batch
    row in the additive mask."""
    b = (pid_bh // Hkv).to(tl.int64)
    kv = (pid_bh % Hkv).to(tl.int64)
    return (b * stride_kb + kv * stride_kh, b * stride_vb + kv * stride_vh, pid_bh.to(tl.int64) * S * D,
            b * stride_bb)


@triton.jit
def _last_visible(t, row_ok, N, T, CAUSAL: tl.constexpr):
    """One past the last key any row of the tile sees."""
    if CAUSAL:
        return tl.minimum(tl.max(tl.where(row_ok, t, -1)) + N - T + 1, N)
    return N


# ----------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, dlt_ptr, idx_ptr, bias_ptr, out_ptr, lse_ptr, acc_ptr, ml_ptr,
    Hkv, G, T, N, D, S, chunk, scale,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bt, stride_bn,
    HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """Online softmax over keys ``[split chunk, ...)`` for one tile of packed rows.

    Per key tile, with ``m' = max(m, max_i s_i)`` and ``a = e^{m - m'}``:
    ``l <- a l + sum_i e^{s_i - m'}``, ``acc <- a acc + e^{s - m'} V'``. Masked keys have
    s = -inf and weight e^{-inf} = 0; see ``_finite_or_zero`` for rows that saw no key yet.
    """
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    split = tl.program_id(2)
    rows, row_ok, t, head, offs, ds, d_ok = _rows(pid_bh, pid_m, Hkv, G, T, D, BLOCK_M, BLOCK_D)
    q = tl.load(q_ptr + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    k_off, v_off, dlt_off, bias_off = _kv_head(pid_bh, Hkv, S, D, stride_kb, stride_kh, stride_vb, stride_vh,
                                               stride_bb)

    n_start = split * chunk
    n_end = tl.minimum(n_start + chunk, _last_visible(t, row_ok, N, T, CAUSAL))
    m = tl.full((BLOCK_M,), NEG_INF, dtype=tl.float32)
    m_old = m
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        k = _key_tile(k_ptr, k_off, cols, col_ok, ds, d_ok, stride_kn)
        s = _scores(q, k, t, head, row_ok, cols, col_ok, bias_ptr, bias_off, stride_bh, stride_bt, stride_bn,
                    scale, N, T, HAS_BIAS, CAUSAL, PRECISION)
        v = _value_tile(v_ptr, dlt_ptr, idx_ptr, v_off, dlt_off, cols, col_ok, ds, d_ok, stride_vn, D, HAS_DELTA)
        m = tl.maximum(m, tl.max(s, axis=1))
        m_ref = _finite_or_zero(m)
        alpha = tl.exp(m_old - m_ref)
        p = tl.exp(s - m_ref[:, None])
        l = alpha * l + tl.sum(p, axis=1)
        acc = alpha[:, None] * acc + tl.dot(p, v, input_precision=PRECISION)
        m_old = m

    mask = row_ok[:, None] & d_ok[None, :]
    if SPLIT:
        part = split.to(tl.int64) * tl.num_programs(0) * G * T * D  # this split's slab: [B Hkv, R, D] like the rows
        tl.store(acc_ptr + part + offs, acc, mask=mask)
        stat = 2 * ((split * tl.num_programs(0) + pid_bh).to(tl.int64) * G * T + rows)
        tl.store(ml_ptr + stat, m, mask=row_ok)
        tl.store(ml_ptr + stat + 1, l, mask=row_ok)
    else:
        _finish(out_ptr, lse_ptr, offs, pid_bh.to(tl.int64) * G * T + rows, mask, row_ok, acc, m, l)


@triton.jit
def _bf16_nearest(x):
    """fp32 ``x`` rounded to the nearest bfloat16 (ties to even), still as fp32.

    The GPU's fp32 -> bf16 cast rounds so, but the interpreter's truncates (it drops the
    low 16 bits: up to 1 ulp of error, not 1/2, which doubled the bf16 output error of the
    CPU tests); after this the cast is exact on both. NaN stays NaN, and a value past
    bf16's largest finite becomes inf, as the cast would make it.
    """
    bits = x.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(x != x, x, bits.to(tl.float32, bitcast=True))


@triton.jit
def _finish(out_ptr, lse_ptr, offs, lse_offs, mask, row_ok, acc, m, l):
    """out = acc / l and lse = m + log l; a row that saw no key (l = 0) gets 0 and -inf,
    one with a NaN l (NaN input, or scores past float32) NaN in both."""
    seen = l != 0
    out = acc / tl.where(seen, l, 1.0)[:, None]
    if out_ptr.dtype.element_ty == tl.bfloat16:
        out = _bf16_nearest(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + lse_offs, tl.where(seen, m + tl.log(tl.where(seen, l, 1.0)), NEG_INF), mask=row_ok)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, out_ptr, lse_ptr, Hkv, G, T, D, SPLITS,
                  BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the splits in order onto ``M = max_k m_k``: ``l = sum_k r_k l_k``,
    ``acc = sum_k r_k acc_k`` with ``r_k = e^{m_k - M}`` (0 for a split that saw no key)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows, row_ok, t, head, offs, ds, d_ok = _rows(pid_bh, pid_m, Hkv, G, T, D, BLOCK_M, BLOCK_D)
    mask = row_ok[:, None] & d_ok[None, :]
    num_bh = tl.num_programs(0)
    m_max = tl.full((BLOCK_M,), NEG_INF, dtype=tl.float32)
    for k in range(SPLITS):
        stat = 2 * ((k * num_bh + pid_bh).to(tl.int64) * G * T + rows)
        m_max = tl.maximum(m_max, tl.load(ml_ptr + stat, mask=row_ok, other=NEG_INF))
    l = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k in range(SPLITS):
        stat = 2 * ((k * num_bh + pid_bh).to(tl.int64) * G * T + rows)
        m_k = tl.load(ml_ptr + stat, mask=row_ok, other=NEG_INF)
        r = tl.exp(m_k - _finite_or_zero(m_max))
        l += r * tl.load(ml_ptr + stat + 1, mask=row_ok, other=0.0)
        acc += r[:, None] * tl.load(acc_ptr + k * num_bh.to(tl.int64) * G * T * D + offs, mask=mask, other=0.0)
    _finish(out_ptr, lse_ptr, offs, pid_bh.to(tl.int64) * G * T + rows, mask, row_ok, acc, m_max, l)


# ----------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------


@triton.jit
def _probs_tile(q_ptr, lse_ptr, bias_ptr, k, offs, lse_offs, mask, t, head, row_ok, cols, col_ok,
                bias_off, stride_bh, stride_bt, stride_bn, scale, N, T,
                HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """P = e^{s - lse} recomputed for one [rows x keys] tile (0 where s = -inf)."""
    q = tl.load(q_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    lse = tl.load(lse_ptr + lse_offs, mask=row_ok, other=0.0)
    s = _scores(q, k, t, head, row_ok, cols, col_ok, bias_ptr, bias_off, stride_bh, stride_bt, stride_bn,
                scale, N, T, HAS_BIAS, CAUSAL, PRECISION)
    return tl.exp(s - _finite_or_zero(lse)[:, None])


@triton.jit
def _mean_or_zero(total, mass):
    return tl.where(mass > 0, total / tl.where(mass > 0, mass, 1.0), 0.0)


@triton.jit
def _centred_dq_step(p, dp, k, dq, kbar, total, mass, PRECISION: tl.constexpr):
    """One key tile of ``dq = sum_j p_j (dp_j - mu) k_j`` (dQ / scale) with ``mu`` the
    p-weighted mean of dp over the keys so far: ``total / mass``, ``total = sum p dp``,
    ``mass = sum p``. When mu moves to mu', the tiles before shift by ``(mu - mu') kbar``,
    ``kbar = sum_j p_j k_j``, so every term stays centred (no cancellation between two
    large sums) and after the last key mu = D. A one-hot row has mu = dp there: dq = 0.
    """
    mu_old = _mean_or_zero(total, mass)
    total += tl.sum(p * dp, axis=1)
    mass += tl.sum(p, axis=1)
    mu = _mean_or_zero(total, mass)
    dq += (mu_old - mu)[:, None] * kbar
    dq = tl.dot(p * (dp - mu[:, None]), k, dq, input_precision=PRECISION)
    kbar = tl.dot(p, k, kbar, input_precision=PRECISION)
    return dq, kbar, total, mass


@triton.jit
def _backward_dv_kernel(
    q_ptr, k_ptr, v_ptr, dlt_ptr, idx_ptr, bias_ptr, do_ptr, lse_ptr, gdlt_ptr, dq_ptr, kbar_ptr, stat_ptr,
    Hkv, G, T, N, D, S, chunk, scale,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bt, stride_bn,
    HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr, FUSE_DQ: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """d delta for the span rows in keys ``[chunk start, chunk end)`` (and dQ partials if FUSE_DQ).

    Per key tile: ``g = dV' = sum over row tiles of P^T dO`` (all q-heads of the group,
    all queries), then at span rows ``d delta = (||v||/n) (g - (g.u_hat) u_hat)`` with
    ``u_hat = u/n``. With FUSE_DQ (every packed row in one tile) also the chunk's
    ``_centred_dq_step`` state: dq and kbar ``[rows, D]`` at ``[chunk]`` of dq_ptr and
    kbar_ptr, the mean mu and mass ``[rows, 2]`` at ``[chunk]`` of stat_ptr.
    """
    pid_bh = tl.program_id(0)
    pid_n = tl.program_id(1)
    ds = tl.arange(0, BLOCK_D)
    d_ok = ds < D
    k_off, v_off, dlt_off, bias_off = _kv_head(pid_bh, Hkv, S, D, stride_kb, stride_kh, stride_vb, stride_vh,
                                               stride_bb)
    n_start = pid_n * chunk
    n_end = tl.minimum(n_start + chunk, N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kbar = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mass = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(n_start, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        k = _key_tile(k_ptr, k_off, cols, col_ok, ds, d_ok, stride_kn)
        if HAS_DELTA:
            v, u, in_span = _values(v_ptr, dlt_ptr, idx_ptr, v_off, dlt_off, cols, col_ok, ds, d_ok, stride_vn, D)
            v_mod = _modulated(v, u, in_span)
        else:
            v_mod = _key_tile(v_ptr, v_off, cols, col_ok, ds, d_ok, stride_vn)
        grad_v = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
        for r0 in range(0, G * T, BLOCK_M):
            rows, row_ok, t, head, offs, _, _ = _rows(pid_bh, r0 // BLOCK_M, Hkv, G, T, D, BLOCK_M, BLOCK_D)
            # Causal: a row tile whose last query sees none of these keys contributes nothing.
            if _last_visible(t, row_ok, N, T, CAUSAL) > n0:
                mask = row_ok[:, None] & d_ok[None, :]
                lse_offs = pid_bh.to(tl.int64) * G * T + rows
                p = _probs_tile(q_ptr, lse_ptr, bias_ptr, k, offs, lse_offs, mask, t, head, row_ok, cols, col_ok,
                                bias_off, stride_bh, stride_bt, stride_bn, scale, N, T, HAS_BIAS, CAUSAL, PRECISION)
                do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                grad_v = tl.dot(tl.trans(p), do, grad_v, input_precision=PRECISION)
                if FUSE_DQ:
                    dp = tl.dot(do, tl.trans(v_mod), input_precision=PRECISION)
                    dq, kbar, total, mass = _centred_dq_step(p, dp, k, dq, kbar, total, mass, PRECISION)
        if HAS_DELTA:
            norm_v, n = _norms(v, u)
            u_hat = u / n[:, None]
            radial = tl.sum(grad_v * u_hat, axis=1)
            grad_delta = (norm_v / n)[:, None] * (grad_v - radial[:, None] * u_hat)
            idx = tl.load(idx_ptr + cols, mask=col_ok, other=-1)
            dst = gdlt_ptr + dlt_off + tl.maximum(idx, 0).to(tl.int64)[:, None] * D + ds[None, :]
            tl.store(dst, grad_delta, mask=in_span[:, None] & d_ok[None, :])
    if FUSE_DQ:
        rows, row_ok, t, head, offs, _, _ = _rows(pid_bh, 0, Hkv, G, T, D, BLOCK_M, BLOCK_D)
        part = pid_n.to(tl.int64) * tl.num_programs(0) * G * T * D
        tl.store(dq_ptr + part + offs, dq, mask=row_ok[:, None] & d_ok[None, :])
        tl.store(kbar_ptr + part + offs, kbar, mask=row_ok[:, None] & d_ok[None, :])
        stat = 2 * ((pid_n * tl.num_programs(0) + pid_bh).to(tl.int64) * G * T + rows)
        tl.store(stat_ptr + stat, _mean_or_zero(total, mass), mask=row_ok)
        tl.store(stat_ptr + stat + 1, mass, mask=row_ok)


@triton.jit
def _merge_dq_kernel(dq_ptr, kbar_ptr, stat_ptr, grad_ptr, Hkv, G, T, D, CHUNKS, scale,
                     BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Fold the chunks' ``_centred_dq_step`` states in order, re-centred on the row term
    ``D = sum_c mass_c mu_c / sum_c mass_c``: ``dQ = scale sum_c (dq_c + (mu_c - D) kbar_c)``."""
    pid_bh = tl.program_id(0)
    rows, row_ok, t, head, offs, ds, d_ok = _rows(pid_bh, tl.program_id(1), Hkv, G, T, D, BLOCK_M, BLOCK_D)
    mask = row_ok[:, None] & d_ok[None, :]
    num_bh = tl.num_programs(0)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mass = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for c in range(CHUNKS):
        stat = 2 * ((c * num_bh + pid_bh).to(tl.int64) * G * T + rows)
        mass_c = tl.load(stat_ptr + stat + 1, mask=row_ok, other=0.0)
        mass += mass_c
        total += mass_c * tl.load(stat_ptr + stat, mask=row_ok, other=0.0)
    row_term = _mean_or_zero(total, mass)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for c in range(CHUNKS):
        stat = 2 * ((c * num_bh + pid_bh).to(tl.int64) * G * T + rows)
        shift = tl.load(stat_ptr + stat, mask=row_ok, other=0.0) - row_term
        part = c * num_bh.to(tl.int64) * G * T * D
        dq += tl.load(dq_ptr + part + offs, mask=mask, other=0.0)
        dq += shift[:, None] * tl.load(kbar_ptr + part + offs, mask=mask, other=0.0)
    tl.store(grad_ptr + offs, dq * scale, mask=mask)


@triton.jit
def _backward_dq_kernel(
    q_ptr, k_ptr, v_ptr, dlt_ptr, idx_ptr, bias_ptr, do_ptr, lse_ptr, dq_ptr,
    Hkv, G, T, N, D, S, scale,
    stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    stride_bb, stride_bh, stride_bt, stride_bn,
    HAS_DELTA: tl.constexpr, HAS_BIAS: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PRECISION: tl.constexpr,
):
    """``dQ = scale sum_keys (P * (dO V'^T - D)) K`` for one tile of packed rows (FA2's dQ,
    with D found on the way: ``_centred_dq_step``)."""
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows, row_ok, t, head, offs, ds, d_ok = _rows(pid_bh, pid_m, Hkv, G, T, D, BLOCK_M, BLOCK_D)
    mask = row_ok[:, None] & d_ok[None, :]
    lse_offs = pid_bh.to(tl.int64) * G * T + rows
    k_off, v_off, dlt_off, bias_off = _kv_head(pid_bh, Hkv, S, D, stride_kb, stride_kh, stride_vb, stride_vh,
                                               stride_bb)
    do = tl.load(do_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    n_end = _last_visible(t, row_ok, N, T, CAUSAL)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    kbar = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    mass = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, n_end, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_end
        k = _key_tile(k_ptr, k_off, cols, col_ok, ds, d_ok, stride_kn)
        v = _value_tile(v_ptr, dlt_ptr, idx_ptr, v_off, dlt_off, cols, col_ok, ds, d_ok, stride_vn, D, HAS_DELTA)
        p = _probs_tile(q_ptr, lse_ptr, bias_ptr, k, offs, lse_offs, mask, t, head, row_ok, cols, col_ok,
                        bias_off, stride_bh, stride_bt, stride_bn, scale, N, T, HAS_BIAS, CAUSAL, PRECISION)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        dq, kbar, total, mass = _centred_dq_step(p, dp, k, dq, kbar, total, mass, PRECISION)
    tl.store(dq_ptr + offs, dq * scale, mask=mask)
