"""Partial statistics of ``linear_entropy`` over a slice of the vocabulary, and their merge.

For the vocabulary rows ``j`` of one slice (docs/design.md §2.1), with ``z_j = (w_j . h + b_j) / tau``
and the slice's max ``m``::

    s = sum e^{z_j - m}          t = sum e^{z_j - m} (z_j - m)
    A = sum e^{z_j - m} w_j      B = sum e^{z_j - m} (z_j - m) w_j

Slices ``k = 0, 1, ...`` fold onto ``M = max_k m_k`` with ``r_k = e^{m_k - M}``,
``delta_k = m_k - M``::

    S = sum_k r_k s_k            T = sum_k r_k (t_k + delta_k s_k)
    A = sum_k r_k A_k            B = sum_k r_k (B_k + delta_k A_k)

and finish as ``H = log S - T/S``, ``dH/dh = -(B - (T/S) A) / (S tau)``. This is the
Triton ``_merge_kernel``'s fold (``triton_splits``), in PyTorch so that it can run on
partials gathered from other processes (the kernel folds splits inside one launch; the
C++ backend folds its chunks inside one call and does not hand them out). A slice's own
partials come from ``op.slice_partials``.

A slice whose logits are all -inf has ``m = -inf``, ``s = t = 0``, ``A = B = 0`` and adds
nothing (``r = delta = 0``, as the kernels' ``triton_utils.rescale``).
"""

from typing import NamedTuple, Optional

import torch


class Partials(NamedTuple):
    """``m, s, t [R]``; ``a, b [R, D]`` or ``None`` when no gradient is wanted."""

    m: torch.Tensor
    s: torch.Tensor
    t: torch.Tensor
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]


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
