"""vreason-kernels: fused kernels for V-Reason inference-time entropy control.

Public API (DESIGN.md §3)::

    import vreason_kernels as vk
    vk.linear_entropy(hidden, weight, bias=None, *, temperature=1.0, return_logits=False, backend="auto")
"""

from vreason_kernels import _extension  # noqa: F401  (loads the C++ ops, or warns once)
from vreason_kernels.backend import BACKENDS
from vreason_kernels.ops.linear_entropy import linear_entropy
from vreason_kernels.ops.prune_kv import prune_kv
from vreason_kernels.ops.value_delta_attention import value_delta_attention
from vreason_kernels.engine import VReasonConfig, VReasonOutput, generate
from vreason_kernels import reference  # noqa: E402  (vk.reference: the naive generate)

__version__ = "0.1.0"
__all__ = ["BACKENDS", "VReasonConfig", "VReasonOutput", "generate", "linear_entropy", "prune_kv", "reference", "value_delta_attention"]
