"""vreason-kernels: fused kernels for V-Reason inference-time entropy control.

Public API::

    import vreason_kernels as vk
    vk.linear_entropy(hidden, weight, bias=None, *, temperature=1.0, return_logits=False, backend="auto")
    vk.value_delta_attention(query, key, value, delta_v=None, span=None, *, attention_mask=None,
                             scale=None, causal=True, backend="auto")
    vk.prune_kv(key, value, span, *, keep_ratio, backend="auto")
    vk.generate(model, input_ids, *, config=None, ...) -> vk.VReasonOutput
        # config=None is VReasonConfig(): V-Reason on; VReasonConfig(enabled=False) is plain decoding
    vk.reference.generate(...)        # the naive V-Reason decoding, same signature

``attn_implementation="vreason"`` is registered with transformers as soon as transformers'
model code is imported (``_transformers_hook``): this import itself neither needs nor
loads transformers. ``vreason_kernels.integrations`` holds the integration's API.
"""

from vreason_kernels import _extension  # noqa: F401  (loads the C++ ops, or warns once)
from vreason_kernels import _transformers_hook
from vreason_kernels import reference
from vreason_kernels._version import __version__
from vreason_kernels.backend import BACKENDS
from vreason_kernels.engine import VReasonConfig, VReasonOutput, generate
from vreason_kernels.ops.linear_entropy import linear_entropy
from vreason_kernels.ops.prune_kv import prune_kv
from vreason_kernels.ops.value_delta_attention import value_delta_attention

_transformers_hook.install()

__all__ = [
    "BACKENDS",
    "VReasonConfig",
    "VReasonOutput",
    "__version__",
    "generate",
    "linear_entropy",
    "prune_kv",
    "reference",
    "value_delta_attention",
]
