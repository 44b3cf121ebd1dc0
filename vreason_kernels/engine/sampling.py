"""Next-token choice: greedy, or sampling with temperature, top-k, min-p and top-p, all on device."""

import math
from typing import Optional

import torch

from vreason_kernels._checks import check_bool, check_int, check_number
from vreason_kernels.distributed.collectives import VocabRows


def check_sampling_args(do_sample, temperature, top_k, top_p, min_p, generator) -> None:
    check_bool("do_sample", do_sample)
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_int("top_k", top_k, low=0)
    check_number("top_p", top_p, low=0.0, high=1.0, low_open=True)
    check_number("min_p", min_p, low=0.0, high=1.0, high_open=True)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")


def select_next_token(
    logits: torch.Tensor,
    *,
    do_sample: bool,
    temperature: float,
    top_p: float,
    min_p: float,
    generator: Optional[torch.Generator],
    top_k: int = 0,
    vocab: Optional[VocabRows] = None,
) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` int64 token ids.

    Sampling applies temperature, then top-k (``top_k > 0``: keep the tokens whose logit
    is at least the k-th largest, ties included, as transformers does), then min-p (drop
    tokens with probability below ``min_p`` times the top probability:
    ``z_j - max z < log min_p``), then top-p (keep the smallest prefix of the sorted
    distribution whose mass reaches ``top_p``; the top token always stays), and draws by an exponential race: with ``E_j ~ Exp(1)`` i.i.d. from
    ``generator``, ``argmax_j (z_j - log E_j)`` is token ``j`` with probability ``softmax(z)_j``
    (``-log E`` is Gumbel noise). Every step draws ``E`` for the whole ``[B, V]``.

    ``vocab``: the vocabulary's layout over a process group, ``VocabRows(V_rank, device,
    group)``, built once per run (``logits`` is then this rank's contiguous slice
    ``[B, V_rank]``, ranks in vocabulary order); None for whole rows. Each rank draws the same whole-vocabulary noise (the generator must be seeded
    alike on every rank) and keeps its columns, and the max and argmax become collectives
    of ``B`` values per rank, so the token is the one the whole logits would give, with
    no logits gathered. Top-k and top-p need the sorted whole distribution and are refused there.
    """
    if vocab is None:
        vocab = VocabRows(logits.shape[-1], logits.device)
    elif logits.shape[-1] != vocab.rows:
        raise ValueError(f"logits: this rank holds {vocab.rows} vocabulary rows (vocab), got {logits.shape[-1]}")
    if not do_sample:
        return vocab.argmax(logits)
    # Relative to the row max (over the whole vocabulary), so a tiny temperature gives 0 and
    # -inf, never inf - inf = NaN; the max of ``scores`` is then exactly 0.
    logits = logits.float()
    scores = (logits - vocab.max(logits)) / temperature
    if top_k > 0:
        if vocab.sharded:
            raise ValueError("top_k needs the whole vocabulary's sorted logits: not supported with a "
                             "vocabulary-sharded LM head (use min_p, or top_k=0)")
        if top_k < scores.shape[-1]:
            kth = scores.topk(top_k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
    if min_p > 0:
        scores = scores.masked_fill(scores < math.log(min_p), float("-inf"))
    if top_p < 1:
        if vocab.sharded:
            raise ValueError("top_p < 1 needs the whole vocabulary's sorted distribution: not supported with a "
                             "vocabulary-sharded LM head (use min_p, or top_p=1.0)")
        scores = _top_p_filter(scores, top_p)
    noise = torch.empty((scores.shape[0], vocab.vocab_size), dtype=torch.float32, device=scores.device)
    noise = vocab.local(noise.exponential_(generator=generator))
    live = scores > float("-inf")
    keys = torch.where(live, scores - torch.log(noise), torch.full_like(scores, float("-inf")))
    return vocab.argmax(keys)


def _top_p_filter(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_scores, order = scores.sort(-1, descending=True)
    sorted_probs = sorted_scores.softmax(-1)
    # Mass strictly before each token: a token is dropped once that already reaches top_p.
    before = sorted_probs.cumsum(-1) - sorted_probs
    drop_sorted = before >= top_p
    drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
    return scores.masked_fill(drop, float("-inf"))
