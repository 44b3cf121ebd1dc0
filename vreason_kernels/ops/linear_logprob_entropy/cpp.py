"""The C++ CPU backend (csrc/cpu/linear_entropy.cpp: the linear entropy's loops with the
label term), behind the backend contract of naive.py."""

import torch


def forward(hidden, weight, bias, labels, temperature: float):
    return torch.ops.vreason_C.linear_logprob_entropy_fwd(hidden, weight, bias, labels, temperature)


def grads(hidden, weight, bias, labels, temperature: float, row_max, log_sum, mean, grad_logp, grad_entropy,
          need_hidden: bool, need_weight: bool, need_bias: bool):
    return torch.ops.vreason_C.linear_logprob_entropy_bwd(
        hidden, weight, bias, labels, temperature, row_max, log_sum, mean, grad_logp, grad_entropy,
        need_hidden, need_weight, need_bias,
    )
