"""V-Reason inside ``model.generate``, through transformers' ``custom_generate`` extension point.

- ``vreason_decoding``: the callable form, ``model.generate(..., custom_generate=vreason_decoding, vreason=...)``.
- ``GENERATE_RECIPE``: the folder form (a path), ``model.generate(..., custom_generate=GENERATE_RECIPE,
  trust_remote_code=True, vreason=..., streamer=...)``; the form that streams.
- ``VReasonGenerateOutput``: what ``return_dict_in_generate=True`` returns, with the traces in ``.vreason``.

Both decode with the engine's own loop (``vreason_kernels.engine``), as ``vk.generate`` does;
docs/hf-generate.md lists what is supported and what is refused.
"""

from vreason_kernels.integrations.transformers_generate.decoding import vreason_decoding
from vreason_kernels.integrations.transformers_generate.output import VReasonGenerateOutput
from vreason_kernels.integrations.transformers_generate.recipe import GENERATE_RECIPE

__all__ = ["GENERATE_RECIPE", "VReasonGenerateOutput", "vreason_decoding"]
