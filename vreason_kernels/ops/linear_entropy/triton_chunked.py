"""``linear_entropy`` over many rows: statistics first, then the gradients as two plain products.

Notation as ``triton_one_pass`` (docs/design.md §2.1). With the row statistics known (max M,
``log S``, ``mu``), the gradients need no online rescale::

    G[r, j] = dH_r/dlogit_rj = -p_rj (z_rj - mu_r) / tau,     p_rj = e^{z_rj - M_r - log S_r}
    dH/dh = G W            dW = (g G)^T h            db = sum_r g_r G[r, :]

(``g`` the entropy's incoming gradient). So, for one chunk of rows at a time:

1. ``logits = h W^T + b`` into an fp32 scratch ``[C, V]`` (``triton_matmul``; W read once);
2. ``_logit_stats_kernel``, grid ``(row blocks, vocabulary splits)``: each split's online
   (m, s, t), folded by ``triton_splits._merge_kernel`` into H, M, log S and mu;
3. ``_logit_grad_kernel``, same grid: G written over the logits;
4. ``dH/dh = G W`` (W read again), or ``dW += (g G)^T h`` and ``db += sum_r g_r G``.

The label log-probability's backward (``ops/linear_logprob_entropy``, docs/design.md §2.4)
takes step 3 with a label and its gradient ``g_L`` per row: G then also holds
``g_L ([j == y] - p_j) / tau``, so its one-hot term reaches dh, dW and db through the same
products (no scatter into dW), and either term is left out when its output got no gradient.

Why: the one-pass kernel (``_forward_partials_kernel``) must carry A and B, ``[rows, D]``
fp32 each, through the vocabulary with an online rescale. One row fits on chip (the T=1
kernel, ``triton_decode``); 16 rows at D = 3584 are 459 KB, more than an SM holds, so it
read-modify-writes them in a global slab per vocabulary tile: 8 bytes per byte of bf16 W
at T=16 and 256 at T=4096, out of L2 (9x and 8x the floor in
benchmarks/results/triton_resources.md). This path reads W twice, so it sits at 2x the
floor at T=16 (W's read is the time there), and at T=4096, where the two GEMMs'
arithmetic is the time, the second read is the ``G W`` product any implementation does.
The weight gradient used to recompute the logits once per D tile (up to 65x the GEMM's
arithmetic at D = 8192); here it computes them once.

Precision: the logits are fp32 sums of exact products (bf16/fp16 inputs go to ``tl.dot``
as they are, fp32 ones at ``ieee``). G stays fp32, and ``G W`` upcasts W and multiplies at
tf32 (ieee for fp32 inputs): as the one-pass kernel's ``e @ W``. Rounding G to bf16 would
double that product's tensor-core rate at T=4096; it is left as a choice to measure on a
GPU.

Scratch: the chunk's fp32 logits, at most ``SCRATCH_BYTES`` (768 rows of a 152k
vocabulary), so the scratch does not grow with T; T=16 is one chunk of 9.7 MB.
Determinism: every program owns its outputs, and chunks, splits and split-K partials are
summed in index order.
"""

import torch
import triton
import triton.language as tl

from vreason_kernels._alloc import new_output
from vreason_kernels.backend import sm_count_or_none, triton_interpreted
from vreason_kernels.ops.linear_entropy.triton_matmul import matmul
from vreason_kernels.ops.linear_entropy.triton_splits import merge_splits, split_rows
from vreason_kernels.ops.triton_utils import NEG_INF, online_softmax_tile, precision, split_plan

_NAN = tl.constexpr(float("nan"))

SCRATCH_BYTES = 512 * 2**20


