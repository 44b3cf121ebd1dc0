"""The Triton backend of ``linear_entropy``, behind the backend contract of naive.py: which
kernel path each call takes.

- one row with the gradient (V-Reason's update step): ``triton_decode``'s kernel, W
  streamed once with h, A and B in registers, then the merge of the splits;
- the entropy alone, at any row count: ``triton_one_pass``'s partials kernel and the
  merge, one read of W;
- the gradient of more rows: ``triton_chunked``, statistics first and then ``dH/dh = G W``
  as a plain product (its docstring says why). ``weight_grad`` always goes there.

The merge (``triton_splits``) folds the vocabulary splits in a fixed order (split 0, 1,
...): no atomics, so the same input gives the same bits on every run.
"""

import torch
import triton

from vreason_kernels._alloc import new_output
from vreason_kernels.backend import sm_count_or_none
from vreason_kernels.ops.linear_entropy import triton_chunked, triton_decode, triton_one_pass
from vreason_kernels.ops.linear_entropy.partials import Partials, merge_partials
from vreason_kernels.ops.linear_entropy.triton_splits import merge_splits
from vreason_kernels.ops.triton_utils import split_plan

# Vocabulary splits under the interpreter (no SM count to fill): a few, so that test
# shapes exercise the merge.
_INTERPRETER_PROGRAMS = 4


def vocab_split_plan(rows: int, vocab: int, block_r: int, block_v: int, sm_count, num_splits=None) -> tuple:
    """(vocabulary rows per split, splits) of the partials kernels' grid ``(row blocks, splits)``."""
    return split_plan(vocab, block_v, triton.cdiv(rows, block_r), sm_count,
                      interpreter_programs=_INTERPRETER_PROGRAMS, num_splits=num_splits)


def forward_partials(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool,
                     num_splits=None):
    """Each vocabulary split's partial sums, unmerged: ``(stats, moments, logits)``.

    ``stats [3, splits, R]`` holds (m, s, t) and ``moments [2, splits, R, D]`` holds (A, B)
    (None without a gradient). ``logits [R, V] | [0]``. For ``rows >= 1``. ``num_splits``
    overrides the split count (tests of the merge).
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    f32 = dict(dtype=torch.float32, device=device)
    logits = new_output((rows, vocab) if return_logits else (0,), dtype=hidden.dtype, device=device)
    decode = triton_decode.decode_kernel_applies(rows, dim)
    blocks = triton_decode.decode_blocks(dim) if decode else triton_one_pass.forward_blocks(rows, hidden.dtype)
    block_r = 1 if decode else blocks["BLOCK_R"]  # the T=1 kernel: its one row in every program
    chunk, splits = vocab_split_plan(rows, vocab, block_r, blocks["BLOCK_V"], sm_count_or_none(device), num_splits)
    stats = torch.empty((3, splits, rows), **f32)  # fully written by the partials kernel
    moments = torch.empty((2, splits, rows, dim), **f32) if need_grad else None
    launch = triton_decode.launch_partials if decode else triton_one_pass.launch_partials
    launch(hidden, weight, bias, logits if return_logits else None, stats, moments, temperature, chunk, blocks)
    return stats, moments, logits


def slice_partials(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    """``(Partials, logits [R, V_slice] | [0])`` of the vocabulary rows in ``weight``: the
    partials kernels (W read once), their splits folded (``partials.merge_partials``)."""
    stats, moments, logits = forward_partials(hidden, weight, bias, temperature, need_grad, return_logits)
    return merge_partials(Partials(*stats, *(moments if need_grad else (None, None)))), logits


def forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    """(entropy f32 [R], dH/dh f32 [R, D] | [0], row_max f32 [R], log_sum f32 [R], logits [R, V] | [0]).

    One pass over W (``one_pass_forward``) where the gradient's A/B fit on chip or are not
    wanted: the T=1 kernel, and the entropy alone. The gradient of more rows takes the
    statistics-first path (``triton_chunked``), whose module docstring says why.
    """
    rows, dim = hidden.shape
    if rows > 0 and need_grad and not triton_decode.decode_kernel_applies(rows, dim):
        return triton_chunked.forward(hidden, weight, bias, temperature, return_logits)
    return one_pass_forward(hidden, weight, bias, temperature, need_grad, return_logits)


def one_pass_forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool,
                     num_splits=None):
    """``forward`` from the partials kernels and the merge, at any row count.

    ``num_splits`` overrides the vocabulary split count (tests of the merge).
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
    merge_splits(stats, temperature, entropy, row_max, log_sum, moments=moments, dh=dh if need_grad else None)
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
    return triton_chunked.weight_grad(hidden, weight, bias, temperature, row_max, log_sum, entropy, grad_entropy,
                                      need_bias)
