"""The C++ CPU backend (csrc/cpu/linear_entropy.cpp), behind the backend contract of naive.py."""

import torch


def forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    return torch.ops.vreason_C.linear_entropy_fwd(hidden, weight, bias, temperature, need_grad, return_logits)


def weight_grad(hidden, weight, bias, temperature: float, row_max, log_sum, entropy, grad_entropy, need_bias: bool):
    return torch.ops.vreason_C.linear_entropy_weight_grad(
        hidden, weight, bias, temperature, row_max, log_sum, entropy, grad_entropy, need_bias
    )
