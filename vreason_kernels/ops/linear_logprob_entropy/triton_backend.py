"""The Triton backend of ``linear_logprob_entropy``, behind the backend contract of naive.py,
on ``linear_entropy``'s kernels:

- forward: ``triton_chunked.statistics``, per chunk of rows the logits into an fp32
  scratch, their row statistics with ``mu - M``, and the label's logit read from them;
- backward: ``triton_chunked.grads``, statistics known: per chunk of rows the logits,
  then G with the entropy's and the label's terms (the one-hot term folded into G, so
  dW and db get it through the same product, no scatter and no atomics), then
  ``dh = G W``, ``dW = G^T h``, ``db = sum_r G``, each only when wanted.
"""

import torch

from vreason_kernels.ops.linear_entropy import triton_chunked
from vreason_kernels.ops.linear_logprob_entropy.labels import label_columns, label_logprob


def forward(hidden, weight, bias, labels, temperature: float):
    if hidden.shape[0] == 0:
        return tuple(torch.zeros(0, dtype=torch.float32, device=hidden.device) for _ in range(5))
    has, column = label_columns(labels, weight.shape[0])
    entropy, row_max, log_sum, mean, z_label = triton_chunked.statistics(hidden, weight, bias, temperature, column)
    return label_logprob(z_label, has, row_max, log_sum), entropy, row_max, log_sum, mean


def grads(hidden, weight, bias, labels, temperature: float, row_max, log_sum, mean, grad_logp, grad_entropy,
          need_hidden: bool, need_weight: bool, need_bias: bool):
    rows, dim = hidden.shape
    vocab = weight.shape[0]
    if rows == 0:  # nothing to sum; also keeps empty tensors out of the launches
        f32 = dict(dtype=torch.float32, device=hidden.device)
        return (torch.zeros((rows, dim) if need_hidden else (0,), **f32),
                torch.zeros((vocab, dim) if need_weight else (0,), **f32),
                torch.zeros((vocab,) if need_bias else (0,), **f32))
    return triton_chunked.grads(hidden, weight, bias, temperature, row_max, log_sum, mean, grad_entropy, labels,
                                grad_logp, need_hidden=need_hidden, need_weight=need_weight, need_bias=need_bias)
