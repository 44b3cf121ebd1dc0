"""Plumbing shared by the fused engine (loop.py) and the naive reference (reference.py):
locating the model's parts, checking and preparing the inputs, keeping the model
unchanged, and recording tokens and traces into a ``VReasonOutput``.

None of it is the V-Reason algorithm itself; both implementations of that stay separate.
"""

import inspect
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from vreason_kernels.distributed.collectives import VocabRows
from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.engine.output import VReasonOutput
from vreason_kernels.engine.sampling import check_sampling_args
from vreason_kernels.engine.spans import RowSpans, check_lite_has_video, resolve_spans
from vreason_kernels.engine.unsupported_args import check_no_generation_options

# Finished samples are checked on the host once every this many tokens: the only
# host-device sync of the decode loop. Up to this many - 1 extra steps may run after
# the last sample finished; their tokens are padding and are trimmed.
EOS_CHECK_INTERVAL = 8


@dataclass
class ModelParts:
    """The pieces of a decoder-only (or VLM) causal LM the controller needs.

    ``base`` is the model without its LM head: its output's ``last_hidden_state`` is the
    final-normed hidden state (handles vision inputs and mRoPE for VLMs).

    Tensor parallelism (transformers' ``tp_plan``): the head's weight is a DTensor sharded
    over the vocabulary; ``head_weight``/``head_bias`` are then this rank's rows and
    ``tp_group`` the group they are sharded over (None for a whole head). The controlled
    layer's kv heads, hence ``ΔV``, are sharded over ``kv_group(layer)``: the same group when
    both are sharded, but a plan may shard the layers and replicate the head (transformers
    5.17's Qwen2.5-VL plan has no ``lm_head`` entry).
    """

    base: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head_weight: torch.Tensor
    head_bias: Optional[torch.Tensor]
    vocab_size: int
    tp_group: Optional[object] = None

    def __post_init__(self):
        # The vocabulary layout token choice reduces over, kept for the run: under tensor
        # parallelism its ranks' row counts are gathered once, not per token.
        self.vocab_rows = VocabRows(self.head_weight.shape[0], self.head_weight.device, self.tp_group)

    def kv_group(self, layer: int):
        """The group decoder layer ``layer`` is sharded over (its parameters are DTensors
        with a ``Shard`` placement: its kv heads, hence ``ΔV``, are split), or None."""
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch without distributed
            return None
        for param in self.layers[layer].parameters():
            if isinstance(param, DTensor) and any(placement.is_shard() for placement in param.placements):
                return param.device_mesh.get_group()
        return None

    def entropy(self, hidden: torch.Tensor, *, return_logits: bool = False, backend: str = "auto"):
        """``H`` of the head's next-token distribution over the whole vocabulary (and the
        logits: this rank's vocabulary slice under tensor parallelism)."""
        if self.tp_group is None:
            from vreason_kernels.ops.linear_entropy import linear_entropy

            return linear_entropy(hidden, self.head_weight, self.head_bias, return_logits=return_logits,
                                  backend=backend)
        from vreason_kernels.distributed import vocab_parallel_linear_entropy

        return vocab_parallel_linear_entropy(
            hidden, self.head_weight, self.head_bias, process_group=self.tp_group, vocab_size=self.vocab_size,
            return_logits=return_logits, backend=backend,
        )


def _head_shard(head: torch.nn.Linear):
    """``(weight, bias, group, V)``: the head's local rows and the group they are sharded
    over when it is a tensor-parallel DTensor, else the head itself and ``None``."""
    weight, bias = head.weight, head.bias
    try:
        from torch.distributed.tensor import DTensor, Shard
    except ImportError:  # torch without distributed
        return weight, bias, None, weight.shape[0]
    if not isinstance(weight, DTensor):
        return weight, bias, None, weight.shape[0]
    mesh = weight.device_mesh
    sharded_bias = bias is None or (isinstance(bias, DTensor) and bias.placements == (Shard(0),))
    if mesh.ndim != 1 or weight.placements != (Shard(0),) or not sharded_bias:
        raise ValueError(
            "model: a tensor-parallel LM head must be sharded over the vocabulary on a 1-D mesh (placements "
            f"(Shard(0),), transformers' 'colwise'/'colwise_gather_output' plans), got {weight.placements} "
            f"on a {mesh.ndim}-D mesh"
        )
    return weight.to_local(), None if bias is None else bias.to_local(), mesh.get_group(), weight.shape[0]


def model_parts(model) -> ModelParts:
    """Locate base model, decoder layers, final norm and LM head, or raise a clear error."""
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    if not isinstance(head, torch.nn.Linear):
        raise ValueError(
            f"model must be a causal LM with a linear language-model head (get_output_embeddings()), "
            f"got {type(model).__name__} with head {type(head).__name__}"
        )
    base = getattr(model, "base_model", model)
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else base
    layers, norm = getattr(decoder, "layers", None), getattr(decoder, "norm", None)
    if base is model or not isinstance(layers, torch.nn.ModuleList) or norm is None:
        raise ValueError(
            f"model: {type(model).__name__} does not expose a base model with decoder .layers and a final .norm"
        )
    weight, bias, group, vocab_size = _head_shard(head)
    return ModelParts(base=base, layers=layers, norm=norm, head_weight=weight, head_bias=bias, vocab_size=vocab_size,
                      tp_group=group)


