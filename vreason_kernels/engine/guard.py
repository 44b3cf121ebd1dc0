"""The warnings after decoding: the runaway guard, one warning when ``ΔV`` has outgrown
the values it modulates, and the count of ``ΔV``'s NaN/Inf resets.

The norm-preserving map keeps ``||V'|| = ||V||`` whatever ``ΔV`` does, so a controller
whose learning rate is far too high never produces a NaN or an error: its span rows just
turn into the direction of ``ΔV`` and the video (or prompt) they carried is gone. Adam
moves every entry of ``ΔV`` by up to about ``lr`` per update, so with ``lr=1e6`` ``ΔV``
reaches ~1e8 within a few tokens. Nothing stops decoding; the user is told once per call.
"""

import warnings
from typing import Optional

import torch

from vreason_kernels.engine.controller import sample_norms

# A sample whose ||ΔV|| (Frobenius, over its span rows) exceeds this multiple of ||V|| at
# the same rows gets the warning. At ratio r a row turns by up to atan(r) (84° at 10):
# the modulated values are then mostly ΔV's. The default lr stays below 1 on SmolLM2 over
# 256 tokens (docs/tuning.md, "The defaults").
RUNAWAY_RATIO = 10.0


def span_value_norms(values: torch.Tensor, positions: torch.Tensor, member: Optional[torch.Tensor],
                     process_group=None):
    """``||V||`` per sample over its own span rows, ``[B]``: ``values [B, Hkv, N, D]`` is
    the controlled layer's cache (after any Lite pruning), ``positions [S]`` the union
    span and ``member [B, S]`` each row's own positions (None: all); with ``process_group``,
    over every rank's kv heads."""
    rows = values[:, :, positions].float()
    if member is not None:
        rows = rows.masked_fill(~member[:, None, :, None], 0.0)
    return sample_norms(rows, process_group)


def warn_runaway(delta_norm: torch.Tensor, value_norms: torch.Tensor) -> None:
    """Warn once when any sample's ``||ΔV||`` trace (``[B, new]``, NaN after EOS) went
    above ``RUNAWAY_RATIO`` times its ``||V||`` at the span (``[B]``)."""
    if delta_norm.numel() == 0:
        return
    peak = delta_norm.nan_to_num(0.0).amax(dim=1)
    ratio = peak / value_norms.clamp_min(torch.finfo(torch.float32).tiny)
    worst = int(ratio.argmax())
    if float(ratio[worst]) > RUNAWAY_RATIO:
        warnings.warn(
            f"ΔV outgrew the values it modulates: ||ΔV|| reached {float(peak[worst]):.3g}, "
            f"{float(ratio[worst]):.3g}x ||V|| at the span (sample {worst}; warning above {RUNAWAY_RATIO:g}x), so "
            "the span's values now mostly follow ΔV. The learning rate is likely too high: lower lr "
            "(sane range 1e-3 to 2e-1; see VReasonConfig) or bound ΔV with max_delta_norm",
            stacklevel=3,
        )


def warn_nan_resets(count: int):
    """One warning per call, after decoding (counted on device, so no per-token sync)."""
    if count:
        warnings.warn(
            f"ΔV became NaN/Inf and was reset to zero {count} time(s) (sample-steps); decoding continued",
            stacklevel=3,
        )
