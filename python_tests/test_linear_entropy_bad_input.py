"""linear_entropy bad-input sweep (docs/design.md §8.5): a clear error naming the argument, or
the documented result, on every backend; never a crash in C++, a hang, or a silent NaN.

The argument checks run before any backend is picked, so they are tested once; the
edge-case results (empty, non-finite, all-masked, extreme temperatures) per backend.
"""

import math

import pytest
import torch

import vreason_kernels as vk
from python_tests.helpers import BACKENDS, check_linear_entropy, needs_extension

R, V, D = 3, 17, 8


def _call(hidden=None, weight=None, bias=None, **kw):
    hidden = torch.randn(R, D) if hidden is None else hidden
    weight = torch.randn(V, D) if weight is None else weight
    return vk.linear_entropy(hidden, weight, bias, **kw)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(hidden=torch.tensor(1.0)), ValueError, "hidden must have at least 1 dims"),
        (dict(weight=torch.randn(V)), ValueError, "weight must have 2 dims"),
        (dict(weight=torch.randn(1, V, D)), ValueError, "weight must have 2 dims"),
        (dict(bias=torch.randn(1, V)), ValueError, "bias must have 1 dims"),
        (dict(bias=torch.randn(V + 1)), ValueError, r"bias must have shape \[V\]"),
        (dict(weight=torch.randn(V, D + 1)), ValueError, "D = hidden.shape"),
        (dict(hidden=torch.randn(R, 0), weight=torch.randn(V, 0)), ValueError, "non-empty last dimension"),
        (dict(weight=torch.randn(0, D)), ValueError, "non-empty vocabulary"),
        (dict(hidden=torch.ones(R, D, dtype=torch.int64)), TypeError, "hidden must be a floating tensor"),
        (dict(weight=torch.ones(V, D, dtype=torch.int32)), TypeError, "weight must be a floating tensor"),
        (dict(hidden=torch.randn(R, D, dtype=torch.complex64)), TypeError, "hidden must be a floating tensor"),
        (dict(bias=torch.zeros(V, dtype=torch.bool)), TypeError, "bias must be a floating tensor"),
        (dict(weight=torch.randn(V, D).half()), ValueError, "weight must have the same dtype"),
        (dict(bias=torch.randn(V).double()), ValueError, "bias must have the same dtype"),
        (dict(weight=torch.randn(V, D, device="meta")), ValueError, "weight must have the same device"),
        (dict(hidden=[[0.0] * D]), TypeError, "hidden must be a torch.Tensor"),
        (dict(bias=[0.0] * V), TypeError, "bias must be a torch.Tensor"),
        pytest.param(dict(hidden=torch.randn(R, D).double(), backend="cpp"), TypeError,
                     "float64 is supported only by backend='torch'", marks=needs_extension),
        (dict(hidden=torch.randn(R, D).double(), backend="triton"), TypeError, "float64"),
        (dict(return_logits=1), TypeError, "return_logits must be a bool"),
        (dict(return_logits=None), TypeError, "return_logits must be a bool"),
        (dict(backend="TORCH"), ValueError, "backend must be one of"),
        (dict(backend=None), ValueError, "backend must be one of"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_arguments_name_the_argument(kwargs, error, match):
    if "hidden" in kwargs and isinstance(kwargs["hidden"], torch.Tensor) and kwargs["hidden"].dtype == torch.float64:
        kwargs["weight"] = torch.randn(V, D).double()
    with pytest.raises(error, match=match):
        _call(**kwargs)


@pytest.mark.parametrize(
    "temperature,error",
    [
        (0.0, ValueError), (-1.0, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
        (0, ValueError), (True, TypeError), (torch.tensor(1.0), TypeError), ("1", TypeError), (None, TypeError),
    ],
    ids=str,
)
def test_bad_temperature(temperature, error):
    with pytest.raises(error, match="temperature"):
        _call(temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_rows_give_empty_results_and_zero_weight_grads(backend):
    hidden = torch.randn(2, 0, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    bias = torch.randn(V, requires_grad=True)
    entropy, logits = vk.linear_entropy(hidden, weight, bias, return_logits=True, backend=backend)
    assert entropy.shape == (2, 0) and logits.shape == (2, 0, V)
    (entropy.sum() + logits.sum()).backward()
    assert hidden.grad.shape == hidden.shape
    assert torch.equal(weight.grad, torch.zeros(V, D)) and torch.equal(bias.grad, torch.zeros(V))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=str)
def test_non_finite_hidden_row_poisons_that_row_only(backend, bad):
    hidden = torch.randn(R, D)
    hidden[1, 2] = bad
    hidden.requires_grad_()
    weight = torch.randn(V, D, requires_grad=True)
    entropy = vk.linear_entropy(hidden, weight, backend=backend)
    assert entropy[1].isnan() and torch.isfinite(entropy[[0, 2]]).all()
    entropy[[0, 2]].sum().backward()
    assert torch.isfinite(hidden.grad[[0, 2]]).all()
    assert not torch.isfinite(hidden.grad[1]).all()
    assert not torch.isfinite(weight.grad).all()  # a sum over rows, one of them non-finite
    healthy = torch.stack([hidden[0], hidden[2]]).detach()
    check_linear_entropy(backend, healthy, weight.detach(), None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["weight", "bias"])
def test_nan_in_weight_or_bias_reaches_every_row(backend, where):
    weight, bias = torch.randn(V, D), torch.randn(V)
    (weight[4] if where == "weight" else bias)[...] = float("nan")
    assert vk.linear_entropy(torch.randn(R, D), weight, bias, backend=backend).isnan().all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_masked_row_is_nan_with_nan_hidden_grad_and_no_weight_grad(backend):
    """A bias of -inf everywhere leaves no distribution: NaN entropy and dH/dh (0/0),
    nothing added to dW/db, so a loss that masks the NaN rows out stays finite."""
    hidden = torch.randn(R, D, requires_grad=True)
    weight = torch.randn(V, D, requires_grad=True)
    bias = torch.full((V,), float("-inf"), requires_grad=True)
    entropy = vk.linear_entropy(hidden, weight, bias, backend=backend)
    assert entropy.isnan().all()
    torch.where(entropy.isnan(), 0.0, entropy).sum().backward()  # the usual masking
    assert hidden.grad.isnan().all()
    assert torch.equal(weight.grad, torch.zeros(V, D)) and torch.equal(bias.grad, torch.zeros(V))


@pytest.mark.parametrize("backend", BACKENDS)
def test_sparse_mask_leaves_results_exact(backend):
    """Three quarters of the vocabulary masked, in one block and scattered."""
    hidden, weight = torch.randn(R, D), torch.randn(V, D) / math.sqrt(D)
    bias = torch.randn(V)
    bias[: V // 2] = float("-inf")
    bias[V // 2 + 1 :] = torch.where(torch.rand(V - V // 2 - 1) < 0.5, float("-inf"), 0.0)
    check_linear_entropy(backend, hidden, weight, bias)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("temperature", [1e-30, 1e-3, 1e3, 1e30], ids=str)
def test_extreme_temperatures_are_finite(backend, temperature):
    hidden, weight = torch.randn(R, D), torch.randn(V, D)
    hidden.requires_grad_()
    entropy = vk.linear_entropy(hidden, weight, temperature=temperature, backend=backend)
    entropy.sum().backward()
    assert torch.isfinite(entropy).all() and torch.isfinite(hidden.grad).all()
    assert (entropy >= 0).all()
    if temperature <= 1e-30:
        assert torch.equal(entropy, torch.zeros(R))  # z gaps of ~1e30: one word keeps p = 1
    if temperature >= 1e30:
        assert torch.allclose(entropy, torch.full((R,), math.log(V)))
