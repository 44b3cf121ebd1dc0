"""The transformers integration: ``attn_implementation="vreason"`` and the default span.

The attention function, ``ValueDeltaContext`` and ``vreason_attention`` live in the engine
(``engine/attention.py``), which decodes with them; ``engine/spans.py`` holds the default
per-row spans. This module is their public home, with ``default_span`` for callers that
want one span for a whole batch.
"""

import torch
from torch import Tensor

from vreason_kernels._checks import check_tensor
from vreason_kernels.engine.attention import (
    IMPLEMENTATION,
    ValueDeltaContext,
    register,
    vreason_attention,
    vreason_attention_forward,
)
from vreason_kernels.engine.spans import default_row_spans

__all__ = [
    "IMPLEMENTATION",
    "ValueDeltaContext",
    "default_row_spans",
    "default_span",
    "register",
    "vreason_attention",
    "vreason_attention_forward",
]


def default_span(model_config, input_ids: Tensor) -> Tensor:
    """One span for the whole batch, int64 ``[S]`` on ``input_ids``' device: the
    :func:`default_row_spans` of an unpadded ``[L]`` or ``[B, L]`` prompt, which must agree
    across rows (``vk.generate`` itself takes per-row spans)."""
    check_tensor("input_ids", input_ids, floating=False)
    if input_ids.dim() not in (1, 2):
        raise ValueError(f"input_ids must have shape [L] or [B, L], got {tuple(input_ids.shape)}")
    rows = default_row_spans(model_config, input_ids.reshape(-1, input_ids.shape[-1]))
    if any(not torch.equal(row, rows[0]) for row in rows[1:]):
        raise ValueError("input_ids: the default span positions differ across batch rows; pass span explicitly")
    return rows[0]
