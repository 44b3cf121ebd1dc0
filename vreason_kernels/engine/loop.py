"""``generate``: V-Reason decoding with the fused ops (the package's main entry point).

Per decode step ``k`` (token ``k`` of the answer):

1. Main forward of the previous token through the model without its LM head, under the
   ``"vreason"`` attention: the controlled layer attends with the current ``ΔV`` on the
   span rows of its value cache (the cache itself is never modified).
2. ``H_k`` and the logits come from one fused pass ``vk.linear_entropy`` over the final
   hidden state and the LM-head weight.
3. EMA, peak and ``α_k`` are updated on device.
4. On update steps, ``config.steps`` optimizer steps on ``ΔV`` with the loss
   ``α_k (log|V| - H_k)``; the gradient flows only through the controlled layer for the
   current token, the final norm and the fused entropy. When the controlled layer is the
   last one (the default), the forward of step 1 runs under autograd from ``ΔV``, so the
   single fused pass of step 2 already yields ``dH/dh`` and the first optimizer step
   needs no re-run; further steps (and other layers) re-run the layer against the cache.
5. Token ``k`` is chosen from the logits of step 2, i.e. BEFORE the update: the update
   acts from token ``k + 1`` on. This keeps one model forward per token, and ``H_k`` is
   the entropy of the distribution token ``k`` was actually drawn from.

The first token comes from the prefill, where no value cache exists yet to modulate;
updates therefore run on decode forwards ``t = k - 1 = 1, 2, ...`` with ``t % every == 0``.
"""

from contextlib import ExitStack
from functools import partial
from typing import Callable, Optional

import torch

from vreason_kernels.engine.attention import ValueDeltaContext, vreason_attention
from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.engine.controller import DeltaV, EntropySwitch, LayerRerun, fused_update
from vreason_kernels.engine.guard import span_value_norms, warn_nan_resets, warn_runaway
from vreason_kernels.engine.hf_cache import cache_kwargs, output_cache
from vreason_kernels.engine.model_parts import prefill_position_ids, restored_model
from vreason_kernels.engine.output import VReasonOutput
from vreason_kernels.engine.run import Run, prepare_run
from vreason_kernels.engine.sampling import select_next_token
from vreason_kernels.engine.spans import lite_prune

__all__ = ["decode", "generate", "is_update_step"]


def is_update_step(k: int, every: int) -> bool:
    """Whether token ``k`` (1-based) triggers an update: decode forward ``k - 1`` is a multiple of ``every``."""
    return k > 1 and (k - 1) % every == 0


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
    """Decode with V-Reason inference-time entropy control.

    Args:
        model: a Hugging Face causal LM (or Qwen2.5-VL) with a linear LM head. It is
            left exactly as it was (attention implementation, hooks, ``requires_grad``).
        input_ids: ``[B, L]`` int64 prompts, left-padded when ``B > 1`` (pass
            ``attention_mask`` then).
        config: a :class:`VReasonConfig` (default ``None``: ``VReasonConfig()``, V-Reason
            on). ``VReasonConfig(enabled=False)`` decodes plainly through the same loop:
            the baseline.
        span: the prompt positions whose value rows get ``ΔV``, per batch row: one int
            ``[S]`` tensor for every row, a list of ``B`` int ``[S_b]`` tensors, or an int
            ``[B, S]`` tensor whose shorter rows end in ``-1`` padding; each row sorted
            unique in ``[0, L)``. Rows may differ (left-padded videos at different
            positions, of different lengths): each row gets its own ``ΔV`` rows and Lite
            pruning, and decodes as it would alone. Positions ``attention_mask`` hides are
            dropped. Default, per row: its video tokens, else its image tokens, else its
            whole (unpadded) prompt. An empty span decodes plainly with a warning. Lite
            mode (``config.keep_ratio < 1``) prunes video tokens only: without ``span``
            every row must hold video tokens, else ``ValueError`` before any model call.
        max_new_tokens: number of tokens to generate at most (default 256; 0 returns at once).
        max_length: the alternative to ``max_new_tokens``, as in ``model.generate``:
            prompt length plus new tokens. Passing both is an error.
        do_sample: sample instead of greedy decoding (default ``False``).
        temperature, top_k, top_p, min_p: sampling controls (defaults 1.0, 0, 1.0, 0.0:
            off), applied in that order when ``do_sample``. The controller's entropy is
            always taken at temperature 1 over the whole vocabulary.
        eos_token_id: int or list of ints (default: ``model.generation_config``). Finished
            samples are checked every ``EOS_CHECK_INTERVAL`` (= 8) tokens, the loop's only
            host-device sync; later slots hold ``pad_token_id``.
        pad_token_id: default ``generation_config.pad_token_id``, else the first EOS id.
        generator: a ``torch.Generator`` on the model's device, for reproducible sampling.
        progress: called on the host after each decode step with the number of steps
            done (a progress bar); it gets no tokens, so it adds no host-device sync.
        **model_inputs: ``attention_mask`` and prefill-only inputs such as
            ``pixel_values_videos``, ``video_grid_thw``, ``second_per_grid_ts``,
            ``mm_token_type_ids`` (Qwen2.5-VL). ``model.generate`` options that this
            function does not implement (``num_beams``, ``streamer``, ``output_scores``,
            ...) are refused by name.

    Returns:
        :class:`VReasonOutput` with ``sequences`` and ``[B, new]`` traces.

    Warns:
        once per call when ``ΔV`` outgrew the values it modulates (see
        :data:`~vreason_kernels.engine.guard.RUNAWAY_RATIO`), and when ``ΔV`` went
        NaN/Inf and was reset.
    """
    run = prepare_run(
        model, input_ids, config, span, max_new_tokens=max_new_tokens, max_length=max_length, do_sample=do_sample,
        temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, generator=generator, progress=progress, model_inputs=model_inputs,
    )
    choose = partial(select_next_token, **run.request.sampling, vocab=run.parts.vocab_rows)
    return decode(model, run, choose)