@triton.jit
def _logit_stats_kernel(x_ptr, m_ptr, s_ptr, t_ptr, R, V, tau, chunk,
                        BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """``s = sum e^{z_j - m}``, ``t = sum e^{z_j - m} (z_j - m)`` over one vocabulary split of stored logits.

    Written at ``[split, row]``, the layout ``_merge_kernel`` folds.
    """
    rows, row_ok, split, v_start, v_end = split_rows(R, V, chunk, BLOCK_R)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * V
    m = tl.full((BLOCK_R,), NEG_INF, dtype=tl.float32)
    s = tl.zeros((BLOCK_R,), dtype=tl.float32)
    t = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        z = tl.load(x_rows + cols[None, :], mask=row_ok[:, None] & (cols < v_end)[None, :], other=NEG_INF) / tau
        m, r, delta, e, ez = online_softmax_tile(m, z)
        t = r * (t + delta * s) + tl.sum(ez, axis=1)
        s = r * s + tl.sum(e, axis=1)
    tl.store(m_ptr + split * R + rows, m, mask=row_ok)
    tl.store(s_ptr + split * R + rows, s, mask=row_ok)
    tl.store(t_ptr + split * R + rows, t, mask=row_ok)


@triton.jit
def _logit_grad_kernel(x_ptr, row_max_ptr, log_sum_ptr, mean_ptr, g_ptr, label_ptr, g_label_ptr, R, V, tau, chunk,
                       HAS_ENTROPY: tl.constexpr, WEIGHTED: tl.constexpr, HAS_LABEL: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_V: tl.constexpr):
    """Overwrite one vocabulary split of stored logits with ``G = -w_r p (z - mu) / tau``.

    ``w_r = g_r`` (WEIGHTED: the weight gradient's rows) or 1 (the forward's dH/dh); no
    such term without HAS_ENTROPY. HAS_LABEL adds ``g_L,r ([j == y_r] - p_j) / tau`` with
    the row's label ``y_r`` (a vocabulary index of these logits; none matches outside
    ``[0, V)``) and ``g_L,r`` from ``g_label_ptr``.
    Computed relative to the row max, ``p = e^{d - log S}`` and ``z - mu = d - c`` with
    ``d = z - M`` and ``c = mu - M`` (``mean_ptr``): the absolute lse and mu, rounded to
    fp32, would each add ulp(M) to every entry (2-3x plain PyTorch's error for logits near
    1000). Masked entries get exactly 0 by ``where``, never a product with p = 0 (c is NaN
    on all-masked rows).

    The centre matters: ``sum_j G_j = 0``, so a column of W that is the same in every row
    (a common offset of the logits) must cancel in ``G W``, and an error of one ulp(log S)
    in c comes back multiplied by that offset. The forward passes ``c = T/S`` from the same
    sums as H (``log S - H`` put its dH/dh at up to 4x plain PyTorch's error at an offset of
    1000); the weight gradient, which has no such cancellation, ``log S - H`` from the
    statistics it is given (a vocabulary slice's must be those of the whole row).

    A row whose logits are all -inf has no distribution. Its weight-gradient rows add
    nothing; in the forward its G is NaN, so that dH/dh = G W is 0/0 like its entropy, as
    the one-pass kernels give.
    """
    rows, row_ok, split, v_start, v_end = split_rows(R, V, chunk, BLOCK_R)
    row_max = tl.load(row_max_ptr + rows, mask=row_ok, other=0.0)
    log_sum = tl.load(log_sum_ptr + rows, mask=row_ok, other=0.0)
    if HAS_ENTROPY:
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)  # mu - M
        scale = (tl.load(g_ptr + rows, mask=row_ok, other=0.0) if WEIGHTED
                 else tl.full((BLOCK_R,), 1.0, tl.float32)) / tau
    if HAS_LABEL:
        label = tl.load(label_ptr + rows, mask=row_ok, other=-1)
        g_label = tl.load(g_label_ptr + rows, mask=row_ok, other=0.0) / tau
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * V
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_ok[:, None] & (cols < v_end)[None, :]
        z = tl.load(x_rows + cols[None, :], mask=mask, other=NEG_INF) / tau
        live = z > NEG_INF
        d = tl.where(live, z - row_max[:, None], 0.0)
        p = tl.where(live, tl.exp(d - log_sum[:, None]), 0.0)
        if HAS_ENTROPY:
            grad = tl.where(live, -p * (d - mean[:, None]) * scale[:, None], 0.0)
        else:
            grad = tl.zeros((BLOCK_R, BLOCK_V), dtype=tl.float32)
        if HAS_LABEL:
            grad -= p * g_label[:, None]
            grad += tl.where(cols[None, :] == label[:, None], g_label[:, None], 0.0)
        if HAS_ENTROPY and not WEIGHTED:
            grad = tl.where((row_max == NEG_INF)[:, None], _NAN, grad)
        tl.store(x_rows + cols[None, :], grad, mask=mask)


