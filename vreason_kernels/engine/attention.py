"""``attn_implementation="vreason"``: value-delta attention inside transformers' own model code.

Nothing is monkey-patched. The attention function is registered in transformers'
``AttentionInterface`` (and SDPA's mask builder in ``AttentionMaskInterface``, so padding
masks reach it exactly as they reach SDPA). Modelling files then call it through the
``config._attn_implementation`` dispatch they already have.

Which layer gets a delta is decided per model by a :class:`ValueDeltaContext`, attached
to the attention modules of the chosen decoder layers by :func:`vreason_attention`. Every
other attention call (other layers, a vision tower, a model loaded with
``attn_implementation="vreason"`` but no context) passes through to plain attention:
flash-attn when installed and applicable, else transformers' ``sdpa_attention_forward``.
"""

import functools
import importlib.util
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Optional, Union

import torch
from torch import Tensor

from vreason_kernels._checks import check_tensor
from vreason_kernels.backend import check_backend
from vreason_kernels.ops.value_delta_attention import value_delta_attention

IMPLEMENTATION = "vreason"
# Attribute that binds a context to an attention module; removed on exit.
_CONTEXT_ATTR = "_vreason_context"
# Attention kwargs that change the result and that the direct flash-attn call does not apply.
_FLASH_UNSUPPORTED_KWARGS = ("softcap", "position_bias", "s_aux", "cu_seq_lens_q", "cu_seq_lens_k")


@dataclass
class ValueDeltaContext:
    """What the ``"vreason"`` attention does in each decoder layer of one model.

    Attributes:
        layers: decoder layer indices that get the delta; negative indices count from the
            end (default: the last layer). :func:`vreason_attention` rewrites them to
            non-negative indices on entry; ``delta_v``, ``kv_override`` and
            ``mask_override`` are keyed by those.
        span: int ``[S]`` sorted unique positions in the cached sequence that carry the delta.
        delta_v: layer index -> ``[B, Hkv, S, D]`` (may require grad; cast to the query
            dtype). A layer with a delta and a span runs ``value_delta_attention``, which
            is differentiable in the query and the delta: its keys and values (the
            cache) are constants for autograd, so the model need not be frozen, and that
            layer's key/value projections get no gradient.
        kv_override: layer index -> ``(key, value)`` full cached tensors ``[B, Hkv, N, D]``
            to attend over INSTEAD of the ones passed in. For re-running one decoder layer on
            the current token(s) with ``past_key_values=None``: the cache already holds those
            tokens, so the queries are the LAST ``T`` rows of the override (bottom-right causal).
        mask_override: layer index -> mask used with ``kv_override`` (boolean, True = attend,
            or additive), broadcastable to ``[B, 1 | Hq, T, N]``; without one only the causal
            rule applies. The mask passed in by the model is ignored under an override, since
            it was built for the passed-in key length.
        backend: ``value_delta_attention`` backend.
    """

    layers: tuple[int, ...] = (-1,)
    span: Optional[Tensor] = None
    delta_v: dict[int, Tensor] = field(default_factory=dict)
    kv_override: dict[int, tuple[Tensor, Tensor]] = field(default_factory=dict)
    mask_override: dict[int, Tensor] = field(default_factory=dict)
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.layers, (tuple, list)):
            raise TypeError(f"layers must be a non-empty tuple of ints, got {self.layers!r}")
        self.layers = tuple(self.layers)
        for name in ("delta_v", "kv_override", "mask_override"):
            if not isinstance(getattr(self, name), dict):
                raise TypeError(f"{name} must be a dict keyed by layer index, got {type(getattr(self, name)).__name__}")
        if not self.layers or not all(isinstance(i, int) and not isinstance(i, bool) for i in self.layers):
            raise TypeError(f"layers must be a non-empty tuple of ints, got {self.layers!r}")
        check_backend(self.backend)
        if self.span is not None:
            check_tensor("span", self.span, ndim=1, floating=False)
            if self.span.dtype not in (torch.int32, torch.int64):
                raise TypeError(f"span must be an int32/int64 tensor of positions, got {self.span.dtype}")


