"""``prune_kv``: the paper's "Lite" mode (docs/design.md §1, §3).

After prefill, the video rows of the KV cache with the smallest value norm are dropped.
The op is a sort and a gather, so plain torch serves every device; it runs once per
prompt, not per token.

The norm of a position is the L2 norm of its value over all kv heads and head_dim,
``||value[b, :, i, :]||``, per batch row, computed in float64: squares of large fp32/bf16
values overflow float32 (every such norm would tie at inf and rank by position).
Ties are broken towards the EARLIER position: a stable descending sort keeps equal norms
in position order, so the same input always keeps the same positions.
"""

import math
import warnings

import torch
from torch import Tensor

from vreason_kernels._checks import (
    as_positions,
    check_device_type,
    check_number,
    check_positions,
    check_positions_values,
    check_same,
    check_tensor,
)
from vreason_kernels.backend import resolve_backend

# keep_ratio * S is rounded up; the tolerance stops float error (0.3 * 10 = 3.0000000000000004)
# from keeping one row more than the ratio means.
_CEIL_TOL = 1e-9


def _check_span(span: object, n: int) -> Tensor:
    check_positions_values("span", check_positions("span", span), n)
    return span.long()


def _keep_count(keep_ratio: object, s: int) -> int:
    check_number("keep_ratio", keep_ratio, low=0.0, high=1.0, low_open=True)
    if s == 0:
        return 0
    return min(s, max(1, math.ceil(float(keep_ratio) * s - _CEIL_TOL)))


def _kept_positions(value: Tensor, span: Tensor, n_keep: int) -> Tensor:
    """int64 ``[B, N - S + n_keep]``: positions kept in each batch row, increasing."""
    b, _, n, _ = value.shape
    norms = value.index_select(2, span).double().square().sum(dim=(1, 3))  # [B, S], squared norm: same order
    if torch.isnan(norms).any():
        raise ValueError("value has NaN in the span rows; their norms cannot be ranked")
    order = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :n_keep]
    keep = torch.ones(b, n, dtype=torch.bool, device=value.device)
    keep[:, span] = False
    keep.scatter_(1, span[order], True)
    # Every row keeps the same count, so the boolean selection reshapes to [B, N_kept].
    return torch.arange(n, device=value.device).expand(b, n)[keep].view(b, n - span.numel() + n_keep)


_MISSING = object()


def prune_kv(key: Tensor, value: Tensor, span, *args, keep_ratio: float = _MISSING, backend: str = "auto"):
    """Drop the span positions with the smallest value norm from one layer's KV cache.

    Args:
        key, value: ``[B, Hkv, N, D]`` (HF cache layout), same shape, dtype and device.
        span: sorted unique positions in ``[0, N)`` (e.g. the video tokens): an int32/int64
            ``[S]`` tensor, or a list, tuple or ``range`` of ints.
        keep_ratio: keyword, in ``(0, 1]``; ``ceil(keep_ratio * S)`` span positions are
            kept. Passing it positionally still works for this release, with a
            ``DeprecationWarning``.
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``, checked against the
            tensors' device as for the other ops; the op is a sort and a gather, which
            every backend runs in PyTorch.

    Returns:
        ``(key, value, kept_positions)``: key/value ``[B, Hkv, N_kept, D]`` with
        ``N_kept = N - S + ceil(keep_ratio * S)``, and ``kept_positions`` int64
        ``[B, N_kept]``, the original positions kept, in increasing order. Positions
        outside ``span`` are always kept. Within the span, each batch row keeps the
        positions with the largest ``||value[b, :, i, :]||`` (over all kv heads and
        head_dim); equal norms favour the earlier position. With nothing to drop the
        input tensors are returned as they are.
    """
    keep_ratio = _keep_ratio_argument(args, keep_ratio)
    check_tensor("key", key, ndim=4)
    check_tensor("value", value, ndim=4)
    if key.shape != value.shape:
        raise ValueError(
            f"key and value must have the same shape [B, Hkv, N, D], got {tuple(key.shape)} and {tuple(value.shape)}"
        )
    check_device_type("key", key)
    check_same("dtype", "key", key, [("value", value)])
    span = as_positions("span", span, key.device)
    check_same("device", "key", key, [("value", value), ("span", span)])
    resolve_backend(backend, key.device)
    b, _, n, _ = key.shape
    span = _check_span(span, n)
    n_keep = _keep_count(keep_ratio, span.numel())
    if n_keep == span.numel():
        return key, value, torch.arange(n, device=key.device).expand(b, n).clone()
    kept = _kept_positions(value, span, n_keep)
    index = kept[:, None, :, None].expand(b, key.shape[1], kept.shape[1], key.shape[3])
    return key.gather(2, index), value.gather(2, index), kept


