"""``prepare_run``: one ``generate`` call checked and set up before any model forward
(config, model parts, request, controlled layer, spans, recorder), shared by the fused
engine (loop.py) and the naive reference (reference.py).
"""

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.engine.model_parts import ModelParts, model_parts
from vreason_kernels.engine.recorder import Recorder
from vreason_kernels.engine.request import DecodeRequest, check_request
from vreason_kernels.engine.spans import RowSpans, check_lite_has_video, resolve_spans


def warn_empty_span():
    warnings.warn("span is empty: nothing to modulate, decoding plainly (V-Reason off)", stacklevel=3)


def resolve_config(config: Optional[VReasonConfig]) -> VReasonConfig:
    """``None`` is the default ``VReasonConfig()``: V-Reason on (plain decoding is ``enabled=False``)."""
    if config is None:
        return VReasonConfig()
    if not isinstance(config, VReasonConfig):
        raise TypeError(f"config must be a VReasonConfig or None, got {type(config).__name__}")
    config.validate()  # again: the dataclass may have been changed since it was built
    return config


@dataclass
class Run:
    """Everything a decode loop needs, checked once up front."""

    config: VReasonConfig
    parts: ModelParts
    request: DecodeRequest
    layer: int
    spans: Optional[RowSpans]  # None for plain decoding
    enabled: bool  # False for plain decoding, also when the span is empty
    recorder: Recorder


def prepare_run(model, input_ids, config, span, *, make_recorder: Callable[[DecodeRequest], Recorder] = Recorder,
                **request_args) -> Run:
    """Validate a ``generate`` call (shared by the engine, the naive reference and the
    ``model.generate`` integration, whose ``make_recorder`` brings transformers' stopping rules)."""
    config = resolve_config(config)
    parts = model_parts(model)
    request = check_request(model, input_ids, **request_args)
    layer = config.layer_index(len(parts.layers))
    enabled, spans = config.enabled, None
    if enabled:
        if config.keep_ratio < 1.0 and span is None:
            check_lite_has_video(model.config, request.input_ids, request.attention_mask, config.keep_ratio)
        spans = resolve_spans(model, span, request.input_ids, request.attention_mask)
        if spans.size == 0:
            warn_empty_span()
            enabled = False
    return Run(config, parts, request, layer, spans, enabled, make_recorder(request))
