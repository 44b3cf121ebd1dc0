"""Partial statistics of ``linear_entropy`` over a slice of the vocabulary, and their merge.

For the vocabulary rows ``j`` of one slice (DESIGN.md §2.1), with ``z_j = (w_j . h + b_j) / tau``
and the slice's max ``m``::

    s = sum e^{z_j - m}          t = sum e^{z_j - m} (z_j - m)
    A = sum e^{z_j - m} w_j      B = sum e^{z_j - m} (z_j - m) w_j

Slices ``k = 0, 1, ...`` fold onto ``M = max_k m_k`` with ``r_k = e^{m_k - M}``,
``delta_k = m_k - M``::

    S = sum_k r_k s_k            T = sum_k r_k (t_k + delta_k s_k)
    A = sum_k r_k A_k            B = sum_k r_k (B_k + delta_k A_k)

and finish as ``H = log S - T/S``, ``dH/dh = -(B - (T/S) A) / (S tau)``. This is the
Triton ``_merge_kernel``'s fold, in PyTorch so that it can run on partials gathered from
other processes (the kernel folds splits inside one launch; the C++ backend folds its
chunks inside one call and does not hand them out).

A slice whose logits are all -inf has ``m = -inf``, ``s = t = 0``, ``A = B = 0`` and adds
nothing (``r = delta = 0``, as the kernels' ``_rescale``).
"""

from typing import NamedTuple, Optional

import torch

from vreason_kernels.backend import accumulator_dtype


class Partials(NamedTuple):
    """``m, s, t [R]``; ``a, b [R, D]`` or ``None`` when no gradient is wanted."""

    m: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]


def slice_partials(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool, backend: str):
    """``(Partials, logits [R, V_slice] | [0])`` of the vocabulary rows in ``weight``.

    ``backend="triton"`` runs the fused partials kernels (W read once) and folds their
    splits; any other backend takes the PyTorch path, which materialises the slice's
    logits (the C++ backend keeps its partials internal).
    """
    if backend == "triton" and hidden.shape[0] > 0:
        from vreason_kernels.ops.linear_entropy import triton_kernels

        stats, moments, logits = triton_kernels.forward_partials(
            hidden, weight, bias, temperature, need_grad, return_logits
        )
        folded = merge_partials(Partials(*stats, *(moments if need_grad else (None, None))))
        return folded, logits
    from vreason_kernels.ops.linear_entropy.naive import _relative_sums

    logits = torch.nn.functional.linear(hidden, weight, bias)
    acc = accumulator_dtype(hidden.dtype)
    m, d, e, s, t = _relative_sums(logits.to(acc) / temperature)
    a = b = None
    if need_grad:
        w = weight.to(acc)
        a, b = e @ w, (e * d) @ w
    return Partials(m, s, t, a, b), logits if return_logits else hidden.new_empty(0)


def _rescale(m: torch.Tensor, top: torch.Tensor):
    """``(r, delta) = (e^{m - top}, m - top)``, both 0 where ``m = -inf`` (nothing seen)."""
    seen = m > float("-inf")
    zero = torch.zeros_like(m)
    delta = torch.where(seen, m, zero) - torch.where(seen, top, zero)
    return torch.where(seen, torch.exp(delta), zero), delta


def merge_partials(parts: Partials) -> Partials:
    """Fold ``K`` partials (``m, s, t [K, R]``, ``a, b [K, R, D]``) onto their common max.

    Vectorised over ``K`` (the Triton partials number up to twice the SM count at decode,
    far too many for a Python loop of small kernels). ``torch.sum`` over ``K`` reduces in an
    order fixed by the shape and the device, so equal inputs give equal bits, on every rank.
    """
    top = parts.m.amax(0)
    r, delta = _rescale(parts.m, top.expand_as(parts.m))
    total_s = (r * parts.s).sum(0)
    total_t = (r * (parts.t + delta * parts.s)).sum(0)
    if parts.a is None:
        return Partials(top, total_s, total_t, None, None)
    r, delta = r[..., None], delta[..., None]
    total_a = (r * parts.a).sum(0)
    total_b = (r * (parts.b + delta * parts.a)).sum(0)
    return Partials(top, total_s, total_t, total_a, total_b)


def finish(parts: Partials, temperature: float):
    """``(entropy, dH/dh | None, row_max, log_sum)`` of merged partials (the backends' row statistics)."""
    mean = parts.t / parts.s  # mu - M
    log_s = torch.log(parts.s)
    dh = None
    if parts.a is not None:
        dh = -(parts.b - mean[:, None] * parts.a) / (parts.s * temperature)[:, None]
    return log_s - mean, dh, parts.m, log_s


def weight_grad_from_stats(hidden, weight, bias, temperature: float, row_max, log_sum, entropy, grad_entropy,
                           need_bias: bool):
    """dW/db of a vocabulary slice from the WHOLE vocabulary's row statistics (PyTorch path).

    ``G_rj = -g_r p_rj (z_rj - mu_r) / tau`` with ``p = e^{d - log S}``, ``z - mu = d - (log S - H)``,
    ``d = z - M``: the rule of the fused backends' ``weight_grad``, which take the row
    statistics as given (``naive.weight_grad`` recomputes them from its own, whole, vocabulary).
    """
    acc = row_max.dtype
    z = torch.nn.functional.linear(hidden, weight, bias).to(acc) / temperature
    live = z > float("-inf")
    d = torch.where(live, z - row_max[:, None], torch.zeros_like(z))
    p = torch.exp(d - log_sum[:, None])
    scale = grad_entropy.to(acc) / temperature
    coef = torch.where(live, -p * (d - (log_sum - entropy)[:, None]) * scale[:, None], torch.zeros_like(z))
    grad_bias = coef.sum(0) if need_bias else None
    return coef.transpose(0, 1) @ hidden.to(acc), grad_bias
