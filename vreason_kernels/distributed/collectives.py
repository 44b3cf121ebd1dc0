"""The few torch.distributed collectives the vocabulary-parallel paths use, and the row
reductions over a vocabulary that is whole (no process group) or sharded over a process group.

Ranks hold contiguous vocabulary slices in rank order (rank 0 has the first rows), as
transformers' ``colwise`` LM-head plans and Megatron-style vocabulary parallelism lay them
out; slices may differ in size (the last rank's is shorter when V is not divisible).
"""

from typing import Optional

import torch
import torch.distributed as dist

# The group resolution and the all-gather are leaf helpers: the label log-probability op
# (ops/linear_logprob_entropy) takes a process group itself.
from vreason_kernels._collectives import all_gather, collective_device, resolve_group

__all__ = ["VocabRows", "all_gather", "all_max", "resolve_group"]


def all_max(x: torch.Tensor, process_group) -> torch.Tensor:
    """Elementwise max of ``x`` over the ranks (exact: a max never rounds)."""
    device = collective_device(process_group, x.device)
    local = x.to(device, copy=True).contiguous()
    dist.all_reduce(local, op=dist.ReduceOp.MAX, group=process_group)
    return local.to(x.device)


class VocabRows:
    """Reductions over the vocabulary of ``[B, V_rank]`` rows: plain ones without a process group,
    collectives (never the rows themselves) with one. Every rank of the group must make
    the same calls in the same order. Build one per vocabulary layout and keep it: the
    ranks' row counts are gathered once, at the first call that needs them.
    """

    def __init__(self, rows: int, device, process_group=None):
        """``rows``: this rank's vocabulary rows; ``process_group``: the process group the
        vocabulary is sharded over, or None (whole rows)."""
        self.rows = rows
        self.device = torch.device(device)  # NCCL communicates only CUDA tensors
        self.process_group = process_group
        self._sizes: Optional[list] = None

    @property
    def sharded(self) -> bool:
        return self.process_group is not None

    def sizes(self) -> list:
        """Vocabulary rows of every rank, in rank order (one collective, then cached)."""
        if self._sizes is None:
            if self.sharded:
                mine = torch.tensor([self.rows], dtype=torch.long, device=self.device)
                self._sizes = all_gather(mine, self.process_group)[:, 0].tolist()
            else:
                self._sizes = [self.rows]
        return self._sizes

    @property
    def vocab_size(self) -> int:
        return sum(self.sizes())

    @property
    def offset(self) -> int:
        """Global index of this rank's first vocabulary row."""
        rank = dist.get_rank(self.process_group) if self.sharded else 0
        return sum(self.sizes()[:rank])

    def local(self, whole: torch.Tensor) -> torch.Tensor:
        """This rank's columns of a ``[B, V]`` tensor every rank holds whole."""
        return whole.narrow(-1, self.offset, self.rows) if self.sharded else whole

    def max(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, 1]`` max over the whole vocabulary."""
        top = x.amax(-1, keepdim=True)
        return all_max(top, self.process_group) if self.sharded else top

    def argmax(self, x: torch.Tensor) -> torch.Tensor:
        """``[B]`` int64 global index of the first maximum over the whole vocabulary.

        Sharded: each rank's first local maximum (value and global index, exact in float64)
        is gathered; the lowest rank holding the maximum wins a tie, i.e. the lowest global
        index, as ``argmax`` over the whole row gives. A NaN counts as the maximum, as there.
        """
        index = x.argmax(-1)
        if not self.sharded:
            return index
        value = x.gather(-1, index[:, None])[:, 0]
        rows = torch.full_like(index, self.rows)
        table = all_gather(torch.stack([value.double(), index.double(), rows.double()], -1), self.process_group)
        sizes = table[:, 0, 2].long()  # offsets on the device: no host sync
        offsets = torch.cumsum(sizes, 0) - sizes
        best = table[..., 0].argmax(0)  # [B]: the rank holding each row's maximum
        batch = torch.arange(x.shape[0], device=table.device)
        return (table[best, batch, 1].long() + offsets[best]).to(index.device)
