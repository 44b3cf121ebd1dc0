"""Integrations with model libraries, kept apart from the ops.

Importing this package registers ``attn_implementation="vreason"`` with transformers, so
``from_pretrained(..., attn_implementation="vreason")`` works after it.
"""

from vreason_kernels.integrations.transformers import (
    IMPLEMENTATION,
    ValueDeltaContext,
    default_row_spans,
    default_span,
    register,
    vreason_attention,
    vreason_attention_forward,
)

register()

__all__ = [
    "IMPLEMENTATION",
    "ValueDeltaContext",
    "default_row_spans",
    "default_span",
    "register",
    "vreason_attention",
    "vreason_attention_forward",
]
