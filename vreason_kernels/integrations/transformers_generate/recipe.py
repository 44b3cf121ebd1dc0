"""The folder form of V-Reason in ``model.generate``::

    model.generate(input_ids, custom_generate=GENERATE_RECIPE, trust_remote_code=True, vreason=VReasonConfig(),
                   streamer=TextStreamer(tokenizer), max_new_tokens=64)

``GENERATE_RECIPE`` is a folder in transformers' ``custom_generate`` layout, shipped inside
this package; its ``custom_generate/generate.py`` only imports :func:`generate` from here.
Transformers then calls :func:`generate` with every argument of ``model.generate``, and
it runs ``model.generate`` again with the callable form, handing over what that form
would not receive: the streamer, and ``stop_strings`` turned into a criterion with the
tokenizer.
"""

from pathlib import Path

from vreason_kernels.integrations.transformers_generate.decoding import run_generate
from vreason_kernels.integrations.transformers_generate.unsupported import check_call_arguments

GENERATE_RECIPE = str(Path(__file__).resolve().with_name("vreason_recipe"))


def generate(model, *args, streamer=None, assistant_model=None, synced_gpus=None, tokenizer=None,
             stopping_criteria=None, vreason=None, **kwargs):
    """What ``custom_generate=GENERATE_RECIPE`` runs: ``model.generate``'s arguments, plus
    ``vreason`` (a ``VReasonConfig``; ``None`` is ``VReasonConfig()``)."""
    check_call_arguments(assistant_model=assistant_model, synced_gpus=synced_gpus)
    stop_strings = kwargs.pop("stop_strings", None)
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings: pass the model's tokenizer as tokenizer= too, as model.generate asks")
        from transformers import StoppingCriteriaList, StopStringCriteria

        stopping_criteria = StoppingCriteriaList([*(stopping_criteria or []),
                                                  StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings)])
    # type(model): the class's generate, not one that from_pretrained may have set on the instance.
    return type(model).generate(model, *args, stopping_criteria=stopping_criteria, custom_generate=_recipe_decoding,
                                vreason=vreason, vreason_streamer=streamer, **kwargs)


def _recipe_decoding(model, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                     streamer=None, vreason=None, vreason_streamer=None, **model_kwargs):
    # Like vreason_decoding, with the streamer under a name transformers hands over.
    return run_generate(model, input_ids, logits_processor, stopping_criteria, generation_config, vreason,
                        model_kwargs, streamer=vreason_streamer, stream_prompt=True)
