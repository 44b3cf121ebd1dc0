"""``linear_logprob_entropy`` with ``process_group=``: the vocabulary sharded by rows.

Rank ``k`` holds the rows ``[o_k, o_k + V_k)`` of the head. Forward: its slice's partials
``(m, s, t)`` (``linear_entropy``'s ``slice_partials``) and its share of the label logit
(``z_y`` where it owns ``y``, else 0) go to every rank in ONE all-gather of 4 floats per
row; each rank merges them in rank order (``merge_partials``, docs/design.md §2.1) and
adds the label shares (one nonzero: exact), so every rank holds the same bits.

Backward: each rank forms ``dL/dz`` over its own columns from the whole row's statistics
and its local label index (the ``-g_L p_j`` term on every shard, the one-hot term on the
owner's), which gives its ``dW``/``db`` directly and its share of ``dh``; the shares are
all-gathered (``D`` floats per row) and added in rank order, the same on every rank.
"""

import torch

from vreason_kernels._checks import FLOAT_DTYPES
from vreason_kernels._collectives import agree, all_gather, resolve_group, summary_device
from vreason_kernels.backend import BACKENDS
from vreason_kernels.ops.linear_entropy import Partials, finish, merge_partials, slice_partials
from vreason_kernels.ops.linear_logprob_entropy.labels import label_logits, label_logprob

# What every rank tells the others before the partials travel (_collectives.agree): the
# names, and which must agree ({name: the argument an error names}).
_SUMMARY = ("vocab rows", "lowest label", "highest label", "D", "rows", "dtype", "temperature", "ignore_index",
            "need_grad", "backend")
_SAME = {"D": "weight/hidden", "rows": "hidden", "dtype": "hidden", "temperature": "temperature",
         "ignore_index": "ignore_index", "need_grad": "hidden.requires_grad", "backend": "backend"}


def agree_on_inputs(check, hidden, weight, labels, bias, temperature, ignore_index, process_group):
    """``(group, resolved backend, this rank's first vocabulary row, whole V)`` once every rank's
    input passed ``check`` (the single-process checks, returning the resolved backend) and
    the ranks agree; otherwise the same kind of error on every rank. One all-gather of 11
    floats; it reads the labels' min and max on the host (a sync on CUDA)."""
    process_group = resolve_group(process_group)
    resolved = None

    def summary():
        nonlocal resolved
        resolved = check()
        kept = labels[labels != ignore_index]
        low_high = (float(kept.min()), float(kept.max())) if kept.numel() else (0.0, -1.0)
        need_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
        return (weight.shape[0], *low_high, hidden.shape[-1], labels.numel(), FLOAT_DTYPES.index(hidden.dtype),
                temperature, ignore_index, need_grad, BACKENDS.index(resolved))

    columns = agree("linear_logprob_entropy", summary, _SUMMARY, process_group,
                    summary_device(hidden, process_group), same=_SAME,
                    decode={"dtype": FLOAT_DTYPES, "backend": BACKENDS})
    sizes = [int(v) for v in columns["vocab rows"]]
    low, high = min(columns["lowest label"]), max(columns["highest label"])
    if low < 0 or high >= sum(sizes):
        raise ValueError(f"labels must lie in [0, {sum(sizes)}) (the whole sharded vocabulary) or equal "
                         f"ignore_index={ignore_index}, got {int(low if low < 0 else high)}")
    rank = torch.distributed.get_rank(process_group)
    return process_group, resolved, sum(sizes[:rank]), sum(sizes)


def forward(hidden, weight, bias, labels, local, temperature: float, backend: str, process_group):
    """``(logp, entropy, row_max, log_sum, mean)`` of the whole vocabulary, the same bits on
    every rank. ``labels``: global (-1 for none); ``local``: this shard's indices."""
    parts, _ = slice_partials(hidden, weight, bias, temperature, False, False, backend)
    z_share, _ = label_logits(hidden, weight, bias, local, temperature)
    table = all_gather(torch.stack([parts.m, parts.s, parts.t, z_share.to(parts.m.dtype)], -1), process_group)
    merged = merge_partials(Partials(table[..., 0], table[..., 1], table[..., 2], None, None))
    entropy, _, row_max, log_sum = finish(merged, temperature)
    mean = merged.t / merged.s  # mu - M, as finish() takes it
    logp = label_logprob(table[..., 3].sum(0), labels >= 0, row_max, log_sum)
    return logp, entropy, row_max, log_sum, mean


def sum_over_ranks(x: torch.Tensor, process_group) -> torch.Tensor:
    """The ranks' ``x`` added in rank order: the same bits on every rank."""
    return all_gather(x, process_group).sum(0)
