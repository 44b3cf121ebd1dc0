"""Pure-PyTorch reference for ``linear_logprob_entropy``: the spec the kernels must match.

With ``z = (W h + b) / tau``, ``p = softmax(z)`` and a label ``y`` per row (docs/design.md §2.4)::

    log p_y = (z_y - m) - log s,      H = log s - t/s          (m, s, t as in linear_entropy)
    dL/dz_j = g_L ([j == y] - p_j) - g_H p_j (z_j - mu)

Relative to the row max ``m``, ``log p_y`` is <= 0 as formed: ``z_y <= m`` and ``s >= 1``
(the max's own term is ``e^0 = 1``), where the difference of two separately rounded
log-sum-exps can come out above 0.

Rows go in chunks whose logits fit ``LOGIT_BUDGET`` values, so [T, V] is never held. The
entropy side is ``linear_entropy``'s reference (``entropy_stats``), on the same logits.
"""

import torch

from vreason_kernels.backend import accumulator_dtype
from vreason_kernels.ops.linear_entropy.naive import entropy_stats
from vreason_kernels.ops.linear_logprob_entropy.labels import label_columns

# Logit values per chunk of rows (64 MiB of float32).
LOGIT_BUDGET = 2**24


def row_chunks(rows: int, vocab: int):
    """Slices of at most ``LOGIT_BUDGET // V`` rows (at least one) covering ``rows``."""
    size = max(1, LOGIT_BUDGET // max(vocab, 1))
    return [slice(start, min(start + size, rows)) for start in range(0, rows, size)]


def forward(hidden, weight, bias, labels, temperature: float):
    """Backend contract: ``(logp, entropy, row_max, log_sum, mean)``, each ``[R]`` in the
    accumulator dtype. ``labels [R]`` int64: a row's label, none outside ``[0, V)`` (its
    logp is 0). ``row_max``/``log_sum`` as ``linear_entropy``'s; ``mean = t/s = mu - m``."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    acc = accumulator_dtype(hidden.dtype)
    outputs = [hidden.new_empty(rows, dtype=acc) for _ in range(5)]
    for part in row_chunks(rows, vocab):
        entropy, logits, row_max, log_sum, _, _, _, mean = entropy_stats(hidden[part], weight, bias, temperature)
        z = logits.to(acc) / temperature  # the values entropy_stats took its max and sums of
        has, column = label_columns(labels[part], vocab)
        z_label = z.gather(1, column[:, None])[:, 0]
        logp = torch.where(has, (z_label - row_max) - log_sum, torch.zeros_like(z_label))
        for out, value in zip(outputs, (logp, entropy, row_max, log_sum, mean)):
            out[part] = value
    return tuple(outputs)


def grads(hidden, weight, bias, labels, temperature: float, row_max, log_sum, mean, grad_logp, grad_entropy,
          need_hidden: bool, need_weight: bool, need_bias: bool):
    """Backend contract: ``(dh [R, D] | [0], dW [V, D] | [0], db [V] | [0])`` in the accumulator dtype.

    ``dL/dz`` as in the module docstring, from the row statistics given (a vocabulary
    shard gets those of the whole row and its own label indices); ``grad_logp`` or
    ``grad_entropy`` None leaves that term out. Masked entries (z = -inf) add nothing but
    their one-hot term.
    """
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    acc = row_max.dtype
    w = weight.to(acc)
    grad_hidden = hidden.new_zeros((rows, dim) if need_hidden else (0,), dtype=acc)
    grad_weight = hidden.new_zeros((vocab, dim) if need_weight else (0,), dtype=acc)
    grad_bias = hidden.new_zeros((vocab,) if need_bias else (0,), dtype=acc)
    for part in row_chunks(rows, vocab):
        z = torch.nn.functional.linear(hidden[part], weight, bias).to(acc) / temperature
        live = z > float("-inf")
        d = torch.where(live, z - row_max[part, None], torch.zeros_like(z))
        p = torch.where(live, torch.exp(d - log_sum[part, None]), torch.zeros_like(z))
        coef = torch.zeros_like(z)
        if grad_entropy is not None:
            scale = grad_entropy[part].to(acc) / temperature
            coef = torch.where(live, -p * (d - mean[part, None]) * scale[:, None], coef)
        if grad_logp is not None:
            g = grad_logp[part].to(acc) / temperature
            has, column = label_columns(labels[part], vocab)
            coef = coef - p * g[:, None]
            # One entry per row: a dense add of g at (r, y_r), no two writers.
            coef = coef + torch.zeros_like(coef).scatter(1, column[:, None], torch.where(has, g, 0.0)[:, None])
        if need_hidden:
            grad_hidden[part] = coef @ w
        if need_weight:
            grad_weight += coef.transpose(0, 1) @ hidden[part].to(acc)
        if need_bias:
            grad_bias += coef.sum(0)
    return grad_hidden, grad_weight, grad_bias
