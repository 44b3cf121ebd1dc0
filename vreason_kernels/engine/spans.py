"""Per-row spans: every batch row modulates its own positions, in one call.

The fused attention takes one span ``[S]`` for the whole batch. A left-padded batch whose
videos sit at different positions, or have different lengths, therefore runs with the
UNION ``U`` of the rows' spans: ``ΔV`` is ``[B, Hkv, |U|, D]`` and ``member [B, |U|]``
marks which union positions are the row's own. A foreign entry of ``ΔV`` stays exactly
zero (``DeltaV`` masks its gradient, so the optimizer state stays zero too, and re-zeroes
it after every step for any optimizer), and a zero delta leaves ``v`` bit-exact through
the norm-preserving map (``u = v``, so ``||v|| / ||u|| = 1``). So each row computes what
it computes when run alone with its own span.

Lite pruning keeps ``ceil(keep_ratio * S_b)`` positions of each row's own span; rows then
have different lengths, and the cache stays rectangular by left-padding the shorter rows
with masked-out zero keys and values.
"""

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from vreason_kernels._checks import check_positions, check_positions_values, check_tensor

# Padding value of a [B, S] span tensor whose rows have different lengths.
SPAN_PAD = -1


@dataclass
class RowSpans:
    """The rows' spans as one union span and a membership mask."""

    positions: Tensor  # int64 [S], sorted unique: the union, the span the op gets
    member: Optional[Tensor]  # bool [B, S]: the row's own positions; None when every row owns all

    @classmethod
    def from_rows(cls, rows: list, device) -> "RowSpans":
        rows = [r.to(device=device, dtype=torch.long) for r in rows]
        union = torch.unique(torch.cat(rows)) if rows else torch.zeros(0, dtype=torch.long, device=device)
        member = torch.stack([torch.isin(union, r) for r in rows])
        return cls(union, None if bool(member.all()) else member)

    @property
    def size(self) -> int:
        return self.positions.numel()

    def rows(self, batch: int) -> list:
        if self.member is None:
            return [self.positions] * batch
        return [self.positions[m] for m in self.member]


def _check_device(name: str, span: Tensor, device) -> None:
    if span.device not in (torch.device("cpu"), device):
        raise ValueError(f"{name} must be on the CPU or the model's device ({device}), got {span.device}")


def _row_positions(name: str, row, prompt_len: int, device) -> Tensor:
    check_positions(name, row)
    _check_device(name, row, device)
    row = row.to(device=device, dtype=torch.long)
    check_positions_values(name, row, prompt_len, bound="prompt length")
    return row


def _padded_rows(span: Tensor, batch: int) -> list:
    """Rows of a ``[B, S]`` span: each row's positions, then ``SPAN_PAD`` entries only."""
    if span.shape[0] != batch:
        raise ValueError(f"span: a [B, S] span needs one row per batch row (B={batch}), got {tuple(span.shape)}")
    rows = []
    for i, row in enumerate(span):
        pad = row == SPAN_PAD
        n = int((~pad).sum())
        if bool(pad[:n].any()):
            raise ValueError(f"span[{i}]: the padding value {SPAN_PAD} may only follow the row's positions")
        rows.append(row[:n])
    return rows


