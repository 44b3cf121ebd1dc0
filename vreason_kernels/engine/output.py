"""``VReasonOutput``: what ``generate`` returns."""

from dataclasses import dataclass, field

import torch


@dataclass
class VReasonOutput:
    """Result of :func:`vreason_kernels.generate`.

    Attributes:
        sequences: ``[B, L + new]`` prompt plus new tokens; after a sample's EOS its
            remaining slots hold the pad token, as in ``model.generate``.
        entropy: ``[B, new]`` float32 entropy ``H_k`` (nats) of the distribution each new
            token was drawn from (temperature 1, full vocabulary).
        entropy_ema: ``[B, new]`` its exponential moving average ``H_ema_k``.
        alpha: ``[B, new]`` the switch ``α_k`` (``-1`` below the running EMA peak, ``+1``
            at a new peak).
        delta_norm: ``[B, new]`` Frobenius norm of the sample's ``ΔV`` after the update of
            step ``k`` (0 when the controller is off).
        stats: ``tokens`` (new tokens before EOS, summed over the batch), ``steps``
            (decode steps run), ``prefill_s``, ``decode_s``, ``wall_s``,
            ``time_per_token_s`` (seconds per decode forward after the prefill), ``peak_memory_bytes`` (CUDA
            only, else ``None``), ``updates``, ``nan_resets`` and ``span_size`` (the number of positions ``ΔV``
            covers: the union of the rows' spans, after Lite pruning).

    Trace entries after a sample's EOS are NaN.
    """

    sequences: torch.Tensor
    entropy: torch.Tensor
    entropy_ema: torch.Tensor
    alpha: torch.Tensor
    delta_norm: torch.Tensor
    stats: dict = field(default_factory=dict)
