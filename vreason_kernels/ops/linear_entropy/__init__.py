"""``linear_entropy`` and what the vocabulary-parallel op (``vreason_kernels.distributed``)
builds on: the argument checks, the weight-gradient op, and a vocabulary slice's partials
with their merge (partials.py)."""

from vreason_kernels.ops.linear_entropy.op import (
    check_args,
    linear_entropy,
    linear_entropy_weight_grad,
    slice_partials,
)
from vreason_kernels.ops.linear_entropy.partials import Partials, finish, merge_partials

__all__ = [
    "Partials",
    "check_args",
    "finish",
    "linear_entropy",
    "linear_entropy_weight_grad",
    "merge_partials",
    "slice_partials",
]
