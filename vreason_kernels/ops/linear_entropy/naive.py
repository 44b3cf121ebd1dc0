"""Pure-PyTorch reference for the fused linear entropy: the spec the kernels must match.

    z = (W h + b) / tau,   p = softmax(z),   H = logsumexp(z) - sum_j p_j z_j   (nats)

Masked vocabulary entries (z_j = -inf) have p_j = 0 and contribute nothing; the
``where`` keeps 0 * -inf out of both the value and its gradient.
"""

from typing import Optional

import torch


def entropy_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float):
    """Return (entropy, logits, lse, mu) of every row of ``hidden [..., D]``.

    ``logits = W h + b`` stays in the input dtype, as a plain ``lm_head`` would give it;
    everything after is computed in at least float32 (float64 for float64 input).
    ``lse`` and ``mu = E_p[z]`` are in units of ``z``.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    lse = torch.logsumexp(z, dim=-1)
    p = torch.exp(z - lse.unsqueeze(-1))
    z_finite = torch.where(torch.isneginf(z), torch.zeros_like(z), z)
    mu = (p * z_finite).sum(-1)
    return lse - mu, logits, lse, mu


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    return_logits: bool = False,
):
    """Differentiable reference with the public signature (float32 entropy, float64 for float64 input)."""
    entropy, logits, _, _ = entropy_stats(hidden, weight, bias, temperature)
    entropy = entropy if entropy.dtype == torch.float64 else entropy.float()
    return (entropy, logits) if return_logits else entropy


# ---- the "torch" backend of the custom op: same contract as the fused backends ----
# Custom-op bodies run below autograd, so these use the closed form dH/dz = -p (z - mu).


def _entropy_dz(hidden, weight, bias, temperature: float):
    """Return (entropy, logits, lse, mu, dH/dz) with dH/dz = 0 at masked (p = 0) entries."""
    entropy, logits, lse, mu = entropy_stats(hidden, weight, bias, temperature)
    z = logits.to(lse.dtype) / temperature
    p = torch.exp(z - lse.unsqueeze(-1))
    dz = torch.where(p > 0, -p * (z - mu.unsqueeze(-1)), torch.zeros_like(p))
    return entropy, logits, lse, mu, dz


def forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    """Backend contract: (entropy f32 [R], dH/dh f32 [R, D] | [0], lse [R], mu [R], logits [R, V] | [0])."""
    entropy, logits, lse, mu, dz = _entropy_dz(hidden, weight, bias, temperature)
    acc = lse.dtype
    dh = (dz @ weight.to(acc)) / temperature if need_grad else hidden.new_empty(0, dtype=acc)
    return entropy, dh, lse, mu, logits if return_logits else hidden.new_empty(0)


def weight_grad(hidden, weight, bias, temperature: float, lse, mu, grad_entropy, need_bias: bool):
    """dW_j = sum_r g_r (dH_r/dz_rj) h_r / tau, and db_j = sum_r g_r (dH_r/dz_rj) / tau."""
    _, _, _, _, dz = _entropy_dz(hidden, weight, bias, temperature)
    dz = dz * (grad_entropy.to(dz.dtype) / temperature).unsqueeze(-1)
    grad_weight = dz.transpose(0, 1) @ hidden.to(dz.dtype)
    grad_bias = dz.sum(0) if need_bias else hidden.new_empty(0, dtype=dz.dtype)
    return grad_weight, grad_bias
