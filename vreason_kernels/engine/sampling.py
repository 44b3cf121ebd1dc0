"""Next-token choice: greedy, or sampling with temperature, min-p and top-p, all on device."""

from typing import Optional

import torch

from vreason_kernels._checks import check_bool, check_number


def check_sampling_args(do_sample, temperature, top_p, min_p, generator) -> None:
    check_bool("do_sample", do_sample)
    check_number("temperature", temperature, low=0.0, low_open=True)
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
) -> torch.Tensor:
    """``[B, V]`` logits -> ``[B]`` int64 token ids.

    Sampling applies temperature, then min-p (drop tokens with probability below
    ``min_p`` times the top probability), then top-p (keep the smallest prefix of the
    sorted distribution whose mass reaches ``top_p``; the top token always stays).
    """
    if not do_sample:
        return logits.argmax(-1)
    # Relative to the row max, so a tiny temperature gives 0 and -inf, never inf - inf = NaN.
    logits = logits.float()
    scores = (logits - logits.amax(-1, keepdim=True)) / temperature
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
