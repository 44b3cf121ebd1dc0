"""``model.generate`` arguments that ``vk.generate`` does not take, refused by name.

``vk.generate`` passes unknown keywords to the model's prefill as model inputs (video
tensors and the like). A ``model.generate`` habit such as ``num_beams=4`` would otherwise
be blamed on the model's ``forward`` or, worse, dropped. Every generation option
transformers knows (the fields of ``GenerationConfig`` and the arguments of
``GenerationMixin.generate``) that is not one of ``vk.generate``'s own is refused here,
before any model call, with what to do instead where there is something.
"""

import inspect
from functools import cache

_SAMPLING_ONLY = (
    "it decodes greedily or samples (do_sample=True) with temperature, top_k, top_p and min_p; "
    "no other logits processing is applied"
)
_OUTPUT = "it returns a VReasonOutput: sequences, the entropy traces (entropy, entropy_ema, alpha, delta_norm) and stats"
_HINTS = {
    "num_beams": "it decodes one sequence per prompt row, greedily or sampled (do_sample=True)",
    "num_return_sequences": "repeat the prompt rows (input_ids.repeat(n, 1)) and sample with do_sample=True",
    "streamer": "the tokens are in out.sequences when the call returns; to stream, run V-Reason inside "
                "model.generate(..., custom_generate=vk.GENERATE_RECIPE, trust_remote_code=True, streamer=...)",
    "output_scores": _OUTPUT,
    "output_logits": _OUTPUT,
    "return_dict_in_generate": _OUTPUT,
    "output_attentions": _OUTPUT,
    "output_hidden_states": _OUTPUT,
    "generation_config": "pass its fields (max_new_tokens, do_sample, temperature, top_k, top_p, ...) as arguments",
    "min_new_tokens": "decoding stops at an EOS id; pass eos_token_id=[] to always decode max_new_tokens",
    "min_length": "decoding stops at an EOS id; pass eos_token_id=[] to always decode max_new_tokens",
    "stopping_criteria": "decoding stops at max_new_tokens or an EOS id (eos_token_id may be a list)",
    "stop_strings": "decoding stops at max_new_tokens or an EOS id (eos_token_id may be a list)",
}


@cache
def _generation_options() -> frozenset:
    """Every option name of transformers' ``generate``: its config fields and its own arguments."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    fields = {name for name in vars(GenerationConfig()) if not name.startswith("_")}
    arguments = {
        name for name, p in inspect.signature(GenerationMixin.generate).parameters.items()
        if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD
    }
    return frozenset(fields | arguments | set(_HINTS))


def check_no_generation_options(model_inputs: dict) -> None:
    """Raise ``ValueError`` naming the first (sorted) key of ``model_inputs`` (the keywords
    ``vk.generate`` did not bind itself) that is a transformers generation option."""
    refused = sorted(name for name in model_inputs if name in _generation_options())
    if refused:
        name = refused[0]
        others = f" (also refused: {', '.join(refused[1:])})" if len(refused) > 1 else ""
        raise ValueError(f"vk.generate does not support {name}; {_HINTS.get(name, _SAMPLING_ONLY)}{others}")
