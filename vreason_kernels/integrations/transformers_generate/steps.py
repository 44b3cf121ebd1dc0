"""``GenerateSteps``: the parts of one decode step that follow ``model.generate`` rather
than ``vk.generate``: the token comes from the logits processors, then greedy argmax or a
multinomial draw, as in transformers' own sampling loop; a row ends when a stopping
criterion says so; every token goes to the streamer. The engine's loop calls ``choose``
and its recorder calls ``row_end`` (engine/loop.py, engine/recorder.py).
"""

import torch


class GenerateSteps:
    """Token choice, stopping and streaming of one ``model.generate`` call.

    ``sequences`` is the prompt plus the tokens recorded so far: the ``input_ids`` that
    logits processors and stopping criteria are given, as transformers gives them.
    ``scores``/``logits``: the processed scores and raw logits of each step (tuples of
    ``[B, V]`` float32), or ``None`` where not asked for.
    """

    def __init__(self, input_ids, logits_processor, stopping_criteria, generation_config, streamer=None):
        self.sequences = input_ids
        self.logits_processor = logits_processor
        self.stopping_criteria = stopping_criteria
        self.streamer = streamer
        self.do_sample = bool(generation_config.do_sample)
        asked = bool(generation_config.return_dict_in_generate)
        self.scores = () if asked and generation_config.output_scores else None
        self.logits = () if asked and generation_config.output_logits else None
        # Transformers pads the rows that have finished only when an EOS criterion is present.
        self.pad_finished = any(hasattr(criterion, "eos_token_id") for criterion in stopping_criteria)

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token ``[B]`` from the head's logits ``[B, V]``."""
        # A float32 copy, as transformers makes: processors may write into their input.
        logits = logits.to(dtype=torch.float32, copy=True)
        scores = self.logits_processor(self.sequences, logits)
        if self.scores is not None:
            self.scores += (scores,)
        if self.logits is not None:
            self.logits += (logits,)
        if self.do_sample:
            probs = torch.nn.functional.softmax(scores, dim=-1)
            return torch.multinomial(probs, num_samples=1).squeeze(1)
        return torch.argmax(scores, dim=-1)

    def row_end(self, token: torch.Tensor) -> torch.Tensor:
        """Record ``token`` (already padded where a row had finished): stream it, and return
        the rows a stopping criterion ends now."""
        self.sequences = torch.cat([self.sequences, token[:, None]], dim=-1)
        if self.streamer is not None:
            self.streamer.put(token.cpu())
        return self.stopping_criteria(self.sequences, self.scores)
