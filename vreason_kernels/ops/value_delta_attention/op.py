"""``value_delta_attention``: the public op, a ``torch.library`` custom op with autograd.

The public function validates the arguments, turns ``span`` into ``span_index [N]``
(position -> row of ``delta_v``, or -1) and a boolean mask into an additive f32 bias
(0 / -inf) expanded to ``[B, Hq, T, N]`` without copying, then calls the backend's
forward. The backward needs only ``lse`` from it: P is recomputed from lse, as in
flash-attention, and so is FA's row term ``D = rowsum(dO * O)``, as ``sum_j P_j dP_j``
from the fp32 dP (the output, rounded to the input dtype, would leave a row whose
softmax is one-hot a dQ of rounding noise instead of 0). The gradient of ``delta_v`` is
chained through §2.2 inside the backend (docs/design.md §2.3).
"""

from typing import Optional

import torch
from torch import Tensor

from vreason_kernels._checks import (
    as_positions,
    check_bool,
    check_device_type,
    check_number,
    check_positions,
    check_positions_values,
    check_same,
    check_tensor,
)
from vreason_kernels.backend import accumulator_dtype, backend_module, resolve_backend_for
from vreason_kernels.ops.value_delta_attention.contract import mask_to_bias


def _backend_impl(backend: str):
    return backend_module(__package__, backend)


@torch.library.custom_op("vreason::value_delta_span_index", mutates_args=())
def _span_index(span: Tensor, n: int) -> Tensor:
    """int32 [N]: row of ``delta_v`` at each span position, -1 elsewhere.

    A custom op so that the data-dependent checks of ``span`` run eagerly, also under
    ``torch.compile`` (traced code cannot branch on tensor values).
    """
    check_positions_values("span", span, n)
    index = torch.full((n,), -1, dtype=torch.int32, device=span.device)
    index[span.long()] = torch.arange(span.numel(), dtype=torch.int32, device=span.device)
    return index


@_span_index.register_fake
def _(span, n):
    return span.new_empty(n, dtype=torch.int32)


