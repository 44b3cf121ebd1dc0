"""``linear_logprob_entropy``: the label log-probability and the entropy from one pass over
an LM head (docs/design.md §2.4), on ``linear_entropy``'s kernels."""

from vreason_kernels.ops.linear_logprob_entropy.op import linear_logprob_entropy, linear_logprob_entropy_grads

__all__ = ["linear_logprob_entropy", "linear_logprob_entropy_grads"]
