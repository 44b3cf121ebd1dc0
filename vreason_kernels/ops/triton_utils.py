"""Triton helpers every op's kernels share (as flash-linear-attention's ``fla/ops/utils``).

- ``NEG_INF``: the -inf the kernels mask with;
- ``precision``: the ``tl.dot`` input precision for an input dtype;
- ``split_plan``: how a long axis (vocabulary, keys, a GEMM's K) is cut into splits;
- ``autotune_configs`` / ``tuned``: the configs an autotuned kernel may try;
- ``rescale`` and ``online_softmax_tile``: one tile of the online softmax, kept relative
  to its running max (docs/design.md §2.1).

Importing this module imports triton: only the Triton backends import it.
"""

import torch
import triton
import triton.language as tl

from vreason_kernels.backend import triton_interpreted

# Kernels may read module globals only as tl.constexpr (a GPU compile rejects a plain float).
NEG_INF = tl.constexpr(float("-inf"))


def precision(dtype: torch.dtype) -> str:
    """``tl.dot``'s ``input_precision``: tf32 holds bf16/fp16 values exactly; fp32 inputs
    need full-precision products."""
    return "ieee" if dtype == torch.float32 else "tf32"


def split_plan(length: int, tile: int, programs: int, sm_count, *, interpreter_programs: int, min_tiles: int = 1,
               num_splits=None) -> tuple:
    """``(elements per split, splits)`` of an axis of ``length`` cut into whole ``tile``s.

    Enough splits that the grid, whose other axes already hold ``programs`` programs,
    fills the GPU twice over (``interpreter_programs`` stand in for that when ``sm_count``
    is None, under the interpreter), each split at least ``min_tiles`` tiles long; the
    splits left empty by the rounding are dropped, so every split is non-empty.
    ``num_splits`` overrides the count (tests of a merge). A function of the shapes and
    the SM count only, never of timing, so the same input always gives the same bits.
    """
    if num_splits is None:
        target = interpreter_programs if sm_count is None else 2 * sm_count
        num_splits = max(1, min(triton.cdiv(target, programs), triton.cdiv(length, min_tiles * tile)))
    chunk = triton.cdiv(triton.cdiv(length, num_splits), tile) * tile
    return chunk, triton.cdiv(length, chunk)


def autotune_configs() -> list:
    """Every config an autotuned kernel may try; exactly one under the interpreter.

    8 warps: with 4, ptxas spilled registers at each of linear_entropy's tiles (fp32
    partials and dW tiles 1.1 and 6.2 KB per thread, the 16 x 16 x 256 tile of 16 rows up
    to 208 B, bf16 dW 16 B; benchmarks/results/triton_resources.md). The autotuner only
    chooses the pipelining depth, which changes the schedule but not the arithmetic, so
    its timing-based pick cannot change the bits. 4 stages overflowed A100 shared memory
    at fp32; 3 stages of the matmul's largest tiles (128 x 64 + 64 x 128 at 2 bytes, or
    128 x 32 + 32 x 128 at 4) take 96 KB, within A100's 163 KB.
    """
    if triton_interpreted():
        return [triton.Config({}, num_warps=4, num_stages=1)]
    return [triton.Config({}, num_warps=8, num_stages=s) for s in (2, 3)]


def tuned(*, key):
    """Autotune over ``autotune_configs`` on CUDA (keyed by ``key``); one config under the interpreter."""
    return triton.autotune(configs=autotune_configs(), key=[] if triton_interpreted() else key)


@triton.jit
def rescale(m_old, m_new):
    """Factors that move sums kept relative to ``m_old`` onto ``m_new >= m_old``.

    Returns ``r = e^{m_old - m_new}`` and ``delta = m_old - m_new``. A max of -inf means
    "nothing seen yet": its sums are 0, and r = delta = 0 keeps -inf - (-inf) = NaN and
    0 * inf out of them (both operands are zeroed before the subtraction, so not even a
    discarded branch makes a NaN).
    """
    seen = m_old > NEG_INF
    delta = tl.where(seen, m_old, 0.0) - tl.where(seen, m_new, 0.0)
    return tl.where(seen, tl.exp(delta), 0.0), delta


@triton.jit
def online_softmax_tile(m, z):
    """One tile of the online sums kept relative to the running max ``m``: ``z [rows, cols]``
    with ``m [rows]``, or one row's ``z [cols]`` with ``m [1]``.

    Returns ``(m', r, delta, e, ez)``: ``m' = max(m, max_j z_j)``, ``r, delta`` from
    ``rescale(m, m')``, ``e = e^{z - m'}`` and ``ez = e (z - m')``, so that the caller
    updates ``t <- r (t + delta s) + sum ez`` and ``s <- r s + sum e`` (and, in
    linear_entropy's one-pass kernels, A and B). Masked entries (z = -inf) get weight
    exactly 0 via ``where`` rather than e^{-inf} * (-inf) = NaN; a NaN logit stays live,
    so that it makes the row's H NaN.
    """
    m_new = tl.maximum(m, tl.max(z, axis=len(z.shape) - 1))
    r, delta = rescale(m, m_new)
    live = z != NEG_INF
    m_live = tl.where(m_new > NEG_INF, m_new, 0.0)  # equals m' wherever an entry is live
    if len(z.shape) == 2:
        m_live = m_live[:, None]
    zc = tl.where(live, z - m_live, 0.0)  # z - m', with masked entries pinned to 0
    e = tl.where(live, tl.exp(zc), 0.0)
    return m_new, r, delta, e, e * zc
