"""``vocab_parallel_linear_entropy``: the fused linear entropy over a vocabulary-sharded LM head.

Rank ``k`` holds the contiguous vocabulary rows ``W_k [V_k, D]`` (and ``b_k``). It computes
its slice's partial statistics ``(m_k, s_k, t_k, A_k, B_k)`` (``ops/linear_entropy/partials.py``,
docs/design.md §2.1) from its own rows only; ONE all-gather brings every rank's partials,
``2 D + 3`` floats per row (3 without a hidden gradient), to every rank; each rank folds
them with ``merge_partials`` (the same deterministic reduction everywhere) and finishes::

    H = log S - T/S,        dH/dh = -(B - (T/S) A) / (S tau).

Every rank runs the same fold on the same gathered bits, so the entropy and ``dH/dh`` are
identical on all ranks and deterministic. The backward gives ``hidden`` the global
``g dH/dh`` on every rank (as a replicated input's gradient should be) and gives each
rank's ``W_k``/``b_k`` their own gradient, computed from the global row statistics
``(M, log S, H)``: nothing is communicated in the backward.

Why a separate function rather than a ``process_group=`` argument of ``linear_entropy``:
the contract differs, not only the transport. The weight is a slice, not the head; the
call is a collective that every rank must make in the same order; the returned logits
are the rank's slice; and dW/db are per-slice. A keyword on the single-process op would
let a full head plus a group silently count the vocabulary ``world`` times, and the
single-process op is a ``torch.library`` custom op (compiled with ``fullgraph=True``),
whose schema cannot carry a ``ProcessGroup``.
"""

import math
from typing import Optional

import torch
from torch import Tensor

from vreason_kernels._checks import FLOAT_DTYPES
from vreason_kernels._collectives import agree, summary_device
from vreason_kernels.backend import BACKENDS, resolve_backend_for
from vreason_kernels.distributed.collectives import all_gather, resolve_group
from vreason_kernels.ops.linear_entropy import (
    Partials, check_args, finish, linear_entropy_weight_grad, merge_partials, slice_partials,
)

# What every rank tells the others before the partials travel (_collectives.agree): the
# names, and which must agree ({name: the argument an error names}).
_SUMMARY = ("vocab rows", "D", "rows", "dtype", "temperature", "need_grad", "backend")
_SAME = {"D": "weight/hidden", "rows": "hidden", "dtype": "hidden", "temperature": "temperature",
         "need_grad": "hidden.requires_grad", "backend": "backend"}


class _VocabParallelEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, process_group, temperature, need_grad, return_logits, backend):
        parts, logits = slice_partials(hidden, weight, bias, temperature, need_grad, return_logits, backend)
        columns = [parts.m, parts.s, parts.t]
        packed = torch.cat([torch.stack(columns, -1), *([parts.a, parts.b] if need_grad else [])], -1)
        table = all_gather(packed, process_group)  # [world, R, 3 (+ 2 D)]
        dim = hidden.shape[1]
        moments = (table[..., 3:3 + dim], table[..., 3 + dim:]) if need_grad else (None, None)
        merged = merge_partials(Partials(table[..., 0], table[..., 1], table[..., 2], *moments))
        entropy, dh, row_max, log_sum = finish(merged, temperature)
        ctx.save_for_backward(hidden, weight, bias, dh, row_max, log_sum, entropy)
        ctx.temperature, ctx.backend = temperature, backend
        ctx.mark_non_differentiable(logits)
        ctx.set_materialize_grads(False)
        return entropy, logits

    @staticmethod
    def backward(ctx, g_entropy, _g_logits):
        hidden, weight, bias, dh, row_max, log_sum, entropy = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = grad_weight = grad_bias = None
        if g_entropy is not None:
            g = g_entropy.to(entropy.dtype).contiguous()
            if need_hidden:
                grad_hidden = (g[:, None] * dh).to(hidden.dtype)
            if need_weight or need_bias:
                # The whole vocabulary's row statistics: this slice's dW/db without communication.
                grad_weight, grad_bias = linear_entropy_weight_grad(
                    hidden, weight, bias, ctx.temperature, row_max, log_sum, entropy, g, need_bias, ctx.backend
                )
                grad_weight = grad_weight.to(weight.dtype) if need_weight else None
                grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None, None, None, None


