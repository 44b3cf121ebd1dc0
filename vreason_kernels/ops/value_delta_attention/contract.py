"""The parts of ``value_delta_attention``'s contract that the dispatcher and every backend
share: the norm floor of the value map (docs/design.md §2.2) and what an attention mask means.

    u = v + delta,   n = max(||u||, EPS),   v' = u ||v|| / n
"""

from typing import Optional

import torch

EPS = 1e-6


def mask_to_bias(attention_mask: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Boolean mask (True = attend, as in SDPA) -> additive 0 / -inf; additive masks pass through."""
    if attention_mask is None:
        return None
    if attention_mask.dtype == torch.bool:
        zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
        return torch.where(attention_mask, zero, float("-inf"))
    return attention_mask.to(dtype)
