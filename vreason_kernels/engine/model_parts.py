"""The model's side of decoding, shared by the fused engine (loop.py) and the naive
reference (reference.py): locating the parts of a causal LM (base, decoder layers, final
norm, LM head, tensor-parallel shards), keeping the model unchanged for the duration of a
call, and the prompt's position ids as the model's own ``generate`` builds them.
"""

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional

import torch

from vreason_kernels.distributed.collectives import VocabRows
from vreason_kernels.engine.request import DecodeRequest


@dataclass
class ModelParts:
    """The pieces of a decoder-only (or VLM) causal LM the controller needs.

    ``base`` is the model without its LM head: its output's ``last_hidden_state`` is the
    final-normed hidden state (handles vision inputs and mRoPE for VLMs).

    Tensor parallelism (transformers' ``tp_plan``): the head's weight is a DTensor sharded
    over the vocabulary; ``head_weight``/``head_bias`` are then this rank's rows and
    ``process_group`` the group they are sharded over (None for a whole head). The controlled
    layer's kv heads, hence ``ΔV``, are sharded over ``kv_process_group(layer)``: the same group when
    both are sharded, but a plan may shard the layers and replicate the head (transformers
    5.17's Qwen2.5-VL plan has no ``lm_head`` entry).
    """

    base: torch.nn.Module
    layers: torch.nn.ModuleList
    norm: torch.nn.Module
    head_weight: torch.Tensor
    head_bias: Optional[torch.Tensor]
    vocab_size: int
    process_group: Optional[object] = None

    def __post_init__(self):
        # The vocabulary layout token choice reduces over, kept for the run: under tensor
        # parallelism its ranks' row counts are gathered once, not per token.
        self.vocab_rows = VocabRows(self.head_weight.shape[0], self.head_weight.device, self.process_group)

    def kv_process_group(self, layer: int):
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
        if self.process_group is None:
            from vreason_kernels.ops.linear_entropy import linear_entropy

            return linear_entropy(hidden, self.head_weight, self.head_bias, return_logits=return_logits,
                                  backend=backend)
        from vreason_kernels.distributed import vocab_parallel_linear_entropy

        return vocab_parallel_linear_entropy(
            hidden, self.head_weight, self.head_bias, process_group=self.process_group, vocab_size=self.vocab_size,
            return_logits=return_logits, backend=backend,
        )


def _head_shard(head: torch.nn.Linear):
    """``(weight, bias, process_group, V)``: the head's local rows and the group they are sharded
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
    weight, bias, process_group, vocab_size = _head_shard(head)
    return ModelParts(base=base, layers=layers, norm=norm, head_weight=weight, head_bias=bias, vocab_size=vocab_size,
                      process_group=process_group)


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


def prefill_position_ids(model, request: DecodeRequest) -> torch.Tensor:
    """Position ids of the prompt exactly as the model's own ``generate`` builds them
    (mRoPE ``[4, B, L]`` with ``rope_deltas`` for Qwen2.5-VL, ``[B, L]`` otherwise).
    Decode steps continue with ``last + 1``, as ``generate`` does."""
    kwargs = {"attention_mask": request.attention_mask, **request.model_inputs}
    return model._prepare_position_ids_for_generation(request.input_ids, kwargs)
