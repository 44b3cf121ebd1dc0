"""What V-Reason inside ``model.generate`` refuses, checked before any model forward.

The engine decodes one sequence per row with a KV cache it builds itself; the decoding
modes transformers implements differently (beam search, contrastive search, constrained
beams, assisted and speculative decoding) and the multi-process ``synced_gpus`` loop
would each need their own controller, so each is refused by the name of the argument
that asked for it.
"""

_SUPPORTED = ("greedy decoding and sampling (do_sample=True) with the usual logits processors and stopping "
              "criteria")


def _refuse(name: str, value, what: str) -> None:
    raise ValueError(f"V-Reason decoding does not support {name}={value!r} ({what}); it runs {_SUPPORTED}")


def check_generation_config(generation_config) -> None:
    """Refuse the modes a ``GenerationConfig`` asks for that the engine does not run."""
    num_beams = generation_config.num_beams
    if num_beams is not None and num_beams > 1:
        _refuse("num_beams", num_beams, "beam search")
    for name in ("prompt_lookup_num_tokens", "assistant_early_exit"):
        value = getattr(generation_config, name, None)
        if value is not None:
            _refuse(name, value, "assisted decoding")
    if getattr(generation_config, "use_mtp", False):
        _refuse("use_mtp", True, "assisted decoding with multi-token prediction")
    penalty_alpha, top_k = generation_config.penalty_alpha, generation_config.top_k
    if penalty_alpha is not None and penalty_alpha > 0 and top_k is not None and top_k > 1:
        _refuse("penalty_alpha", penalty_alpha, "contrastive search")
    for name in ("constraints", "force_words_ids"):
        value = getattr(generation_config, name, None)
        if value is not None:
            _refuse(name, value, "constrained beam search")
    if generation_config.return_dict_in_generate:
        for name in ("output_attentions", "output_hidden_states"):
            if getattr(generation_config, name, False):
                _refuse(name, True, "the engine's fused LM-head pass keeps no attention maps or hidden states")


def check_call_arguments(*, assistant_model=None, synced_gpus=None) -> None:
    """Refuse the ``model.generate`` arguments that are not part of the generation config."""
    if assistant_model is not None:
        _refuse("assistant_model", type(assistant_model).__name__, "assisted decoding")
    if synced_gpus:
        _refuse("synced_gpus", synced_gpus, "the loop that keeps ZeRO-3/FSDP ranks in step")
