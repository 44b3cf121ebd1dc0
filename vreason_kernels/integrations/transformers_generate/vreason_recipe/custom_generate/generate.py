"""V-Reason decoding for ``model.generate(..., custom_generate=<this folder>, trust_remote_code=True)``.

This file holds no decoding code: it points transformers at the installed vreason-kernels
(``vreason_kernels.integrations.transformers_generate``), whose version it therefore runs.
"""

from vreason_kernels.integrations.transformers_generate.recipe import generate  # noqa: F401
