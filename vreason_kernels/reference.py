"""Naive V-Reason decoding: the algorithm of ``vk.generate`` written plainly, as the
paper's authors likely did. For tests and as the benchmark baseline.

Differences from the fused engine are in the *how*, never the *what*:

- ``V' = (V + ΔV) ||V|| / ||V + ΔV||`` is materialised into a copy of the controlled
  layer's value cache, which temporarily replaces the cached values for the forward.
- Attention is the model's stock implementation (SDPA unless loaded otherwise).
- Full logits come from the model's own ``lm_head``; ``H = -Σ p log p`` via log_softmax.
- On update steps the whole token forward runs with autograd on (only the controlled
  layer onwards builds a graph, since the weights are frozen); extra optimizer steps
  crop the token from the cache and run the full forward again.

Same semantics as ``vk.generate``: the token at step ``k`` comes from the logits before
the update, updates run on decode forwards ``t = k - 1`` with ``t % every == 0``.
No NaN handling beyond what ``DeltaV`` does, and no sync-free bookkeeping.
"""

import math
from typing import Callable, Optional

import torch

from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.engine.controller import DeltaV
from vreason_kernels.engine.guard import span_value_norms, warn_nan_resets, warn_runaway
from vreason_kernels.engine.hf_cache import cache_kwargs, output_cache
from vreason_kernels.engine.loop import is_update_step
from vreason_kernels.engine.model_parts import prefill_position_ids, restored_model
from vreason_kernels.engine.output import VReasonOutput
from vreason_kernels.engine.run import prepare_run
from vreason_kernels.engine.sampling import select_next_token
from vreason_kernels.engine.spans import lite_prune
from vreason_kernels.ops.value_delta_attention.naive import modulate_rows

__all__ = ["generate"]


def generate(
    model,
    input_ids: torch.Tensor,
    *,
    config: Optional[VReasonConfig] = None,
    span: Optional[torch.Tensor] = None,
    max_new_tokens: Optional[int] = None,
    max_length: Optional[int] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    eos_token_id=None,
    pad_token_id: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    progress: Optional[Callable[[int], None]] = None,
    **model_inputs,
) -> VReasonOutput:
    """Same signature, arguments, defaults (V-Reason on) and output as :func:`vreason_kernels.generate`."""
    run = prepare_run(
        model, input_ids, config, span, max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, generator=generator, progress=progress, model_inputs=model_inputs,
    )
    config, request, layer, recorder = run.config, run.request, run.layer, run.recorder
    spans, enabled = run.spans, run.enabled
    if request.max_new_tokens == 0:
        return recorder.output(updates=0, nan_resets=0, span_size=spans.size if enabled else 0)

    with restored_model(model), torch.no_grad():
        mask = request.attention_mask
        positions = prefill_position_ids(model, request)
        out = model(
            input_ids=request.input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
            **request.model_inputs,
        )
        cache, logits = output_cache(out), out.logits[:, -1]
        delta = None
        if enabled:
            if config.keep_ratio < 1.0:
                mask, spans = lite_prune(cache, mask, spans, config.keep_ratio, layer)
            span = spans.positions
            v = cache.layers[layer].values
            delta = DeltaV(config, (v.shape[0], v.shape[1], spans.size, v.shape[3]), v.device, spans.member)
            value_norms = span_value_norms(v, span, spans.member)
        recorder.mark_prefill_done()

        def token_forward(token, with_grad):
            """Forward one token with V' in the controlled layer's cache; restore V after."""
            values = cache.layers[layer].values
            try:
                with torch.set_grad_enabled(with_grad):
                    if delta is not None:
                        modulated = modulate_rows(values[:, :, span], delta.delta.to(values.dtype))
                        cache.layers[layer].values = values.index_copy(2, span, modulated)
                    logits = model(
                        input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                        use_cache=True, **cache_kwargs(model, cache),
                    ).logits[:, -1]
            finally:
                appended = cache.layers[layer].values[:, :, values.shape[2]:]
                cache.layers[layer].values = torch.cat([values, appended], dim=2)
                for lyr in cache.layers:  # no graph kept across tokens
                    lyr.keys, lyr.values = lyr.keys.detach(), lyr.values.detach()
            return logits

        def entropy_of(logits):
            logp = torch.log_softmax(logits.float(), dim=-1)
            return -(logp.exp() * logp).sum(-1)

        ema = peak = None
        updates = 0
        for k in range(1, request.max_new_tokens + 1):
            update = delta is not None and is_update_step(k, config.every)
            if k > 1:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[..., -1:] + 1
                logits = token_forward(token, with_grad=update)
            with torch.set_grad_enabled(update):
                entropy = entropy_of(logits)
            h = entropy.detach()
            if ema is None:
                ema = h.clone() if config.ema_init == "first" else torch.zeros_like(h)
            ema = config.ema_beta * ema + (1 - config.ema_beta) * h
            peak = ema.clone() if peak is None else torch.maximum(peak, ema)
            alpha = torch.where(ema < peak, -1.0, 1.0)
            if update:
                log_vocab = math.log(logits.shape[-1])
                for step in range(config.steps):
                    if step > 0:
                        cache.crop(-1)  # drop the token, to run it again
                        with torch.enable_grad():
                            entropy = entropy_of(token_forward(token, with_grad=True))
                    with torch.enable_grad():
                        loss = (alpha * (log_vocab - entropy)).sum()
                    delta.step(loss)
                updates += 1
            token = select_next_token(logits.detach(), **request.sampling)
            norms = delta.norms() if delta is not None else torch.zeros_like(h)
            token = recorder.record(k - 1, token, entropy=h, entropy_ema=ema, alpha=alpha, delta_norm=norms)
            if recorder.all_finished(k - 1):
                break
    nan_resets = int(delta.nan_resets) if delta is not None else 0
    warn_nan_resets(nan_resets)
    out = recorder.output(updates=updates, nan_resets=nan_resets, span_size=spans.size if enabled else 0)
    if delta is not None:
        warn_runaway(out.delta_norm, value_norms)
    return out
