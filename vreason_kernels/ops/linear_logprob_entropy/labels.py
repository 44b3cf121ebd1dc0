"""What a row's label means (``has_label``, ``label_columns``: every backend and the
dispatcher read labels through these), and the label's logit and log-probability from row
statistics, for the paths that do not gather it from the logits the statistics came from:
a vocabulary shard's share of the label is one dot product per row (``sharded.py``; its
partials kernel keeps no logits), and the Triton forward forms ``log p_y`` from its
gathered logit here too."""

import torch

from vreason_kernels.backend import accumulator_dtype

# Rows per gather of label rows of W (bounds the [rows, D] float32 copy).
_GATHER_ROWS = 1024


def has_label(labels, vocab: int):
    """Whether each row's label lies in ``[0, V)`` (any other value means no label)."""
    return (labels >= 0) & (labels < vocab)


def label_columns(labels, vocab: int):
    """``(has [R] bool, column [R] int64)``: ``has_label``, and the label where there is one,
    else 0 (a column every row can read without going out of bounds)."""
    has = has_label(labels, vocab)
    return has, torch.where(has, labels, torch.zeros_like(labels))


def label_logits(hidden, weight, bias, labels, temperature: float):
    """``(z_y [R], has [R])``: ``z_y = (w_y . h + b_y) / tau`` in the accumulator dtype where
    the row's label ``y`` is in ``[0, V)`` (``has``), else 0."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulator_dtype(hidden.dtype)
    has, column = label_columns(labels, vocab)
    z = hidden.new_empty(rows, dtype=acc)
    for start in range(0, rows, _GATHER_ROWS):
        part = slice(start, min(start + _GATHER_ROWS, rows))
        dot = (hidden[part].to(acc) * weight.index_select(0, column[part]).to(acc)).sum(-1)
        if bias is not None:
            dot = dot + bias.index_select(0, column[part]).to(acc)
        z[part] = dot / temperature
    return torch.where(has, z, torch.zeros_like(z)), has


def label_logprob(z_label, has, row_max, log_sum):
    """``log p_y = min(z_y - M, 0) - log S`` where ``has``, else 0.

    ``z_y`` here is rounded apart from the logits the statistics came from, so where ``y``
    is the argmax it may pass ``M`` by an ulp: ``z_y - M`` is capped at 0, its true value.
    With ``log S >= 0`` (the max's own term is 1) the result is <= 0 as formed. An
    all-masked row (``M = -inf``) gives NaN, as its entropy.
    """
    logp = torch.clamp(z_label - row_max, max=0.0) - log_sum
    return torch.where(has, logp, torch.zeros_like(logp))
