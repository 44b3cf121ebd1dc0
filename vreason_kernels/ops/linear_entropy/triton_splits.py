"""What ``linear_entropy``'s Triton kernels over vocabulary splits share: their prologue
and the fixed-order merge of the splits.

Both Triton paths that cut the vocabulary into splits end in ``_merge_kernel``: the
one-pass partials (``triton_one_pass``, ``triton_decode``: (m, s, t) and A, B) and the
statistics-first path's ``_logit_stats_kernel`` ((m, s, t) only). The same fold in
PyTorch, for partials gathered from other processes, is ``partials.merge_partials``.
"""

import torch
import triton
import triton.language as tl

from vreason_kernels.backend import triton_interpreted
from vreason_kernels.ops.triton_utils import NEG_INF, rescale


@triton.jit
def split_rows(R, V, chunk, BLOCK_R: tl.constexpr):
    """The prologue of a program of grid ``(row blocks, vocabulary splits)``: its rows
    ``[BLOCK_R]``, which of them exist, its split and the split's vocabulary range
    ``[v_start, v_end)``."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(1)
    v_start = split * chunk
    return rows, rows < R, split, v_start, tl.minimum(v_start + chunk, V)


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
    NEED_GRAD: A and B are read and dH/dh written; without it those pointers are None.
    """
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < R

    m_max = tl.full((BLOCK_R,), NEG_INF, dtype=tl.float32)
    for k in range(SPLITS):
        m_max = tl.maximum(m_max, tl.load(m_ptr + k * R + rows, mask=row_ok, other=NEG_INF))
    total_s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    total_t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for k in range(SPLITS):
        r, delta = rescale(tl.load(m_ptr + k * R + rows, mask=row_ok, other=NEG_INF), m_max)
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
            r, delta = rescale(tl.load(m_ptr + k * R + rows, mask=row_ok, other=NEG_INF), m_max)
            a_k = tl.load(a_k_ptr, mask=mask, other=0.0)
            b += r[:, None] * (tl.load(b_k_ptr, mask=mask, other=0.0) + delta[:, None] * a_k)
            a += r[:, None] * a_k
            # Step pointers split by split: k * R * D itself could overflow int32.
            a_k_ptr += R * D
            b_k_ptr += R * D
        dh = -(b - mean[:, None] * a) / (total_s * tau)[:, None]
        tl.store(dh_ptr + rows_d, dh, mask=mask)


def _merge_blocks() -> dict:
    return dict(BLOCK_R=16, BLOCK_D=32) if triton_interpreted() else dict(BLOCK_R=16, BLOCK_D=128)


def merge_splits(stats: torch.Tensor, temperature: float, entropy, row_max, log_sum, *, moments=None, dh=None,
                 mean=None) -> None:
    """Fold ``stats [3, splits, R]`` ((m, s, t) per split) into ``entropy``, ``row_max`` and
    ``log_sum [R]``; with ``moments [2, splits, R, D]`` (A, B) also ``dh [R, D]``, and with
    ``mean`` also ``mu - M [R]``."""
    rows = stats.shape[2]
    need_grad = moments is not None
    dim = moments.shape[3] if need_grad else 0
    blocks = _merge_blocks()
    grid = (triton.cdiv(rows, blocks["BLOCK_R"]), triton.cdiv(dim, blocks["BLOCK_D"]) if need_grad else 1)
    _merge_kernel[grid](
        m_ptr=stats[0], s_ptr=stats[1], t_ptr=stats[2],
        a_ptr=moments[0] if need_grad else None, bb_ptr=moments[1] if need_grad else None,
        entropy_ptr=entropy, row_max_ptr=row_max, log_sum_ptr=log_sum, mean_ptr=mean, dh_ptr=dh,
        R=rows, D=dim, SPLITS=stats.shape[1], tau=float(temperature),
        NEED_GRAD=need_grad, STORE_MEAN=mean is not None, **blocks,
    )
