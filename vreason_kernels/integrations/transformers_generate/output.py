"""What ``model.generate`` returns under V-Reason: the plain tensor of sequences, or with
``return_dict_in_generate=True`` transformers' ``GenerateDecoderOnlyOutput`` carrying the
V-Reason traces as one more field."""

from dataclasses import dataclass
from typing import Optional

from transformers.generation.utils import GenerateDecoderOnlyOutput

from vreason_kernels.engine.output import VReasonOutput


@dataclass
class VReasonGenerateOutput(GenerateDecoderOnlyOutput):
    """transformers' ``GenerateDecoderOnlyOutput`` (``sequences``; ``scores`` with
    ``output_scores=True``; ``logits`` with ``output_logits=True``) plus ``vreason``: the
    engine's :class:`~vreason_kernels.VReasonOutput` of the same call, i.e. the same
    ``sequences`` and the ``[B, new]`` traces ``entropy``, ``entropy_ema``, ``alpha``,
    ``delta_norm`` (NaN after a row finished) and ``stats``. Attention maps, hidden states
    and the cache are not returned (``None``)."""

    vreason: Optional[VReasonOutput] = None


def generate_output(out: VReasonOutput, steps, generation_config):
    """``out.sequences``, or the dict output when ``return_dict_in_generate`` asks for it."""
    if not generation_config.return_dict_in_generate:
        return out.sequences
    return VReasonGenerateOutput(sequences=out.sequences, scores=steps.scores, logits=steps.logits, vreason=out)