def register() -> None:
    """Register ``"vreason"`` with transformers (idempotent; runs on ``import vreason_kernels.integrations``
    and on entering :func:`vreason_attention`).

    The mask builder is SDPA's: without one, transformers passes no mask at all to an
    unknown implementation and padding would be ignored.
    """
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(IMPLEMENTATION, vreason_attention_forward)
    AttentionMaskInterface.register(IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


@functools.cache
def _flash_attn_func():
    if importlib.util.find_spec("flash_attn") is None:
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def _sdpa_causal(module, query: Tensor, key: Tensor, value: Tensor, attention_mask, is_causal):
    """Causality as transformers' SDPA path reads it: ``(key, value, causal)``.

    A given mask already holds the causal pattern. With no mask, ``T > 1`` is causal
    unless the module says otherwise (vision towers). transformers passes no mask with
    ``N > T > 1`` only for a prefill into an empty static cache, where SDPA's causal mask
    is top-left aligned and the keys past ``T`` are unwritten: they are cut, as SDPA does.
    """
    t, n = query.shape[2], key.shape[2]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    causal = attention_mask is None and t > 1 and bool(is_causal)
    if causal and n > t:
        key, value = key[:, :, :t], value[:, :, :t]
    return key, value, causal


def _plain_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    """flash-attn (CUDA fp16/bf16, no mask to apply) or else transformers' SDPA; ``[B, T, Hq, D]``."""
    flash = _flash_attn_func()
    if (
        flash is not None
        and attention_mask is None
        and query.is_cuda
        and query.dtype in (torch.float16, torch.bfloat16)
        and not any(kwargs.get(name) is not None for name in _FLASH_UNSUPPORTED_KWARGS)
    ):
        key, value, causal = _sdpa_causal(module, query, key, value, None, kwargs.get("is_causal"))
        # flash-attn takes [B, T, H, D] and handles GQA itself.
        out = flash(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
            dropout_p=dropout, softmax_scale=scaling, causal=causal,
        )  # fmt: skip
        return out, None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)


def _value_delta_forward(
    module, context: ValueDeltaContext, layer: int, query, key, value, attention_mask, scaling, dropout, kwargs
):
    """``value_delta_attention`` for a bound layer, honouring its kv override; ``[B, T, Hq, D]``."""
    if dropout:
        raise ValueError(f"vreason attention does not apply dropout (got dropout={dropout}); call model.eval()")
    override = context.kv_override.get(layer)
    n_passed = key.shape[2]
    if override is not None:
        key, value = override
        attention_mask = context.mask_override.get(layer)
        causal = True
    else:
        key, value, causal = _sdpa_causal(module, query, key, value, attention_mask, kwargs.get("is_causal"))
    # The keys and values here are the cache (or the current token's rows of it): V-Reason
    # differentiates ΔV (and, through the query, the layers below), never the cache, and
    # the op takes no gradient for them. Detaching lets a model whose weights still require
    # grad run without being frozen first; this layer's k/v projections get no gradient.
    key, value = key.detach(), value.detach()
    delta_v, span = context.delta_v.get(layer), None
    if delta_v is not None:
        if context.span is None:
            raise ValueError(f"ValueDeltaContext.delta_v[{layer}] is set but span is None")
        span = context.span.to(query.device)
        delta_v = delta_v.to(query.dtype)
        if override is None and key.shape[2] < n_passed:
            # The static-cache cut above: span rows past T are seen by no query. Tested on
            # shapes, so ordinary decoding never syncs with the device here.
            visible = span < key.shape[2]
            span, delta_v = span[visible], delta_v[:, :, visible]
    out = value_delta_attention(
        query, key, value, delta_v, span,
        attention_mask=attention_mask, scale=scaling, causal=causal, backend=context.backend,
    )  # fmt: skip
    return out.transpose(1, 2).contiguous()


