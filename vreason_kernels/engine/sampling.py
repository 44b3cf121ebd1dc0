"""Next-token choice: greedy, or sampling with temperature, min-p and top-p, all on device."""

import math
from typing import Optional

import torch


def check_sampling_args(do_sample, temperature, top_p, min_p, generator) -> None:
    if not isinstance(do_sample, bool):
        raise TypeError(f"do_sample must be a bool, got {type(do_sample).__name__}")
    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite float, got {value!r}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= min_p < 1:
        raise ValueError(f"min_p must be in [0, 1), got {min_p}")
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
) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` int64 token ids.

    Sampling applies temperature, then min-p (drop tokens with probability below
    ``min_p`` times the top probability), then top-p (keep the smallest prefix of the
    sorted distribution whose mass reaches ``top_p``; the top token always stays).
    """
    if not do_sample:
        return logits.argmax(-1)
    scores = logits.float() / temperature
    if min_p > 0:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    if top_p < 1:
        sorted_scores, order = scores.sort(-1, descending=True)
        sorted_probs = sorted_scores.softmax(-1)
        # Mass strictly before each token: a token is dropped once that already reaches top_p.
        before = sorted_probs.cumsum(-1) - sorted_probs
        drop_sorted = before >= top_p
        drop = torch.empty_like(drop_sorted).scatter_(-1, order, drop_sorted)  # back to vocabulary order
        scores = scores.masked_fill(drop, float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=generator).squeeze(-1)
