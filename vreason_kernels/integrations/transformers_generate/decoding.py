"""V-Reason inside ``model.generate``, the callable form of transformers' ``custom_generate``::

    out = model.generate(input_ids, custom_generate=vreason_decoding, vreason=VReasonConfig(), max_new_tokens=64)

Transformers prepares the call as for its own sampling loop (generation config, logits
processors, stopping criteria, attention mask, multimodal inputs) and hands it over;
``vreason`` reaches us because it is a parameter of ``vreason_decoding`` that transformers'
``_sample`` lacks. The decoding itself is the engine's: ``prepare_run`` and ``decode``,
exactly as ``vk.generate`` runs them, with ``GenerateSteps`` for the token choice and the
stopping rules (docs/hf-generate.md).
"""

import inspect
import sys

from vreason_kernels.engine.loop import decode
from vreason_kernels.engine.recorder import Recorder
from vreason_kernels.engine.run import prepare_run
from vreason_kernels.integrations.transformers_generate.output import generate_output
from vreason_kernels.integrations.transformers_generate.steps import GenerateSteps
from vreason_kernels.integrations.transformers_generate.unsupported import (
    check_call_arguments,
    check_generation_config,
)

# What transformers prepares for its own loop; the engine builds its own cache. The prompt's
# position_ids are the engine's too (the same _prepare_position_ids_for_generation), and are
# taken as they are: transformers >= 5.25 then encodes the video into mm_encoder_outputs and
# drops video_grid_thw, which mRoPE positions are built from.
_PREPARED_FOR_ITS_LOOP = ("position_ids", "cache_position", "use_cache", "logits_to_keep")
_CACHE_NAMES = ("cache", "past_key_values")
# model.generate's own parameters that transformers does not hand to a custom_generate callable.
_NOT_HANDED_OVER = ("streamer", "assistant_model", "synced_gpus")


def vreason_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                     streamer=None, vreason=None, **model_kwargs):
    """V-Reason decoding as a ``custom_generate`` callable of ``model.generate``.

    Pass it as ``model.generate(..., custom_generate=vreason_decoding, vreason=VReasonConfig(...))``
    with ``model.generate``'s usual arguments; ``vreason=None`` is ``VReasonConfig()``
    (V-Reason on), ``VReasonConfig(enabled=False)`` decodes plainly. Returns what
    ``model.generate`` returns: the sequences, or with ``return_dict_in_generate=True`` a
    :class:`VReasonGenerateOutput` whose ``vreason`` field holds the traces.

    A ``streamer`` given to ``model.generate`` is refused: transformers does not pass it to a
    callable, so it could not get the tokens; the folder form
    (``custom_generate=vk.GENERATE_RECIPE, trust_remote_code=True``) streams.
    """
    given = _generate_call_arguments()
    if streamer is None and given.get("streamer") is not None:
        raise ValueError(
            "streamer: transformers does not hand a streamer to a custom_generate callable, so it would get the "
            "prompt and no token; stream with the folder form instead: "
            "model.generate(..., custom_generate=vk.GENERATE_RECIPE, trust_remote_code=True, streamer=...)"
        )
    check_call_arguments(assistant_model=given.get("assistant_model"),
                         synced_gpus=synced_gpus or given.get("synced_gpus"))
    return run_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, vreason,
                        model_kwargs, streamer=streamer)


def _generate_call_arguments() -> dict:
    """``streamer``, ``assistant_model`` and ``synced_gpus`` as the caller gave them to ``model.generate``.

    Transformers hands a ``custom_generate`` callable only the parameters that its own
    ``_sample`` lacks, so these never arrive; unread, they would be dropped without a word.
    They are still locals of ``GenerationMixin.generate`` up the stack. Empty when called
    from elsewhere.
    """
    from transformers.generation.utils import GenerationMixin

    code = inspect.unwrap(GenerationMixin.generate).__code__
    frame = sys._getframe(1)
    try:
        while frame is not None and frame.f_code is not code:
            frame = frame.f_back
        return {} if frame is None else {name: frame.f_locals.get(name) for name in _NOT_HANDED_OVER}
    finally:
        del frame  # a frame kept alive would hold the whole call's tensors


def run_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, vreason, model_kwargs,
                 *, streamer=None, stream_prompt=False):
    """Decode one prepared ``model.generate`` call with the engine (both forms end here).

    ``stream_prompt``: hand the prompt to ``streamer`` first, which ``model.generate`` has
    done itself when it held the streamer.
    """
    check_generation_config(generation_config)
    model_inputs = _engine_inputs(model_kwargs)
    steps = GenerateSteps(input_ids, logits_processor, stopping_criteria, generation_config, streamer)
    pad = getattr(generation_config, "_pad_token_tensor", None)
    pad = generation_config.pad_token_id if pad is None else int(pad)

    def recorder(request):
        # A row ends when a stopping criterion says so (EOS among them), checked after every
        # token as transformers does: the criteria return a host-side decision anyway.
        return Recorder(request, row_end=steps.row_end, check_every=1, pad_finished=steps.pad_finished)

    max_length = generation_config.max_length
    run = prepare_run(
        model, input_ids, vreason, None, make_recorder=recorder,
        max_new_tokens=max(max_length - input_ids.shape[1], 0), max_length=None, do_sample=False, temperature=1.0,
        top_k=0, top_p=1.0, min_p=0.0, eos_token_id=[], pad_token_id=pad, generator=None, progress=None,
        model_inputs=model_inputs,
    )
    if run.parts.process_group is not None:
        raise ValueError("model: its LM head is sharded over the vocabulary (tensor parallelism), but logits processors "
                         "need whole rows; use vk.generate, which samples over a sharded head")
    if streamer is not None and stream_prompt:
        streamer.put(input_ids.cpu())
    out = decode(model, run, steps.choose, positions=model_kwargs.get("position_ids"))
    if streamer is not None:
        streamer.end()
    return generate_output(out, steps, generation_config)


def _engine_inputs(model_kwargs: dict) -> dict:
    """``model_kwargs`` less what transformers prepared for its own loop: the inputs the
    engine's prefill takes (attention mask, pixel values, grids, ...)."""
    inputs = {k: v for k, v in model_kwargs.items() if k not in _PREPARED_FOR_ITS_LOOP and k not in _CACHE_NAMES}
    for name in _CACHE_NAMES:
        cache = model_kwargs.get(name)
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError(f"{name}: V-Reason decoding starts from the prompt with a cache of its own; continuing "
                             "from a filled cache is not supported")
    if inputs.get("attention_mask") is None:
        inputs.pop("attention_mask", None)  # transformers drops a mask of all ones; the engine builds it again
    return inputs