def decode(model, run: Run, choose: Callable[[torch.Tensor], torch.Tensor], *,
           positions: Optional[torch.Tensor] = None) -> VReasonOutput:
    """The decode loop of a prepared ``run``, shared by ``generate`` and the ``model.generate``
    integration: they differ only in ``choose`` (logits ``[B, V]``, detached, in the head's
    dtype -> next token ``[B]``) and in the run's recorder, which knows when a row ends.
    ``positions``: the prompt's position ids where the caller has them already (the
    integration: ``model.generate`` builds them, then may encode away the video inputs they
    are built from); default ``prefill_position_ids``, the same function's result.
    The model is left as it was found, also on exceptions."""
    config, parts, request, layer, recorder = run.config, run.parts, run.request, run.layer, run.recorder
    if request.max_new_tokens == 0:
        return recorder.output(updates=0, nan_resets=0, span_size=run.spans.size if run.enabled else 0)
    with ExitStack() as stack:
        stack.enter_context(restored_model(model))
        stack.enter_context(torch.no_grad())
        context = rerun = None
        if run.enabled:
            context = ValueDeltaContext(layers=(layer,), span=run.spans.positions, backend=config.backend)
            stack.enter_context(vreason_attention(model, context))
            rerun = LayerRerun(parts.layers, layer)
            stack.callback(rerun.remove)
        return _decode(model, parts, request, recorder, config, layer, context, rerun, run.spans, choose, positions)


def _decode(model, parts, request, recorder, config, layer, context, rerun, spans, choose, positions) -> VReasonOutput:
    mask = request.attention_mask
    if positions is None:
        positions = prefill_position_ids(model, request)
    out = parts.base(
        input_ids=request.input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
        **request.model_inputs,
    )
    cache = output_cache(out)
    hidden = out.last_hidden_state[:, -1]
    delta = None
    if context is not None:
        if config.keep_ratio < 1.0:
            mask, spans = lite_prune(cache, mask, spans, config.keep_ratio, layer)
            context.span = spans.positions
        values = cache.layers[layer].values
        shape = (values.shape[0], values.shape[1], spans.size, values.shape[3])
        process_group = parts.kv_process_group(layer)
        delta = DeltaV(config, shape, values.device, spans.member, process_group=process_group)
        value_norms = span_value_norms(values, spans.positions, spans.member, process_group)
        context.delta_v[layer] = delta.delta.detach().to(values.dtype)
    recorder.mark_prefill_done()
    switch = EntropySwitch(config.ema_beta, config.ema_init)
    zeros = torch.zeros(request.batch, device=mask.device)
    updates = 0
    last_layer = layer == len(parts.layers) - 1
    for k in range(1, request.max_new_tokens + 1):
        update = delta is not None and is_update_step(k, config.every)
        # With the last layer controlled, only it and the final norm depend on ΔV, so the
        # token's own forward can build the graph from ΔV: one fused pass over the LM head
        # then gives H_k, the logits and dH/dh together (no re-run, no second read of W).
        in_graph = update and last_layer
        with torch.set_grad_enabled(in_graph):
            if in_graph:
                context.delta_v[layer] = delta.delta.to(cache.layers[layer].values.dtype)
            if k > 1:
                mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
                positions = positions[..., -1:] + 1
                out = parts.base(
                    input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                    use_cache=True, **cache_kwargs(parts.base, cache),
                )
                hidden = out.last_hidden_state[:, -1]
            entropy, logits = parts.entropy(hidden, return_logits=True, backend=config.backend)
        ema, alpha = switch.observe(entropy)
        if update:
            fused_update(config, delta, rerun, context, cache, parts, alpha, entropy if in_graph else None)
            updates += 1
        token = choose(logits.detach())
        token = recorder.record(
            k - 1, token, entropy=entropy.detach(), entropy_ema=ema, alpha=alpha,
            delta_norm=delta.norms() if delta is not None else zeros,
        )
        if recorder.all_finished(k - 1):
            break
    nan_resets = int(delta.nan_resets) if delta is not None else 0
    warn_nan_resets(nan_resets)
    out = recorder.output(updates=updates, nan_resets=nan_resets, span_size=spans.size if context else 0)
    if delta is not None:
        warn_runaway(out.delta_norm, value_norms)
    return out