@contextmanager
def restored_model(model):
    """Freeze every parameter for the duration, then restore ``requires_grad`` flags and
    the ``rope_deltas`` that mRoPE models cache on themselves, also on exceptions."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    holders = [m for m in model.modules() if hasattr(m, "rope_deltas")]
    deltas = [m.rope_deltas for m in holders]
    try:
        model.requires_grad_(False)
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, d in zip(holders, deltas):
            m.rope_deltas = d


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


def prefill_position_ids(model, request: DecodeRequest) -> torch.Tensor:
    """Position ids of the prompt exactly as the model's own ``generate`` builds them
    (mRoPE ``[4, B, L]`` with ``rope_deltas`` for Qwen2.5-VL, ``[B, L]`` otherwise).
    Decode steps continue with ``last + 1``, as ``generate`` does."""
    kwargs = {"attention_mask": request.attention_mask, **request.model_inputs}
    return model._prepare_position_ids_for_generation(request.input_ids, kwargs)


def warn_empty_span():
    warnings.warn("span is empty: nothing to modulate, decoding plainly (V-Reason off)", stacklevel=3)


def warn_nan_resets(count: int):
    """One warning per call, after decoding (counted on device, so no per-token sync)."""
    if count:
        warnings.warn(
            f"ΔV became NaN/Inf and was reset to zero {count} time(s) (sample-steps); decoding continued",
            stacklevel=3,
        )


class Recorder:
    """Preallocated tokens and traces; EOS bookkeeping on device."""

    def __init__(self, request: DecodeRequest):
        b, n = request.batch, request.max_new_tokens
        device = request.input_ids.device
        self.request = request
        self.tokens = torch.full((b, n), request.pad_id, dtype=torch.long, device=device)
        self.traces = {
            name: torch.full((b, n), float("nan"), dtype=torch.float32, device=device)
            for name in ("entropy", "entropy_ema", "alpha", "delta_norm")
        }
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.alive = torch.zeros((b, n), dtype=torch.bool, device=device)  # unfinished before token k
        self.steps = 0
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.sync()
        self.start = time.perf_counter()
        self.prefill_end = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark_prefill_done(self):
        self.sync()
        self.prefill_end = time.perf_counter()

    def record(self, k: int, token: torch.Tensor, **traces: torch.Tensor) -> torch.Tensor:
        """Store step ``k`` (0-based); return the token to feed next (pad once finished)."""
        token = torch.where(self.finished, torch.full_like(token, self.request.pad_id), token)
        self.alive[:, k] = ~self.finished
        self.tokens[:, k] = token
        for name, value in traces.items():
            self.traces[name][:, k] = value.float()
        if self.request.eos_ids is not None:
            self.finished |= torch.isin(token, self.request.eos_ids)
        self.steps = k + 1
        if self.request.progress is not None:
            self.request.progress(self.steps)
        return token

    def all_finished(self, k: int) -> bool:
        """The periodic EOS check (a host sync only every ``EOS_CHECK_INTERVAL`` tokens)."""
        return (k + 1) % EOS_CHECK_INTERVAL == 0 and bool(self.finished.all())

    def output(self, **stats) -> VReasonOutput:
        self.sync()
        end = time.perf_counter()
        keep = int(self.alive[:, : self.steps].any(0).sum())  # columns up to the last EOS
        alive = self.alive[:, :keep]
        traces = {name: t[:, :keep].masked_fill(~alive, float("nan")) for name, t in self.traces.items()}
        prefill_end = self.prefill_end if self.prefill_end is not None else end
        decode_s = end - prefill_end
        device = self.device
        stats = {
            "tokens": int(alive.sum()),
            "steps": self.steps,
            "prefill_s": prefill_end - self.start,
            "decode_s": decode_s,
            "wall_s": end - self.start,
            # The first token comes from the prefill: steps - 1 decode forwards follow it.
            "time_per_token_s": decode_s / max(self.steps - 1, 1),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            **stats,
        }
        sequences = torch.cat([self.request.input_ids, self.tokens[:, :keep]], dim=1)
        return VReasonOutput(sequences=sequences, stats=stats, **traces)


def resolve_config(config: Optional[VReasonConfig]) -> VReasonConfig:
    """``None`` is the default ``VReasonConfig()``: V-Reason on (plain decoding is ``enabled=False``)."""
    if config is None:
        return VReasonConfig()
    if not isinstance(config, VReasonConfig):
        raise TypeError(f"config must be a VReasonConfig or None, got {type(config).__name__}")
    config.validate()  # again: the dataclass may have been changed since it was built
    return config


@dataclass
class Run:
    """Everything a decode loop needs, checked once up front."""

    config: VReasonConfig
    parts: ModelParts
    request: DecodeRequest
    layer: int
    spans: Optional[RowSpans]  # None for plain decoding
    enabled: bool  # False for plain decoding, also when the span is empty
    recorder: Recorder


def prepare_run(model, input_ids, config, span, **request_args) -> Run:
    """Validate a ``generate`` call (shared by the engine and the naive reference)."""
    config = resolve_config(config)
    parts = model_parts(model)
    request = check_request(model, input_ids, **request_args)
    layer = config.layer_index(len(parts.layers))
    enabled, spans = config.enabled, None
    if enabled:
        if config.keep_ratio < 1.0 and span is None:
            check_lite_has_video(model.config, request.input_ids, request.attention_mask, config.keep_ratio)
        spans = resolve_spans(model, span, request.input_ids, request.attention_mask)
        if spans.size == 0:
            warn_empty_span()
            enabled = False
    return Run(config, parts, request, layer, spans, enabled, Recorder(request))
