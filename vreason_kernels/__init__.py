"""vreason-kernels: fused kernels for V-Reason inference-time entropy control.

Public API::

    import vreason_kernels as vk
    vk.linear_entropy(hidden, weight, bias=None, *, temperature=1.0, return_logits=False, backend="auto")
    vk.linear_logprob_entropy(hidden, weight, labels, bias=None, *, temperature=1.0, ignore_index=-100,
                              backend="auto", process_group=None) -> (logp, entropy)
    vk.value_delta_attention(query, key, value, delta_v=None, span=None, *, attention_mask=None,
                             scale=None, causal=True, backend="auto")
    vk.prune_kv(key, value, span, *, keep_ratio, backend="auto")
    vk.generate(model, input_ids, *, config=None, ...) -> vk.VReasonOutput
        # config=None is VReasonConfig(): V-Reason on; VReasonConfig(enabled=False) is plain decoding
    vk.reference.generate(...)        # the naive V-Reason decoding, same signature
    model.generate(input_ids, custom_generate=vk.vreason_decoding, vreason=vk.VReasonConfig(), ...)
    model.generate(input_ids, custom_generate=vk.GENERATE_RECIPE, trust_remote_code=True,
                   vreason=vk.VReasonConfig(), streamer=..., ...)   # the folder form, which streams

``attn_implementation="vreason"`` is registered with transformers as soon as transformers'
model code is imported (``_transformers_hook``): this import itself neither needs nor
loads transformers. ``vreason_kernels.integrations`` holds the integration's API;
``vreason_decoding`` and ``GENERATE_RECIPE`` come from there when first used, for the same reason.
"""

from vreason_kernels import _extension  # noqa: F401  (loads the C++ ops, or warns once)
from vreason_kernels import _transformers_hook
from vreason_kernels import reference
from vreason_kernels._version import __version__
from vreason_kernels.backend import BACKENDS
from vreason_kernels.engine import VReasonConfig, VReasonOutput, generate
from vreason_kernels.ops.linear_entropy import linear_entropy
from vreason_kernels.ops.linear_logprob_entropy import linear_logprob_entropy
from vreason_kernels.ops.prune_kv import prune_kv
from vreason_kernels.ops.value_delta_attention import value_delta_attention

_transformers_hook.install()

# Served from vreason_kernels.integrations.transformers_generate on first use (see __getattr__).
_TRANSFORMERS_GENERATE = ("GENERATE_RECIPE", "vreason_decoding")

__all__ = [
    "BACKENDS",
    "GENERATE_RECIPE",
    "VReasonConfig",
    "VReasonOutput",
    "__version__",
    "generate",
    "linear_entropy",
    "linear_logprob_entropy",
    "prune_kv",
    "reference",
    "value_delta_attention",
    "vreason_decoding",
]


def __getattr__(name):
    # The model.generate integration imports transformers, which `import vreason_kernels`
    # must not do (docs/design.md §8.4); its names load on first use.
    if name in _TRANSFORMERS_GENERATE:
        from vreason_kernels.integrations import transformers_generate

        return getattr(transformers_generate, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
