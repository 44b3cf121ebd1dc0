"""The checked inputs of one ``generate`` call: ``check_request`` validates every argument
(errors name it) and returns a ``DecodeRequest``.
"""

import inspect
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vreason_kernels.engine.sampling import check_sampling_args
from vreason_kernels.engine.unsupported_args import check_no_generation_options


@dataclass
class DecodeRequest:
    """Checked inputs of one ``generate`` call."""

    input_ids: torch.Tensor  # [B, L] int64
    attention_mask: torch.Tensor  # [B, L] int64, left-padded
    model_inputs: dict  # extra prefill inputs (pixel_values_videos, video_grid_thw, ...)
    max_new_tokens: int
    eos_ids: Optional[torch.Tensor]  # [E] int64 or None
    pad_id: int
    sampling: dict  # keyword arguments of select_next_token
    progress: Optional[Callable[[int], None]] = None  # called with the number of steps done

    @property
    def batch(self) -> int:
        return self.input_ids.shape[0]


def _device_of(model) -> torch.device:
    return model.get_input_embeddings().weight.device


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _is_token_id(value, vocab: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < vocab


# max_new_tokens when neither it nor max_length is given.
DEFAULT_MAX_NEW_TOKENS = 256


def _new_tokens(max_new_tokens, max_length, prompt_length: int) -> int:
    """The number of tokens to decode at most, from ``max_new_tokens`` or ``max_length``."""
    if max_new_tokens is not None and max_length is not None:
        raise ValueError(
            f"pass max_new_tokens or max_length, not both (got max_new_tokens={max_new_tokens!r}, "
            f"max_length={max_length!r})"
        )
    if max_length is not None:
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < prompt_length:
            raise ValueError(
                f"max_length (prompt plus new tokens) must be an int >= the prompt length {prompt_length}, "
                f"got {max_length!r}"
            )
        return max_length - prompt_length
    if max_new_tokens is None:
        return DEFAULT_MAX_NEW_TOKENS
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    return max_new_tokens


def check_request(
    model, input_ids, *, max_new_tokens, max_length, do_sample, temperature, top_k, top_p, min_p, eos_token_id,
    pad_token_id, generator, progress, model_inputs,
) -> DecodeRequest:
    """Validate the arguments of ``generate`` (errors name the argument)."""
    if not isinstance(input_ids, torch.Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must be an integer tensor (int64), got {input_ids.dtype}")
    if input_ids.dim() != 2 or input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
        raise ValueError(f"input_ids must have shape [B, L] with B, L >= 1, got {tuple(input_ids.shape)}")
    device = _device_of(model)
    if input_ids.device != device:
        raise ValueError(f"input_ids must be on the model's device ({device}), got {input_ids.device}")
    vocab = model.get_input_embeddings().num_embeddings
    if bool((input_ids < 0).any() | (input_ids >= vocab).any()):
        lo, hi = int(input_ids.min()), int(input_ids.max())
        raise ValueError(f"input_ids must be token ids in [0, {vocab}) (the model's vocabulary), got [{lo}, {hi}]")
    max_new_tokens = _new_tokens(max_new_tokens, max_length, input_ids.shape[1])
    # Tokens and traces are preallocated; a length no position embedding reaches is a mistake.
    limit = getattr(_text_config(model), "max_position_embeddings", None)
    if isinstance(limit, int) and input_ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"input_ids length {input_ids.shape[1]} + max_new_tokens {max_new_tokens} exceeds the model's "
            f"max_position_embeddings ({limit})"
        )
    check_sampling_args(do_sample, temperature, top_k, top_p, min_p, generator)
    if progress is not None and not callable(progress):
        raise TypeError(f"progress must be a callable (steps done) or None, got {type(progress).__name__}")
    model_inputs = dict(model_inputs)
    for name in ("past_key_values", "cache", "position_ids", "use_cache", "inputs_embeds"):
        if name in model_inputs:
            raise ValueError(f"{name} is managed by generate and cannot be passed")
    check_no_generation_options(model_inputs)
    # Forwards take **kwargs and drop unknown names silently: a typo would lose the video.
    accepted = inspect.signature(type(model).forward).parameters
    unknown = sorted(name for name in model_inputs if name not in accepted)
    if unknown:
        raise ValueError(f"model_inputs: {unknown} are not arguments of {type(model).__name__}.forward")
    attention_mask = model_inputs.pop("attention_mask", None)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must be a tensor of input_ids' shape {tuple(input_ids.shape)}, got {got}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (token)")
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("attention_mask: prompts must be left-padded (the last position of every row must be 1)")

    gen_config = getattr(model, "generation_config", None)
    if eos_token_id is None:
        eos_token_id = getattr(gen_config, "eos_token_id", None)
    eos_ids = None
    if eos_token_id is not None:
        if isinstance(eos_token_id, torch.Tensor) and not eos_token_id.dtype.is_floating_point:
            eos_token_id = eos_token_id.tolist()
        eos_list = [eos_token_id] if isinstance(eos_token_id, int) else eos_token_id
        if not isinstance(eos_list, (list, tuple)) or not all(_is_token_id(e, vocab) for e in eos_list):
            raise ValueError(f"eos_token_id must be a token id in [0, {vocab}) or a list of them, got {eos_token_id!r}")
        eos_ids = torch.tensor(eos_list, dtype=torch.long, device=device) if eos_list else None
    if pad_token_id is None:
        pad_token_id = getattr(gen_config, "pad_token_id", None)
    if pad_token_id is None:
        pad_token_id = int(eos_ids[0]) if eos_ids is not None else 0
    if not _is_token_id(pad_token_id, vocab):
        raise ValueError(f"pad_token_id must be a token id in [0, {vocab}), got {pad_token_id!r}")
    sampling = dict(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    generator=generator)
    return DecodeRequest(input_ids.long(), attention_mask, model_inputs, max_new_tokens, eos_ids, pad_token_id, sampling,
                         progress)