def vreason_attention_forward(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Optional[Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[Tensor, None]:
    """The transformers attention function for ``attn_implementation="vreason"``.

    ``query [B, Hq, T, D]``, ``key/value [B, Hkv, N, D]`` (un-repeated, from the cache),
    ``attention_mask`` as built for SDPA (None or a 4-D boolean/additive mask). Returns
    ``(attn_output [B, T, Hq, D], None)``. A module bound to a context (see
    :func:`vreason_attention`) whose layer has a delta (which needs ``context.span``) or a
    kv override runs ``value_delta_attention``; every other call is plain attention.
    """
    context = getattr(module, _CONTEXT_ATTR, None)
    if context is not None:
        layer = module.layer_idx
        if layer in context.kv_override or layer in context.delta_v:
            out = _value_delta_forward(
                module, context, layer, query, key, value, attention_mask, scaling, dropout, kwargs
            )
            return out, None
    return _plain_attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)


def _attention_modules(model) -> list[torch.nn.Module]:
    """The self-attention module of each decoder layer, by layer index."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise TypeError(f"model: {type(model).__name__} has no decoder with .layers (get_decoder().layers)")
    modules = [getattr(layer, "self_attn", None) for layer in layers]
    if any(m is None or getattr(m, "layer_idx", None) != i for i, m in enumerate(modules)):
        raise TypeError(f"model: every decoder layer of {type(model).__name__} needs a .self_attn with its layer_idx")
    return modules


def _implementation_spec(config) -> Union[str, dict]:
    """The attention implementation of ``config`` and its sub-configs, in set_attn_implementation's format."""
    own = config._attn_implementation
    subs = {}
    for name in getattr(config, "sub_configs", {}):
        sub = getattr(config, name, None)
        if sub is not None:
            subs[name] = _implementation_spec(sub)
    if all(spec == own for spec in subs.values()):
        return own
    return {"": own, **subs}


@contextmanager
def vreason_attention(model, context: ValueDeltaContext):
    """Run ``model`` with ``attn_implementation="vreason"`` and ``context`` bound to its layers.

    On entry: registers the implementation, normalises ``context.layers`` to non-negative
    indices, switches the model (``model.set_attn_implementation``) and sets an attribute
    on the attention module of each chosen layer. On exit, also when the body raises, the
    attributes are removed and the previous implementation (per sub-config) is restored.
    Contexts do not nest on one model. Yields ``context``.
    """
    if not isinstance(context, ValueDeltaContext):
        raise TypeError(f"context must be a ValueDeltaContext, got {type(context).__name__}")
    register()
    modules = _attention_modules(model)
    n = len(modules)
    bad = [i for i in context.layers if not -n <= i < n]
    if bad:
        raise ValueError(f"context.layers must index the model's {n} decoder layers, got {bad}")
    if any(hasattr(m, _CONTEXT_ATTR) for m in modules):
        raise RuntimeError("model is already inside a vreason_attention context; contexts do not nest")
    context.layers = tuple(sorted({i % n for i in context.layers}))
    previous = _implementation_spec(model.config)
    try:
        model.set_attn_implementation(IMPLEMENTATION)
        # transformers only warns when a model cannot switch; a silent no-op would drop the delta.
        if model.get_decoder().config._attn_implementation != IMPLEMENTATION:
            raise RuntimeError(
                f"model: {type(model).__name__} did not switch to attn_implementation={IMPLEMENTATION!r}"
            )
        for i in context.layers:
            setattr(modules[i], _CONTEXT_ATTR, context)
        yield context
    finally:
        for m in modules:
            if _CONTEXT_ATTR in vars(m):
                delattr(m, _CONTEXT_ATTR)
        model.set_attn_implementation(previous)