def _keep_ratio_argument(args: tuple, keep_ratio):
    """``keep_ratio`` from the keyword, or (deprecated) the one positional argument after ``span``."""
    if len(args) > 1:
        raise TypeError(f"prune_kv takes key, value and span positionally, got {3 + len(args)} positional arguments")
    if args:
        if keep_ratio is not _MISSING:
            raise TypeError("prune_kv got keep_ratio both positionally and as a keyword")
        warnings.warn("prune_kv: pass keep_ratio as a keyword (prune_kv(key, value, span, keep_ratio=...)); "
                      "the positional form goes in the next release", DeprecationWarning, stacklevel=3)
        return args[0]
    if keep_ratio is _MISSING:
        raise TypeError("prune_kv missing the keyword argument keep_ratio")
    return keep_ratio


def prune_cache(cache, span: Tensor, keep_ratio: float) -> Tensor:
    """Apply :func:`prune_kv` to every layer of a transformers ``DynamicCache``, in place.

    Each layer ranks the span rows by its OWN value norms, so layers may keep different
    positions; the count rule gives every layer the same length ``N_kept``.

    Returns:
        int64 ``[L, B, N_kept]``: the original positions each layer kept (see
        :func:`pruned_span` for where the span went).

    What the caller must do afterwards:
        - RoPE positions continue from the ORIGINAL length: pass ``position_ids``
          (for mRoPE models the 3-D ids / ``rope_deltas`` of the unpruned prompt) counting
          from ``N``, not from ``cache.get_seq_length()``, which is now ``N_kept``.
        - The 2-D ``attention_mask`` has the PRUNED length: ``N_kept`` + new tokens.
        - A span used for ``value_delta_attention`` afterwards lives at
          ``pruned_span(kept_positions, span)`` in the pruned cache.
    """
    layers = getattr(cache, "layers", None)
    if layers is None or not layers:
        raise TypeError(f"cache must be a transformers DynamicCache with layers, got {type(cache).__name__}")
    from transformers.cache_utils import DynamicLayer

    for i, layer in enumerate(layers):
        # Subclasses (sliding window, static) keep positions by rules pruning would break.
        if type(layer) is not DynamicLayer:
            raise TypeError(f"cache layer {i} must be a DynamicLayer (full attention), got {type(layer).__name__}")
        if not layer.is_initialized or layer.keys.numel() == 0:
            raise ValueError(f"cache layer {i} is empty; prune after prefill")
    kept = []
    for layer in layers:
        layer.keys, layer.values, positions = prune_kv(layer.keys, layer.values, span, keep_ratio=keep_ratio)
        kept.append(positions)
    return torch.stack(kept)


def pruned_span(kept_positions: Tensor, span: Tensor) -> Tensor:
    """Indices in the pruned sequence of the span positions that were kept, int64 ``[S_kept]``.

    ``kept_positions`` is ``[..., N_kept]`` (from :func:`prune_kv` or :func:`prune_cache`).
    A contiguous span (one video) always maps to the same indices; a split span can map
    differently per batch row or layer, which raises a ``ValueError`` since one span tensor
    cannot describe it.
    """
    check_tensor("kept_positions", kept_positions, min_ndim=1, floating=False)
    span = as_positions("span", span, kept_positions.device)
    check_tensor("span", span, ndim=1, floating=False)
    in_span = torch.isin(kept_positions, span.to(kept_positions.device))
    rows = in_span.reshape(-1, in_span.shape[-1])
    if not bool((rows == rows[:1]).all()):
        raise ValueError(
            "the kept span positions sit at different pruned indices across batch rows or layers; "
            "pruned_span needs them to agree (a contiguous span always does)"
        )
    return rows[0].nonzero().flatten()
