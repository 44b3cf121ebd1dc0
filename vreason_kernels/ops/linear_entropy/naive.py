"""Pure-PyTorch reference for the fused linear entropy: the spec the kernels must match.

    z = (W h + b) / tau,   p = softmax(z),   H = -sum_j p_j log p_j   (nats)

Everything is computed relative to the row max m, as the kernels do (docs/design.md §2.1):
with d_j = z_j - m, e_j = e^{d_j}, s = sum e_j and t = sum e_j d_j,

    H = log s - t/s,   lse = m + log s,   mu = E_p[z] = m + t/s,
    dH/dz_j = -p_j (z_j - mu) = -(e_j / s) (d_j - t/s).

The textbook ``lse - sum p z`` subtracts two numbers of the logits' size to get one of
order log V: a common offset of 1000 on every logit costs it ~1e-2 in fp32, while the
relative form loses nothing (d_j is exact when z_j is near m).

Masked vocabulary entries (z_j = -inf) have e_j = 0 and contribute nothing; ``where``
keeps 0 * -inf out of the values and their gradients. A row whose logits are all -inf
has no distribution: s = 0, so its entropy and dH/dh are NaN (0/0), the same in every
backend, and it adds nothing to dW/db.
"""

from typing import Optional

import torch

from vreason_kernels.backend import accumulator_dtype
from vreason_kernels.ops.linear_entropy.partials import Partials


def _relative_sums(z: torch.Tensor):
    """(m, d, e, s, t) of every row of ``z``, with ``d``/``e`` zeroed where ``e = 0``.

    ``m`` is detached: H does not depend on it, so autograd through ``m`` would only add
    terms that cancel up to rounding.
    """
    m = z.detach().amax(-1, keepdim=True)
    d = z - m
    e = torch.exp(d)
    live = e > 0  # false at masked entries, underflows, and NaN (all-masked rows)
    d = torch.where(live, d, torch.zeros_like(d))
    e = torch.where(live, e, torch.zeros_like(e))
    s = e.sum(-1)
    t = (e * d).sum(-1)
    return m.squeeze(-1), d, e, s, t


def entropy_stats(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float):
    """Return (entropy, logits, m, log s, d, e, s, t/s) of every row of ``hidden [..., D]``.

    ``logits = W h + b`` stays in the input dtype, as a plain ``lm_head`` would give it;
    everything after is computed in at least float32 (float64 for float64 input).
    ``m``, ``d``, ``e``, ``s``, ``t`` as in the module docstring, in units of ``z``.
    """
    logits = torch.nn.functional.linear(hidden, weight, bias)
    z = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    m, d, e, s, t = _relative_sums(z)
    mean = t / s  # mu - m
    log_s = torch.log(s)
    return log_s - mean, logits, m, log_s, d, e, s, mean


def linear_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    return_logits: bool = False,
):
    """Differentiable reference with the public signature (float32 entropy, float64 for float64 input)."""
    entropy, logits = entropy_stats(hidden, weight, bias, temperature)[:2]
    entropy = entropy if entropy.dtype == torch.float64 else entropy.float()
    return (entropy, logits) if return_logits else entropy


# ---- the "torch" backend of the custom op: same contract as the fused backends ----
# Custom-op bodies run below autograd, so these use the closed form of dH/dz.


def _entropy_dz(hidden, weight, bias, temperature: float):
    """(entropy, logits, m, log s, s, s * dH/dz), the last one zero at masked (e = 0) entries.

    dH/dz is left unnormalised (-e_j (d_j - t/s)): dividing by s after the product with W,
    as the kernels do, makes an all-masked row (s = 0) give NaN rather than a silent 0.
    """
    entropy, logits, row_max, log_sum, d, e, s, mean = entropy_stats(hidden, weight, bias, temperature)
    dz_times_s = -e * (d - mean.unsqueeze(-1))
    dz_times_s = torch.where(e > 0, dz_times_s, torch.zeros_like(dz_times_s))
    return entropy, logits, row_max, log_sum, s, dz_times_s


def forward(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    """Backend contract: (entropy f32 [R], dH/dh f32 [R, D] | [0], row_max [R], log_sum [R], logits [R, V] | [0]).

    ``row_max = max_j z_j`` and ``log_sum = log sum_j e^{z_j - row_max}`` (so lse is their
    sum), kept apart so that the weight gradient can work relative to the max.
    """
    entropy, logits, row_max, log_sum, s, dz_times_s = _entropy_dz(hidden, weight, bias, temperature)
    acc = s.dtype
    if need_grad:
        dh = (dz_times_s @ weight.to(acc)) / (s * temperature).unsqueeze(-1)
    else:
        dh = hidden.new_empty(0, dtype=acc)
    return entropy, dh, row_max, log_sum, logits if return_logits else hidden.new_empty(0)


def weight_grad(hidden, weight, bias, temperature: float, row_max, log_sum, entropy, grad_entropy, need_bias: bool):
    """dW_j = sum_r g_r (dH_r/dz_rj) h_r / tau, and db_j = sum_r g_r (dH_r/dz_rj) / tau.

    From the row statistics given (``row_max`` M, ``log_sum`` log S, ``entropy`` H), as
    every backend takes them: ``dH_r/dz_rj = -p_rj (z_rj - mu_r)`` with ``d = z - M``,
    ``p = e^{d - log S}`` and ``z - mu = d - (log S - H)``. The rows of ``weight`` may be a
    slice of the vocabulary (``vreason_kernels.distributed``): its gradient then needs the
    statistics of the whole row, which only the caller has. Masked entries (z = -inf) and
    rows whose logits are all -inf add nothing.
    """
    acc = row_max.dtype
    z = torch.nn.functional.linear(hidden, weight, bias).to(acc) / temperature
    live = z > float("-inf")
    d = torch.where(live, z - row_max[:, None], torch.zeros_like(z))
    p = torch.exp(d - log_sum[:, None])
    scale = grad_entropy.to(acc) / temperature
    coef = torch.where(live, -p * (d - (log_sum - entropy)[:, None]) * scale[:, None], torch.zeros_like(z))
    grad_bias = coef.sum(0) if need_bias else hidden.new_empty(0, dtype=acc)
    return coef.transpose(0, 1) @ hidden.to(acc), grad_bias


def slice_partials(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool):
    """``(Partials, logits [R, V_slice] | [0])`` of the vocabulary rows in ``weight``
    (``partials.py``): their (m, s, t) and, with ``need_grad``, (A, B), from the slice's
    logits, which this path materialises."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    acc = accumulator_dtype(hidden.dtype)
    m, d, e, s, t = _relative_sums(logits.to(acc) / temperature)
    a = b = None
    if need_grad:
        w = weight.to(acc)
        a, b = e @ w, (e * d) @ w
    return Partials(m, s, t, a, b), logits if return_logits else hidden.new_empty(0)