def default_row_spans(model_config, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> list[Tensor]:
    """Per batch row, the positions that carry the delta by default: int64 ``[S_b]`` each.

    A row's video tokens when the config has ``video_token_id`` and the row holds them,
    else its image tokens (``image_token_id``), else all of its prompt positions. Positions
    that ``attention_mask`` ``[B, L]`` hides (left padding) are never included: no query
    sees them, so a delta there could do nothing. ``input_ids`` is ``[B, L]``.
    """
    check_tensor("input_ids", input_ids, ndim=2, floating=False)
    visible = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    rows = []
    for ids, seen in zip(input_ids, visible):
        hits = seen.clone()  # no video or image token: the whole visible prompt
        for attr in ("video_token_id", "image_token_id"):
            token = getattr(model_config, attr, None)
            if token is not None and bool(((ids == token) & seen).any()):
                hits = (ids == token) & seen
                break
        rows.append(hits.nonzero().flatten())
    return rows


def resolve_spans(model, span, input_ids: Tensor, attention_mask: Tensor) -> RowSpans:
    """The user's span, checked, or the default (:func:`default_row_spans`), per row.

    ``span`` is ``None``, one int ``[S]`` tensor for every row, a list/tuple of ``B`` int
    ``[S_b]`` tensors, or an int ``[B, S]`` tensor whose rows end in ``-1`` padding. Each
    row: sorted unique positions in ``[0, L)``. Positions that ``attention_mask`` hides are
    dropped from a row (no query sees them, so a delta there could do nothing).
    """
    batch, length = input_ids.shape
    device = input_ids.device
    if span is None:
        return RowSpans.from_rows(default_row_spans(model.config, input_ids, attention_mask), device)
    if isinstance(span, (list, tuple)):
        if len(span) != batch:
            raise ValueError(f"span: a list of per-row spans needs {batch} entries (one per row), got {len(span)}")
        rows = [_row_positions(f"span[{i}]", row, length, device) for i, row in enumerate(span)]
    elif isinstance(span, Tensor) and span.dim() == 2:
        check_positions("span", span.flatten())
        _check_device("span", span, device)
        rows = [_row_positions(f"span[{i}]", r, length, device) for i, r in enumerate(_padded_rows(span, batch))]
    elif isinstance(span, Tensor) and span.dim() != 1:
        raise ValueError(f"span must have shape [S] or [B, S], got {tuple(span.shape)}")
    else:
        rows = [_row_positions("span", span, length, device)] * batch
    visible = attention_mask.bool()
    return RowSpans.from_rows([row[visible[b, row]] for b, row in enumerate(rows)], device)


def check_lite_has_video(model_config, input_ids: Tensor, attention_mask: Tensor, keep_ratio: float) -> None:
    """Lite mode prunes video tokens: with the default span, every row must hold some.

    Without video the default span falls back to a row's image tokens or its whole prompt,
    and pruning those throws away the question itself (a text prompt pruned to half its
    tokens answers nonsense), so ``keep_ratio < 1`` is refused there unless the caller
    chose the span.
    """
    token = getattr(model_config, "video_token_id", None)
    if token is None:
        raise ValueError(
            f"keep_ratio={keep_ratio} (Lite mode) prunes video tokens, and this model has no video token "
            "(config.video_token_id); use keep_ratio=1.0, or pass span= to choose the positions to prune"
        )
    has_video = ((input_ids == token) & attention_mask.bool()).any(dim=1)
    if not bool(has_video.all()):
        rows = (~has_video).nonzero().flatten().tolist()
        raise ValueError(
            f"keep_ratio={keep_ratio} (Lite mode) prunes video tokens, and input_ids row(s) {rows} hold none; "
            "use keep_ratio=1.0, or pass span= to choose the positions to prune"
        )


def lite_prune(cache, mask: Tensor, spans: RowSpans, keep_ratio: float, layer: int):
    """Lite mode per row: each row keeps ``ceil(keep_ratio * S_b)`` of its own span's
    positions (largest value norm, ranked by every layer on its own values, as
    ``prune_kv`` does) in every layer's cache.

    Rows of different kept lengths are left-padded to the longest with zero keys/values
    that the returned 2-D ``mask`` hides. The mask follows the controlled layer's kept
    positions (positions outside the span, padding included, are kept by every layer) and
    the returned spans are each row's kept positions in that layer's pruned cache.
    Position ids are carried explicitly by the decode loops, so RoPE positions of later
    tokens are unaffected.
    """
    from transformers.cache_utils import DynamicLayer

    from vreason_kernels.ops.prune_kv import prune_kv, pruned_span

    for i, cached in enumerate(cache.layers):
        # Subclasses (sliding window, static) keep positions by rules pruning would break.
        if type(cached) is not DynamicLayer:
            raise TypeError(f"cache layer {i} must be a DynamicLayer (full attention), got {type(cached).__name__}")
    rows = spans.rows(mask.shape[0])
    pruned = [
        [prune_kv(c.keys[b : b + 1], c.values[b : b + 1], row, keep_ratio=keep_ratio) for c in cache.layers]
        for b, row in enumerate(rows)
    ]
    width = max(p[layer][2].shape[1] for p in pruned)
    masks, new_rows = [], []
    for b, row in enumerate(rows):
        kept = pruned[b][layer][2]  # [1, N_b]
        pad = width - kept.shape[1]
        masks.append(torch.cat([mask.new_zeros(pad), mask[b].gather(0, kept[0])]))
        new_rows.append(pruned_span(kept, row) + pad)
    for i, cached in enumerate(cache.layers):
        cached.keys = _left_pad_rows([pruned[b][i][0] for b in range(len(rows))], width)
        cached.values = _left_pad_rows([pruned[b][i][1] for b in range(len(rows))], width)
    return torch.stack(masks), RowSpans.from_rows(new_rows, mask.device)


def _left_pad_rows(rows: list, width: int) -> Tensor:
    """``[1, H, N_b, D]`` rows -> ``[B, H, width, D]``, zeros in front of the shorter ones."""
    return torch.cat([torch.nn.functional.pad(r, (0, 0, width - r.shape[2], 0)) for r in rows])