def _local_check(hidden, weight, bias, temperature, return_logits, backend) -> str:
    """The single-process op's checks plus the backend's; returns the resolved backend."""
    check_args(hidden, weight, bias, temperature, return_logits)
    return resolve_backend_for(backend, "hidden", hidden)


def _needs_grad(hidden) -> bool:
    return torch.is_grad_enabled() and hidden.requires_grad


def vocab_parallel_linear_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    process_group=None,
    vocab_size: Optional[int] = None,
    temperature: float = 1.0,
    return_logits: bool = False,
    backend: str = "auto",
):
    """Entropy (nats) of ``softmax((hidden @ W.T + b) / temperature)`` over the WHOLE vocabulary,
    with ``W``'s rows sharded over ``process_group`` (a collective: every rank calls it).

    Args:
        hidden: ``[..., D]``, the same on every rank (a replicated activation).
        weight: this rank's vocabulary rows ``[V_rank, D]``: rank 0 holds the first rows,
            rank 1 the next, ...; shards may differ in size (``V`` need not divide).
        bias: optional ``[V_rank]``, this rank's slice of the bias.
        process_group: the group the vocabulary is sharded over (default: the world).
        vocab_size: optional whole ``V``; checked against the sum of the shards.
        temperature, backend: as ``vk.linear_entropy``. The shard's partials come from the
            Triton partials kernels (``"triton"``, W read once) or the PyTorch path (any
            other backend: the C++ backend does not hand out its partials); ``"cpp"``
            still computes dW/db.
        return_logits: also return THIS rank's logits ``[..., V_rank]`` (not differentiable).

    Returns:
        ``entropy [...]`` (float32), identical on every rank, or ``(entropy, logits)``.
        Differentiable in ``hidden`` (global ``dH/dh`` on every rank) and in this rank's
        ``weight``/``bias`` (their own gradients, no communication).

    Communication: one all-gather of ``8`` floats (argument checks: every rank learns the
    others' shapes, dtype, temperature, ...) and one of ``2 D + 3`` floats per row (3
    without a hidden gradient) per rank. A bad input on any rank raises on every rank
    rather than leaving the others waiting in a collective.
    """
    process_group = resolve_group(process_group)
    resolved = backend

    def check():
        nonlocal resolved
        resolved = _local_check(hidden, weight, bias, temperature, return_logits, backend)
        if vocab_size is not None and (isinstance(vocab_size, bool) or not isinstance(vocab_size, int)):
            raise TypeError(f"vocab_size must be an int or None, got {type(vocab_size).__name__}")
        return (weight.shape[0], hidden.shape[-1], math.prod(hidden.shape[:-1]), FLOAT_DTYPES.index(hidden.dtype),
                temperature, _needs_grad(hidden), BACKENDS.index(resolved))

    columns = agree("vocab_parallel_linear_entropy", check, _SUMMARY, process_group,
                    summary_device(hidden, process_group), same=_SAME,
                    decode={"dtype": FLOAT_DTYPES, "backend": BACKENDS})
    sizes = [int(v) for v in columns["vocab rows"]]
    if vocab_size is not None and sum(sizes) != vocab_size:
        raise ValueError(
            f"weight: the ranks' vocabulary shards have {sizes} rows (sum {sum(sizes)}), but vocab_size={vocab_size}: "
            "a shard of the wrong size"
        )
    need_grad = _needs_grad(hidden)

    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.reshape(-1, dim).contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    entropy, logits = _VocabParallelEntropy.apply(
        rows, weight, bias, process_group, float(temperature), need_grad, return_logits, resolved
    )
    entropy = entropy.reshape(lead)
    return (entropy, logits.reshape(*lead, weight.shape[0])) if return_logits else entropy