def _rows_blocks() -> dict:
    """One row per program on a GPU (2048-wide loads); under the interpreter, whose cost
    is per program and loop step, 8 rows and 256 columns (still 2 tiles of V ~ 300)."""
    return dict(BLOCK_R=8, BLOCK_V=256) if triton_interpreted() else dict(BLOCK_R=1, BLOCK_V=2048)


def chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: the fp32 logits within the scratch budget, in whole 128-row GEMM
    tiles where the budget allows."""
    fit = max(1, SCRATCH_BYTES // (4 * vocab))
    return min(rows, fit // 128 * 128 if fit >= 128 else fit)


def _row_launch(scratch: torch.Tensor) -> tuple:
    """(grid, vocabulary rows per split, blocks) of the two row kernels over ``scratch [C, V]``."""
    rows, vocab = scratch.shape
    blocks = _rows_blocks()
    chunk, splits = split_plan(vocab, blocks["BLOCK_V"], triton.cdiv(rows, blocks["BLOCK_R"]),
                               sm_count_or_none(scratch.device), interpreter_programs=4)
    return (triton.cdiv(rows, blocks["BLOCK_R"]), splits), chunk, blocks


def _logits(hidden, weight, bias, out):
    """``out = hidden W^T + b`` in fp32 (``out [C, V]``)."""
    return matmul(hidden, weight.t(), out, bias=bias, precision=precision(hidden.dtype))


def _stats(scratch, temperature, entropy, row_max, log_sum, mean):
    """H, M, log S and ``mu - M`` of each row of stored logits (the splits' partials, merged in order)."""
    grid, chunk, blocks = _row_launch(scratch)
    rows, vocab = scratch.shape
    stats = torch.empty((3, grid[1], rows), dtype=torch.float32, device=scratch.device)
    _logit_stats_kernel[grid](
        x_ptr=scratch, m_ptr=stats[0], s_ptr=stats[1], t_ptr=stats[2],
        R=rows, V=vocab, tau=float(temperature), chunk=chunk, num_warps=4, **blocks,
    )
    merge_splits(stats, temperature, entropy, row_max, log_sum, mean=mean)


def _logit_grad(scratch, temperature, row_max, log_sum, mean, weights=None, *, entropy=True, labels=None,
                label_weights=None):
    """G over the stored logits; ``weights``: the rows' g (the weight gradient), else 1;
    ``entropy=False`` leaves that term out. ``labels`` with ``label_weights``: the label
    term of each row (see the kernel)."""
    grid, chunk, blocks = _row_launch(scratch)
    rows, vocab = scratch.shape
    _logit_grad_kernel[grid](
        x_ptr=scratch, row_max_ptr=row_max, log_sum_ptr=log_sum, mean_ptr=mean if entropy else None,
        g_ptr=weights if entropy else None, label_ptr=labels, g_label_ptr=label_weights,
        R=rows, V=vocab, tau=float(temperature), chunk=chunk, HAS_ENTROPY=entropy,
        WEIGHTED=entropy and weights is not None, HAS_LABEL=labels is not None, num_warps=4, **blocks,
    )


def _chunks(hidden, vocab):
    """(start, end, fp32 scratch [end - start, V]) per chunk of rows, one allocation for all."""
    rows = hidden.shape[0]
    size = chunk_rows(rows, vocab)
    scratch = torch.empty((size, vocab), dtype=torch.float32, device=hidden.device)
    for start in range(0, rows, size):
        end = min(start + size, rows)
        yield start, end, scratch[: end - start]


def forward(hidden, weight, bias, temperature: float, return_logits: bool):
    """``triton_backend.forward``'s outputs with the gradient, for ``rows >= 1``."""
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    entropy, row_max, log_sum = (new_output((rows,), **f32) for _ in range(3))
    dh = new_output((rows, dim), **f32)
    logits = new_output((rows, vocab) if return_logits else (0,), dtype=hidden.dtype, device=hidden.device)
    mean = torch.empty(rows, **f32)  # mu - M
    for start, end, scratch in _chunks(hidden, vocab):
        part = slice(start, end)
        _logits(hidden[part], weight, bias, scratch)
        if return_logits:
            logits[part].copy_(scratch)
        _stats(scratch, temperature, entropy[part], row_max[part], log_sum[part], mean[part])
        _logit_grad(scratch, temperature, row_max[part], log_sum[part], mean[part])
        matmul(scratch, weight, dh[part], precision=precision(hidden.dtype), split_k=True)
    return entropy, dh, row_max, log_sum, logits


def statistics(hidden, weight, bias, temperature: float, columns):
    """``(entropy, row_max, log_sum, mean, z_column)`` ``[R]`` fp32 from the chunks' stored logits,
    with ``z_column`` each row's logit at ``columns [R]`` (int64 in ``[0, V)``: the label's
    column). For ``rows >= 1``.

    The label log-probability's forward takes its statistics here rather than from the
    one-pass kernel: ``grads`` recomputes these very logits (same chunks, same products,
    same bits), so its ``p`` sums to 1 up to rounding. Statistics from another kernel's
    logits, apart by an ulp of logits near 1000, left ``sum_j dL/dz_j`` at ~1e-4 and, through
    a column of W shared by every word, dh 100x off. ``z_column`` comes from the same stored
    logits, so ``z_y - M <= 0`` exactly.
    """
    rows = hidden.shape[0]
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    entropy, row_max, log_sum, mean, z_column = (new_output((rows,), **f32) for _ in range(5))
    for start, end, scratch in _chunks(hidden, vocab):
        part = slice(start, end)
        _logits(hidden[part], weight, bias, scratch)
        _stats(scratch, temperature, entropy[part], row_max[part], log_sum[part], mean[part])
        # The division the kernels make.
        torch.div(scratch.gather(1, columns[part, None])[:, 0], temperature, out=z_column[part])
    return entropy, row_max, log_sum, mean, z_column


def weight_grad(hidden, weight, bias, temperature: float, row_max, log_sum, entropy, grad_entropy, need_bias: bool):
    """``triton_backend.weight_grad``: the logits once per chunk, then ``dW += (g G)^T h``.

    The row statistics are the caller's, not taken again from these logits: a slice of a
    vocabulary-parallel head (``vreason_kernels.distributed``) holds only its own columns,
    and its G needs the statistics of the whole row.
    """
    _, grad_weight, grad_bias = grads(hidden, weight, bias, temperature, row_max, log_sum, log_sum - entropy,
                                      grad_entropy, None, None, need_hidden=False, need_weight=True,
                                      need_bias=need_bias)
    return grad_weight, grad_bias


def grads(hidden, weight, bias, temperature: float, row_max, log_sum, mean, grad_entropy, labels, grad_label, *,
          need_hidden: bool, need_weight: bool, need_bias: bool):
    """``(dh [R, D] | [0], dW [V, D] | [0], db [V] | [0])``, fp32, from one G per chunk of rows.

    ``grad_entropy`` and ``grad_label`` (``[R]`` or None: that term is left out) weight
    the entropy's and the label log-probability's terms; ``labels [R]`` int64 are indices
    into ``weight``'s rows (none outside ``[0, V)``). ``mean`` is ``mu - M``. For ``rows >= 1``.
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    grad_hidden = new_output((rows, dim) if need_hidden else (0,), **f32)
    grad_weight = new_output((vocab, dim) if need_weight else (0,), **f32)
    grad_bias = new_output((vocab,) if need_bias else (0,), **f32)
    for start, end, scratch in _chunks(hidden, vocab):
        part = slice(start, end)
        _logits(hidden[part], weight, bias, scratch)
        _logit_grad(scratch, temperature, row_max[part], log_sum[part], mean[part],
                    None if grad_entropy is None else grad_entropy[part], entropy=grad_entropy is not None,
                    labels=None if grad_label is None else labels[part],
                    label_weights=None if grad_label is None else grad_label[part])
        if need_hidden:
            matmul(scratch, weight, grad_hidden[part], precision=precision(hidden.dtype), split_k=True)
        if need_weight:
            matmul(scratch.t(), hidden[part], grad_weight, precision=precision(hidden.dtype), accumulate=start > 0)
        if need_bias:
            if start == 0:
                torch.sum(scratch, dim=0, out=grad_bias)
            else:
                grad_bias += scratch.sum(dim=0)
    return grad_hidden, grad_weight, grad_bias
