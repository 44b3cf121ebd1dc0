"""Vocabulary-parallel V-Reason on torch.distributed (no transport of our own).

- ``vocab_parallel_linear_entropy``: ``linear_entropy`` over an LM head whose vocabulary
  rows are sharded over a process group; one all-gather of ``2 D + 3`` floats per row per
  rank, never the logits.
- Token choice over a sharded vocabulary: ``engine.sampling.select_next_token(...,
  vocab=VocabRows(V_rank, device, process_group))`` (distributed argmax and exponential-race sampling).
"""

from vreason_kernels.distributed.vocab_parallel import vocab_parallel_linear_entropy

__all__ = ["vocab_parallel_linear_entropy"]