@torch.library.custom_op("vreason::value_delta_attention_fwd", mutates_args=())
def _attention_fwd(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    delta_v: Optional[Tensor],
    span_index: Tensor,
    attn_bias: Optional[Tensor],
    scale: float,
    causal: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    out, lse = _backend_impl(backend).forward(query, key, value, delta_v, span_index, attn_bias, scale, causal)
    _check_scores_fit(query, key, attn_bias, scale, lse)
    return out, lse


def _check_scores_fit(query: Tensor, key: Tensor, attn_bias: Optional[Tensor], scale: float, lse: Tensor) -> None:
    """A row whose scores ``scale q.k`` overflow the accumulator dtype gets lse = +inf or NaN
    (inf - inf in the softmax) from finite input: raise instead of returning its NaN/0 row.

    CPU only, and the input scan only when some lse is bad: on CUDA the check would cost a
    host sync per decode step, so there such rows stay NaN (as in PyTorch's SDPA). A NaN or
    +inf among the inputs makes NaN rows the expected, propagated result.
    """
    if lse.device.type != "cpu" or not bool((torch.isnan(lse) | (lse == float("inf"))).any()):
        return
    finite = bool(torch.isfinite(query).all()) and bool(torch.isfinite(key).all())
    if finite and (attn_bias is None or not bool((torch.isnan(attn_bias) | (attn_bias == float("inf"))).any())):
        raise ValueError(
            f"scale * query.key overflows {lse.dtype} for these inputs (scale = {scale}); "
            "use a smaller scale or smaller query/key values"
        )


@_attention_fwd.register_fake
def _(query, key, value, delta_v, span_index, attn_bias, scale, causal, backend):
    return torch.empty_like(query), query.new_empty(query.shape[:-1], dtype=accumulator_dtype(query.dtype))


@torch.library.custom_op("vreason::value_delta_attention_bwd", mutates_args=())
def _attention_bwd(
    grad_out: Tensor,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    delta_v: Optional[Tensor],
    span_index: Tensor,
    attn_bias: Optional[Tensor],
    scale: float,
    causal: bool,
    lse: Tensor,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _backend_impl(backend).backward(
        grad_out, query, key, value, delta_v, span_index, attn_bias, scale, causal, lse
    )


@_attention_bwd.register_fake
def _(grad_out, query, key, value, delta_v, span_index, attn_bias, scale, causal, lse, backend):
    acc = accumulator_dtype(query.dtype)
    grad_delta = query.new_empty(0, dtype=acc) if delta_v is None else delta_v.new_empty(delta_v.shape, dtype=acc)
    return query.new_empty(query.shape, dtype=acc), grad_delta


def _setup_context(ctx, inputs, output):
    query, key, value, delta_v, span_index, attn_bias, scale, causal, backend = inputs
    _, lse = output
    ctx.save_for_backward(query, key, value, delta_v, span_index, attn_bias, lse)
    ctx.scale, ctx.causal, ctx.backend = scale, causal, backend


def _backward(ctx, grad_out, _grad_lse):
    query, key, value, delta_v, span_index, attn_bias, lse = ctx.saved_tensors
    need_query, need_delta = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
    grad_query = grad_delta = None
    if need_query or need_delta:
        grad_query, grad_delta = _attention_bwd(
            grad_out.contiguous(), query, key, value, delta_v, span_index, attn_bias,
            ctx.scale, ctx.causal, lse, ctx.backend,
        )  # fmt: skip
        grad_query = grad_query.to(query.dtype) if need_query else None
        grad_delta = grad_delta.to(delta_v.dtype) if need_delta else None
    return grad_query, None, None, grad_delta, None, None, None, None, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def _check_args(query, key, value, delta_v, span, attention_mask, scale, causal) -> tuple:
    """Check every argument; return ``(span, attention_mask)`` in the forms the op takes
    (``as_positions``, ``_padding_mask``)."""
    check_tensor("query", query, ndim=4)
    check_device_type("query", query)
    check_tensor("key", key, ndim=4)
    check_tensor("value", value, ndim=4)
    b, hq, t, d = query.shape
    if min(query.shape) == 0:
        raise ValueError(f"query [B, Hq, T, D] must have no empty dim, got shape {tuple(query.shape)}")
    if key.shape != value.shape:
        raise ValueError(f"key and value must have the same shape, got {tuple(key.shape)} and {tuple(value.shape)}")
    bk, hkv, n, dk = key.shape
    if bk != b or dk != d or n == 0:
        raise ValueError(
            f"key/value must have shape [B, Hkv, N, D] = [{b}, Hkv, N >= 1, {d}] to match query, "
            f"got {tuple(key.shape)}"
        )
    if hkv == 0 or hq % hkv:
        raise ValueError(f"query heads Hq = {hq} must be a multiple of key/value heads Hkv = {hkv} (GQA)")
    if span is not None:
        span = as_positions("span", span, query.device)
    if attention_mask is not None:
        check_tensor("attention_mask", attention_mask, floating=False)
    tensors = [("key", key), ("value", value), ("delta_v", delta_v)]
    check_same("dtype", "query", query, tensors)
    check_same("device", "query", query, tensors + [("span", span), ("attention_mask", attention_mask)])
    if delta_v is not None:
        check_tensor("delta_v", delta_v, ndim=4)
        if span is None:
            raise ValueError("span is required when delta_v is given")
    if span is not None:
        check_positions("span", span)
        if delta_v is not None and delta_v.shape != (b, hkv, span.shape[0], d):
            raise ValueError(
                f"delta_v must have shape [B, Hkv, S, D] = {[b, hkv, span.shape[0], d]}, got {tuple(delta_v.shape)}"
            )
    if attention_mask is not None:
        if not (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()):
            attention_mask = _padding_mask(attention_mask, b, n)
        ok = attention_mask.dim() <= 4 and all(
            s in (1, full) for s, full in zip(attention_mask.shape[::-1], (n, t, hq, b))
        )
        if not ok:
            raise ValueError(
                f"attention_mask must be broadcastable to [B, 1 | Hq, T, N] = [{b}, 1 | {hq}, {t}, {n}], "
                f"got shape {tuple(attention_mask.shape)}"
            )
    if scale is not None:
        check_number("scale", scale)
    check_bool("causal", causal)
    for name, x in (("key", key), ("value", value)):
        if torch.is_grad_enabled() and x.requires_grad:
            raise ValueError(
                f"{name} requires grad, but value_delta_attention is differentiable only in query and delta_v; "
                f"pass {name}.detach() (the KV cache is frozen)"
            )
    return span, attention_mask


def _padding_mask(mask: Tensor, b: int, n: int) -> Tensor:
    """An integer ``attention_mask`` is transformers' 2-D padding mask: ``[B, N]`` of 1
    (attend) and 0 (padding), the same for every head and query. Returned as a boolean
    ``[B, 1, 1, N]``. On CUDA its values are checked on the device (no host sync)."""
    if mask.is_complex() or mask.dim() != 2 or tuple(mask.shape) != (b, n):
        raise TypeError(
            "attention_mask must be boolean (True = attend), floating (additive) or an integer 0/1 padding mask "
            f"[B, N] = [{b}, {n}], got {mask.dtype} of shape {tuple(mask.shape)}"
        )
    binary = ((mask == 0) | (mask == 1)).all()
    if mask.is_cuda:
        torch._assert_async(binary, "an integer attention_mask must hold only 0 and 1")
    elif not bool(binary):
        raise ValueError("attention_mask: an integer padding mask must hold only 0 (padding) and 1 (attend)")
    return mask.bool()[:, None, None, :]


def _last_dim_contiguous(x: Optional[Tensor]) -> Optional[Tensor]:
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def value_delta_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    delta_v: Optional[Tensor] = None,
    span: Optional[Tensor] = None,
    *,
    attention_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
    backend: str = "auto",
) -> Tensor:
    """Attention over a KV cache whose value rows at ``span`` carry a norm-preserving delta.

    Args:
        query: ``[B, Hq, T, D]`` float32/float16/bfloat16 (float64 with ``backend="torch"``).
        key, value: ``[B, Hkv, N, D]`` (HF cache layout), Hq a multiple of Hkv (GQA), same
            dtype and device as ``query``. Must not require grad.
        delta_v: optional ``[B, Hkv, S, D]``; value row ``span[j]`` becomes
            ``(v + delta_v[..., j, :]) ||v|| / max(||v + delta_v[..., j, :]||, 1e-6)``.
            ``None`` gives plain attention. The modulated V is never materialised by the
            fused backends.
        span: sorted unique positions in ``[0, N)``: an int32/int64 ``[S]`` tensor, or a
            list, tuple or ``range`` of ints.
        attention_mask: optional boolean (True = attend) or additive float mask
            broadcastable to ``[B, 1 | Hq, T, N]``, as transformers passes it to SDPA; or
            an integer 0/1 padding mask ``[B, N]`` (transformers' 2-D ``attention_mask``:
            1 = attend), applied to every head and query.
        scale: score scale, default ``1 / sqrt(D)``. Scores ``scale q.k`` that overflow
            float32 raise ``ValueError`` on CPU; on CUDA their rows come out NaN.
        causal: bottom-right aligned causal mask (query t sees key i iff i <= t + N - T).
        backend: ``"auto"`` (Triton on CUDA, C++ on CPU), ``"triton"``, ``"cpp"`` or ``"torch"``.

    Returns:
        ``[B, Hq, T, D]`` in ``query``'s dtype; rows that see no key are 0. Differentiable
        in ``query`` and ``delta_v``. NaN/Inf inputs are not checked (that would cost a
        pass over the cache every step): they propagate to NaN rows, as in PyTorch.
    """
    span, attention_mask = _check_args(query, key, value, delta_v, span, attention_mask, scale, causal)
    resolved = resolve_backend_for(backend, "query", query)
    b, hq, t, d = query.shape
    n = key.shape[2]
    span_index = None if span is None else _span_index(span, n)  # checks span's values too
    if delta_v is None:
        span_index = torch.full((n,), -1, dtype=torch.int32, device=query.device)
    attn_bias = mask_to_bias(attention_mask, accumulator_dtype(query.dtype))
    if attn_bias is not None:
        attn_bias = attn_bias.reshape((1,) * (4 - attn_bias.dim()) + attn_bias.shape).expand(b, hq, t, n)
    scale = float(d**-0.5 if scale is None else scale)
    out, _ = _attention_fwd(
        _last_dim_contiguous(query), _last_dim_contiguous(key), _last_dim_contiguous(value),
        _last_dim_contiguous(delta_v), span_index, _last_dim_contiguous(attn_bias), scale, bool(causal), resolved,
    )  # fmt: skip
    return out
