"""``linear_entropy``: the public op, a ``torch.library`` custom op with autograd, and the
one place that picks the backend module (naive.py, cpp.py, triton_backend.py).

The forward of every backend returns ``dH/dh`` from the same single pass over the
weight that gives the entropy (docs/design.md §2.1), so the backward for ``hidden`` only
scales it by ``grad_output``. ``dW``/``db`` take a second pass over the weight, run
only when the weight or bias requires grad.
"""

from typing import Optional

import torch
from torch import Tensor

from vreason_kernels._checks import check_bool, check_number, check_same, check_tensor
from vreason_kernels.backend import accumulator_dtype, backend_module, resolve_backend_for
from vreason_kernels.ops.linear_entropy.partials import Partials


def _backend_impl(backend: str):
    return backend_module(__package__, backend)


@torch.library.custom_op("vreason::linear_entropy_fwd", mutates_args=())
def _linear_entropy_fwd(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    need_grad: bool,
    return_logits: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    return _backend_impl(backend).forward(hidden, weight, bias, temperature, need_grad, return_logits)


@_linear_entropy_fwd.register_fake
def _(hidden, weight, bias, temperature, need_grad, return_logits, backend):
    rows, dim = hidden.shape
    acc = accumulator_dtype(hidden.dtype)
    row_stat = hidden.new_empty(rows, dtype=acc)
    return (
        row_stat,
        hidden.new_empty((rows, dim) if need_grad else (0,), dtype=acc),
        torch.empty_like(row_stat),
        torch.empty_like(row_stat),
        hidden.new_empty((rows, weight.shape[0]) if return_logits else (0,)),
    )


@torch.library.custom_op("vreason::linear_entropy_weight_grad", mutates_args=())
def linear_entropy_weight_grad(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    temperature: float,
    row_max: Tensor,
    log_sum: Tensor,
    entropy: Tensor,
    grad_entropy: Tensor,
    need_bias: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    return _backend_impl(backend).weight_grad(
        hidden, weight, bias, temperature, row_max, log_sum, entropy, grad_entropy, need_bias
    )


@linear_entropy_weight_grad.register_fake
def _(hidden, weight, bias, temperature, row_max, log_sum, entropy, grad_entropy, need_bias, backend):
    acc = accumulator_dtype(hidden.dtype)
    return weight.new_empty(weight.shape, dtype=acc), weight.new_empty(weight.shape[0] if need_bias else 0, dtype=acc)


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, temperature, _, return_logits, backend = inputs
    entropy, dh, row_max, log_sum, _ = output
    ctx.save_for_backward(hidden, weight, bias, dh, row_max, log_sum, entropy)
    ctx.temperature, ctx.return_logits, ctx.backend = temperature, return_logits, backend
    # Unused outputs then reach the backward as None rather than zeros: logits returned
    # for sampling only must not cost a second read of W in the backward.
    ctx.set_materialize_grads(False)


def _sum(a: Optional[Tensor], b: Tensor) -> Tensor:
    return b if a is None else a + b


def _backward(ctx, g_entropy, _g_dh, _g_row_max, _g_log_sum, g_logits):
    hidden, weight, bias, dh, row_max, log_sum, entropy = ctx.saved_tensors
    need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
    acc = entropy.dtype
    grad_hidden = grad_weight = grad_bias = None
    if g_entropy is not None:
        if need_hidden:
            grad_hidden = g_entropy.to(acc).unsqueeze(-1) * dh
        if need_weight or need_bias:
            # Gradients come in any layout: stride 0 from .sum()/.mean(), views, ...;
            # the kernels read a dense [R] vector.
            grad_weight, grad_bias = linear_entropy_weight_grad(
                hidden, weight, bias, ctx.temperature, row_max, log_sum, entropy,
                g_entropy.to(acc).contiguous(), need_bias, ctx.backend,
            )
    if g_logits is not None:
        # Returned logits are W h + b, an ordinary linear layer's output.
        g = g_logits.to(acc)
        if need_hidden:
            grad_hidden = _sum(grad_hidden, g @ weight.to(g.dtype))
        if need_weight:
            grad_weight = _sum(grad_weight, g.transpose(0, 1) @ hidden.to(g.dtype))
        if need_bias:
            grad_bias = _sum(grad_bias, g.sum(0))
    return (
        None if grad_hidden is None else grad_hidden.to(hidden.dtype),
        None if grad_weight is None or not need_weight else grad_weight.to(weight.dtype),
        None if grad_bias is None or not need_bias else grad_bias.to(bias.dtype),
        None,
        None,
        None,
        None,
    )


_linear_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)


def slice_partials(hidden, weight, bias, temperature: float, need_grad: bool, return_logits: bool,
                   backend: str) -> tuple[Partials, Tensor]:
    """``(Partials, logits [R, V_slice] | [0])`` of the vocabulary rows in ``weight``, a slice
    of the head (partials.py), for ``hidden [R, D]`` and a resolved ``backend``.

    ``"triton"`` runs the fused partials kernels (W read once) and folds their splits; any
    other backend takes the torch reference's, which materialises the slice's logits (the
    C++ backend keeps its partials internal).
    """
    impl = _backend_impl("triton" if backend == "triton" and hidden.shape[0] > 0 else "torch")
    return impl.slice_partials(hidden, weight, bias, temperature, need_grad, return_logits)


def check_args(hidden, weight, bias, temperature, return_logits) -> None:
    """The public op's argument checks; each error names the argument."""
    check_tensor("hidden", hidden, min_ndim=1)
    check_tensor("weight", weight, ndim=2)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
    dim = hidden.shape[-1]
    if dim == 0:
        raise ValueError(f"hidden must have a non-empty last dimension D, got shape {tuple(hidden.shape)}")
    if weight.shape[1] != dim:
        raise ValueError(
            f"weight must have shape [V, D] with D = hidden.shape[-1] = {dim}, got shape {tuple(weight.shape)}"
        )
    if weight.shape[0] == 0:
        raise ValueError(f"weight must have a non-empty vocabulary (V >= 1), got shape {tuple(weight.shape)}")
    if bias is not None and bias.shape[0] != weight.shape[0]:
        raise ValueError(f"bias must have shape [V] = [{weight.shape[0]}], got shape {tuple(bias.shape)}")
    check_same("dtype", "hidden", hidden, [("weight", weight), ("bias", bias)])
    check_same("device", "hidden", hidden, [("weight", weight), ("bias", bias)])
    check_number("temperature", temperature, low=0.0, low_open=True)
    check_bool("return_logits", return_logits)


def linear_entropy(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    *,
    temperature: float = 1.0,
    return_logits: bool = False,
    backend: str = "auto",
):
    """Entropy (nats) of ``softmax((hidden @ weight.T + bias) / temperature)`` per row.

    Args:
        hidden: ``[..., D]`` float32/float16/bfloat16 (float64 with ``backend="torch"``).
        weight: ``[V, D]``, same dtype and device as ``hidden`` (an LM head's weight).
        bias: optional ``[V]``; ``-inf`` entries mask those vocabulary items.
        temperature: softmax temperature, finite and > 0 (default 1.0).
        return_logits: also return ``hidden @ weight.T + bias`` (without temperature),
            ``[..., V]`` in ``hidden``'s dtype. Off by default: the fused backends never
            materialise the logits otherwise.
        backend: ``"auto"`` (default: Triton on CUDA, C++ on CPU), ``"triton"``,
            ``"cpp"`` or ``"torch"``.

    Returns:
        ``entropy [...]`` as float32, or ``(entropy, logits)``. Differentiable in
        ``hidden``, and in ``weight``/``bias`` when they require grad; the backward
        takes gradients of any layout (expanded by ``.sum()``, strided, dense).

    Edge cases (the same in every backend; checking them would cost a device sync):
        * Zero rows (``hidden [..., 0, D]``): empty entropy and logits, zero dW/db.
        * A row whose logits are all -inf has no distribution: its entropy and its
          dH/dh are NaN, and it adds nothing to dW/db. Other rows are unaffected.
        * NaN/Inf in a row of ``hidden`` make that row's entropy and hidden gradient
          NaN (other rows stay exact); dW, a sum over rows, then holds NaN too. A NaN
          in ``weight`` or ``bias`` reaches every row. Never an error or a hang.
        * Tiny or huge temperatures give finite results: 0 for a strict argmax as
          tau -> 0, log V as tau -> inf.
    """
    check_args(hidden, weight, bias, temperature, return_logits)
    resolved = resolve_backend_for(backend, "hidden", hidden)
    lead, dim, vocab = hidden.shape[:-1], hidden.shape[-1], weight.shape[0]
    rows = hidden.reshape(-1, dim).contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    bias = None if bias is None else bias.contiguous()
    need_grad = torch.is_grad_enabled() and hidden.requires_grad
    entropy, _, _, _, logits = _linear_entropy_fwd(
        rows, weight, bias, float(temperature), need_grad, return_logits, resolved
    )
    entropy = entropy.reshape(lead)
    return (entropy, logits.reshape(*lead, vocab)) if return_logits else entropy
