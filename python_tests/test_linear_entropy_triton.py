"""Triton-specific checks of linear_entropy: the vocabulary split/merge, strides, empty rows.

The backend-generic accuracy tests live in test_linear_entropy.py; these call the backend
module directly so that they can force the split count (``num_splits``) of the one-pass
kernels (``one_pass_forward``: with the gradient at T > 1 it is what the vocabulary-parallel
op runs per slice; ``forward`` takes the statistics-first path there, tested in
test_linear_entropy_chunked.py). The weight gradients checked here take that path too.
"""

import functools

import pytest
import torch

from python_tests.helpers import linear_entropy_inputs
from vreason_kernels.backend import triton_interpreted
from vreason_kernels.ops.linear_entropy import naive

tk = pytest.importorskip("vreason_kernels.ops.linear_entropy.triton_backend")

if not (torch.cuda.is_available() or triton_interpreted()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_inputs = functools.partial(linear_entropy_inputs, device=DEVICE)  # (rows, vocab, dim, dtype)


def _assert_matches_reference(hidden, weight, bias, temperature=1.0, num_splits=None, atol=2e-5):
    """Every forward output and both weight grads against naive.py in float64."""
    out = tk.one_pass_forward(hidden, weight, bias, temperature, True, True, num_splits=num_splits)
    as64 = [t.double() for t in (hidden, weight, bias)]
    ref = naive.forward(*as64, temperature, True, True)
    for name, got, want in zip(("entropy", "dh", "row_max", "log_sum", "logits"), out, ref):
        finite = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite pattern differs"
        torch.testing.assert_close(got.double()[finite], want[finite], atol=atol, rtol=1e-5, msg=name)
    grad = torch.randn(hidden.shape[0], device=DEVICE)
    got_w = tk.weight_grad(hidden, weight, bias, temperature, out[2], out[3], out[0], grad, True)
    want_w = naive.weight_grad(*as64, temperature, ref[2], ref[3], ref[0], grad.double(), True)
    for name, got, want in zip(("dW", "db"), got_w, want_w):
        torch.testing.assert_close(got.double(), want, atol=atol, rtol=1e-5, msg=name)
    return out


@pytest.mark.parametrize("num_splits", [1, 2, 5, 100])
def test_any_split_count_matches_reference(num_splits):
    # 100 splits of a 301-word vocabulary: one tile per split, the last one partial.
    hidden, weight, bias = _inputs(19, 301, 45)
    _assert_matches_reference(hidden, weight, bias, temperature=0.8, num_splits=num_splits)


def test_fully_masked_splits_and_a_lone_word_in_the_last_split():
    # Every split but the last sees only -inf: its partial (m=-inf, s=t=A=B=0) must merge to nothing.
    hidden, weight, bias = _inputs(5, 203, 33)
    bias[:202] = float("-inf")
    out = _assert_matches_reference(hidden, weight, bias, num_splits=7)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1], torch.zeros_like(out[1]))


def test_large_logits_across_splits():
    # Logits of magnitude ~1e4: each split's max differs by thousands, so r_k underflows to 0.
    hidden, weight, bias = _inputs(4, 149, 40, logit_scale=2e4)
    out = tk.one_pass_forward(hidden, weight, bias, 1.0, True, False, num_splits=6)
    ref = naive.forward(hidden.double(), weight.double(), bias.double(), 1.0, True, False)
    torch.testing.assert_close(out[0].double(), ref[0], atol=1e-4, rtol=0)
    torch.testing.assert_close(out[1].double(), ref[1], atol=2e-3, rtol=1e-4)


def test_strided_weight_and_half_precision():
    wide = torch.randn(97, 60, device=DEVICE).to(torch.bfloat16)
    weight = wide[:, 3:40]  # row stride 60, not D = 37
    hidden = torch.randn(18, 37, device=DEVICE).to(torch.bfloat16)  # two row blocks
    bias = torch.randn(97, device=DEVICE).to(torch.bfloat16)
    # Inputs are exact bf16 values and every sum is fp32, so only logits' output rounding shows.
    out = tk.one_pass_forward(hidden, weight, bias, 1.3, True, True, num_splits=3)
    ref = naive.forward(hidden.double(), weight.double(), bias.double(), 1.3, True, True)
    for got, want in zip(out[:4], ref[:4]):
        torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[4], ref[4].to(torch.bfloat16))


def test_same_bits_every_run():
    hidden, weight, bias = _inputs(9, 211, 50, torch.bfloat16)
    first, second = (tk.one_pass_forward(hidden, weight, bias, 1.0, True, True, num_splits=4) for _ in range(2))
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    grad = torch.randn(9, device=DEVICE)
    w1, w2 = (tk.weight_grad(hidden, weight, bias, 1.0, first[2], first[3], first[0], grad, True) for _ in range(2))
    assert torch.equal(w1[0], w2[0]) and torch.equal(w1[1], w2[1])


def test_forward_without_grad_or_logits_and_without_bias():
    hidden, weight, _ = _inputs(3, 77, 21)
    entropy, dh, row_max, log_sum, logits = tk.forward(hidden, weight, None, 1.0, False, False)
    assert dh.shape == (0,) and logits.shape == (0,)
    ref = naive.forward(hidden.double(), weight.double(), None, 1.0, False, False)
    for got, want in zip((entropy, row_max, log_sum), (ref[0], ref[2], ref[3])):
        torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=1e-5)


def test_zero_rows():
    hidden, weight, bias = _inputs(0, 31, 12)
    entropy, dh, row_max, log_sum, logits = tk.forward(hidden, weight, bias, 1.0, True, True)
    assert entropy.shape == row_max.shape == log_sum.shape == (0,) and dh.shape == (0, 12) and logits.shape == (0, 31)
    grad_weight, grad_bias = tk.weight_grad(hidden, weight, bias, 1.0, row_max, log_sum, entropy, entropy, True)
    assert torch.equal(grad_weight, torch.zeros(31, 12, device=DEVICE))
    assert torch.equal(grad_bias, torch.zeros(31, device=DEVICE))


def test_one_autotune_config_under_the_interpreter():
    if not triton_interpreted():
        pytest.skip("interpreter only")
    from vreason_kernels.ops.linear_entropy import triton_matmul, triton_one_pass

    assert len(triton_one_pass._forward_partials.configs) == 1 and len(triton_matmul._matmul.configs) == 1
