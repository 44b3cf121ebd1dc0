"""``linear_logprob_entropy``: the public op, ``torch.library`` custom ops with autograd, and
the one place that picks the backend module (naive.py, cpp.py, triton_backend.py).

The forward is one pass over W for the row statistics, the entropy and the label's
log-probability (docs/design.md §2.4). The backward recomputes the logits chunk by chunk
and forms ``dL/dz`` once for every gradient wanted: with the incoming gradients known,
``dh``, ``dW`` and ``db`` come from that one coefficient matrix, and an output that got no
gradient contributes no term (``set_materialize_grads(False)``: it arrives as None, never
as a zero tensor that is then multiplied).
"""

from typing import Optional

import torch
from torch import Tensor

from vreason_kernels._checks import check_int, check_same, check_tensor
from vreason_kernels.backend import accumulator_dtype, backend_module, resolve_backend_for
from vreason_kernels.ops.linear_entropy import check_args as check_entropy_args
from vreason_kernels.ops.linear_logprob_entropy import sharded
from vreason_kernels.ops.linear_logprob_entropy.labels import has_label


def _backend_impl(backend: str):
    return backend_module(__package__, backend)


@torch.library.custom_op("vreason::linear_logprob_entropy_fwd", mutates_args=())
def _fwd(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float,
         backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return tuple(_backend_impl(backend).forward(hidden, weight, bias, labels, temperature))


@_fwd.register_fake
def _(hidden, weight, bias, labels, temperature, backend):
    row = hidden.new_empty(hidden.shape[0], dtype=accumulator_dtype(hidden.dtype))
    return tuple(torch.empty_like(row) for _ in range(5))


@torch.library.custom_op("vreason::linear_logprob_entropy_grads", mutates_args=())
def linear_logprob_entropy_grads(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor, temperature: float, row_max: Tensor,
    log_sum: Tensor, mean: Tensor, grad_logp: Optional[Tensor], grad_entropy: Optional[Tensor], need_hidden: bool,
    need_weight: bool, need_bias: bool, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dh [R, D] | [0], dW [V, D] | [0], db [V] | [0])`` in the accumulator dtype, from the
    whole row's statistics; ``labels`` index ``weight``'s rows (none outside ``[0, V)``), and
    ``grad_logp`` must be 0 on rows without a label. A vocabulary shard passes its own
    rows, its local label indices and the whole row's statistics (``sharded.py``)."""
    return tuple(_backend_impl(backend).grads(
        hidden, weight, bias, labels, temperature, row_max, log_sum, mean, grad_logp, grad_entropy,
        need_hidden, need_weight, need_bias,
    ))


@linear_logprob_entropy_grads.register_fake
def _(hidden, weight, bias, labels, temperature, row_max, log_sum, mean, grad_logp, grad_entropy, need_hidden,
      need_weight, need_bias, backend):
    acc = accumulator_dtype(hidden.dtype)
    return (hidden.new_empty(hidden.shape if need_hidden else (0,), dtype=acc),
            weight.new_empty(weight.shape if need_weight else (0,), dtype=acc),
            weight.new_empty(weight.shape[0] if need_bias else 0, dtype=acc))


def label_gradient(grad_logp: Optional[Tensor], labels: Tensor, vocab: int, acc: torch.dtype) -> Optional[Tensor]:
    """The incoming gradient of logp as a dense ``[R]`` vector, 0 on rows without a label in
    ``[0, vocab)`` (their logp is a constant 0); None stays None (no label term at all)."""
    if grad_logp is None:
        return None
    g = grad_logp.to(acc)
    return torch.where(has_label(labels, vocab), g, torch.zeros_like(g)).contiguous()


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, backend = inputs
    _, _, row_max, log_sum, mean = output
    ctx.save_for_backward(hidden, weight, bias, labels, row_max, log_sum, mean)
    ctx.temperature, ctx.backend = temperature, backend
    ctx.set_materialize_grads(False)


def _backward(ctx, g_logp, g_entropy, _g_row_max, _g_log_sum, _g_mean):
    hidden, weight, bias, labels, row_max, log_sum, mean = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    if (g_logp is None and g_entropy is None) or not (need_hidden or need_weight or need_bias):
        return None, None, None, None, None, None
    acc = row_max.dtype
    dh, dw, db = linear_logprob_entropy_grads(
        hidden, weight, bias, labels, ctx.temperature, row_max, log_sum, mean,
        label_gradient(g_logp, labels, weight.shape[0], acc),
        None if g_entropy is None else g_entropy.to(acc).contiguous(),
        need_hidden, need_weight, need_bias, ctx.backend,
    )
    return (dh.to(hidden.dtype) if need_hidden else None, dw.to(weight.dtype) if need_weight else None,
            db.to(bias.dtype) if need_bias else None, None, None, None)


_fwd.register_autograd(_backward, setup_context=_setup_context)


def check_args(hidden, weight, labels, bias, temperature, ignore_index) -> None:
    """The public op's argument checks; each error names the argument."""
    check_entropy_args(hidden, weight, bias, temperature, False)
    check_tensor("labels", labels, floating=False)
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 (or int32) tensor, got {labels.dtype}")
    if tuple(labels.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(f"labels must have hidden's leading shape {tuple(hidden.shape[:-1])}, "
                         f"got shape {tuple(labels.shape)}")
    check_same("device", "hidden", hidden, [("labels", labels)])
    check_int("ignore_index", ignore_index)


def _out_of_range(labels: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """The labels that are neither ``ignore_index`` nor in ``[0, V)``."""
    return (labels != ignore_index) & ~has_label(labels, vocab)


def _checked_on_host(labels: Tensor) -> bool:
    """CPU labels outside a compiled graph: reading them costs no device sync and no graph break."""
    return labels.device.type == "cpu" and not torch.compiler.is_compiling()


def check_label_values(labels: Tensor, ignore_index: int, vocab: int) -> None:
    """Labels that are not ``ignore_index`` must lie in ``[0, V)``. Checked on the host where
    that is free (``_checked_on_host``): on CUDA it would cost a device sync every call
    (``nan_for_bad_labels`` marks them there instead)."""
    if not _checked_on_host(labels) or labels.numel() == 0:
        return
    bad = _out_of_range(labels, ignore_index, vocab)
    if bool(bad.any()):
        value = int(labels[bad][0])
        raise ValueError(f"labels must lie in [0, {vocab}) or equal ignore_index={ignore_index}, "
                         f"got {value} ({int(bad.sum())} such labels)")


def prepare_labels(labels: Tensor, ignore_index: int) -> Tensor:
    """Flat int64 labels with ``ignore_index`` rows as -1 (no label)."""
    flat = labels.reshape(-1).to(torch.int64)
    return torch.where(flat == ignore_index, torch.full_like(flat, -1), flat).contiguous()


def nan_for_bad_labels(logp: Tensor, labels: Tensor, ignore_index: int, vocab: int) -> Tensor:
    """Where labels are not checked on the host (CUDA, a compiled graph): NaN logp where a
    label (not ``ignore_index``) is outside ``[0, V)``, computed on the device without a sync."""
    if _checked_on_host(labels):
        return logp
    bad = _out_of_range(labels.reshape(-1), ignore_index, vocab)
    return torch.where(bad, torch.full_like(logp, float("nan")), logp)


class _Sharded(torch.autograd.Function):
    """The op over a vocabulary sharded across a process group (sharded.py): the forward's
    statistics merged over the ranks, each rank's own dW/db, and dh summed over the ranks."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, offset, vocab, process_group, temperature, backend):
        local = labels - offset  # outside [0, V_k): another shard's label, or none
        logp, entropy, row_max, log_sum, mean = sharded.forward(hidden, weight, bias, labels, local, temperature,
                                                                backend, process_group)
        ctx.save_for_backward(hidden, weight, bias, labels, local, row_max, log_sum, mean)
        ctx.vocab, ctx.process_group, ctx.temperature, ctx.backend = vocab, process_group, temperature, backend
        ctx.set_materialize_grads(False)
        return logp, entropy

    @staticmethod
    def backward(ctx, g_logp, g_entropy):
        hidden, weight, bias, labels, local, row_max, log_sum, mean = ctx.saved_tensors
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        if g_logp is None and g_entropy is None:
            return (None,) * 9
        acc = row_max.dtype
        # A row labelled on another shard keeps its g_L here: its -g_L p_j term is on every shard.
        dh, dw, db = linear_logprob_entropy_grads(
            hidden, weight, bias, local, ctx.temperature, row_max, log_sum, mean,
            label_gradient(g_logp, labels, ctx.vocab, acc),
            None if g_entropy is None else g_entropy.to(acc).contiguous(),
            need_hidden, need_weight, need_bias, ctx.backend,
        )
        grad_hidden = sharded.sum_over_ranks(dh, ctx.process_group).to(hidden.dtype) if need_hidden else None
        return (grad_hidden, dw.to(weight.dtype) if need_weight else None,
                db.to(bias.dtype) if need_bias else None) + (None,) * 6


def _sharded_op(hidden, weight, labels, bias, temperature, ignore_index, backend, process_group):
    def check():
        check_args(hidden, weight, labels, bias, temperature, ignore_index)
        return resolve_backend_for(backend, "hidden", hidden)

    group, resolved, offset, vocab = sharded.agree_on_inputs(check, hidden, weight, labels, bias, temperature,
                                                             ignore_index, process_group)
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.reshape(-1, dim).contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    logp, entropy = _Sharded.apply(rows, weight, bias, prepare_labels(labels, ignore_index), offset, vocab, group,
                                   float(temperature), resolved)
    return logp.reshape(lead), entropy.reshape(lead)


def linear_logprob_entropy(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    backend: str = "auto",
    process_group=None,
):
    """Log-probability of each row's label and the entropy of its distribution, without the logits.

    With ``z = (hidden @ weight.T + bias) / temperature``: ``logp = log_softmax(z)[label]``
    and ``entropy = -sum softmax(z) log softmax(z)`` (nats), from one pass over ``weight``.

    Args:
        hidden: ``[..., D]`` float32/float16/bfloat16 (float64 with ``backend="torch"``).
        weight: ``[V, D]``, same dtype and device (an LM head's weight); with
            ``process_group``, this rank's vocabulary rows.
        labels: ``[...]`` int64 (or int32), hidden's leading shape.
        bias: optional ``[V]`` (this rank's slice with ``process_group``); ``-inf`` masks.
        temperature: finite and > 0.
        ignore_index: label of rows that get ``logp = 0`` and no gradient through it (their
            entropy is still computed).
        backend: ``"auto"``, ``"triton"``, ``"cpp"`` or ``"torch"``.
        process_group: a group the vocabulary is sharded over (``weight``/``bias`` are the
            local shard, rank 0 holding the first rows; ``hidden`` and ``labels`` the same
            on every rank). A collective: every rank calls it.

    Returns:
        ``(logp, entropy)``, both ``[...]`` float32 (float64 for float64 input).
        ``logp <= 0`` always. Differentiable in ``hidden``, ``weight`` and ``bias`` for any
        mix of incoming gradients; an output whose gradient is unused costs nothing.

    Labels outside ``[0, V)`` that are not ``ignore_index`` raise a ``ValueError`` for CPU
    tensors. On CUDA they are not checked (that would sync every call): their ``logp`` is
    NaN and they add no label term to the gradients (likewise inside ``torch.compile``). A row whose logits are all -inf has
    NaN logp and entropy; a label whose logit is -inf has ``logp = -inf``.
    """
    if process_group is not None:
        return _sharded_op(hidden, weight, labels, bias, temperature, ignore_index, backend, process_group)
    check_args(hidden, weight, labels, bias, temperature, ignore_index)
    resolved = resolve_backend_for(backend, "hidden", hidden)
    vocab = weight.shape[0]
    check_label_values(labels, ignore_index, vocab)
    lead, dim = hidden.shape[:-1], hidden.shape[-1]
    rows = hidden.reshape(-1, dim).contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    flat = prepare_labels(labels, ignore_index)
    logp, entropy, _, _, _ = _fwd(rows, weight, bias, flat, float(temperature), resolved)
    logp = nan_for_bad_labels(logp, labels, ignore_index, vocab)
    return logp.reshape(lead), entropy.reshape(lead)
