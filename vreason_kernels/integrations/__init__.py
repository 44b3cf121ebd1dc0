"""Integrations with model libraries, kept apart from the ops.

Importing this package registers ``attn_implementation="vreason"`` with transformers, so
``from_pretrained(..., attn_implementation="vreason")`` works after it.
"""

from vreason_kernels.integrations import transformers
from vreason_kernels.integrations.transformers import *  # noqa: F401,F403 (the names in its __all__)

transformers.register()

__all__ = list(transformers.__all__)
