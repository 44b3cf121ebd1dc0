"""The T=1 linear_entropy kernel (ops/linear_entropy/triton_decode.py) against the float64
reference: entropy, logits and dH/dh, each within 2x the error of plain PyTorch in the same
dtype (docs/design.md §5). Runs on CUDA, or under the Triton interpreter on CPU.
"""

import functools
import math

import pytest
import torch
import triton

import vreason_kernels as vk
from python_tests.helpers import assert_close_to_reference, linear_entropy_inputs
from vreason_kernels.backend import triton_interpreted
from vreason_kernels.ops.linear_entropy import naive

if not (torch.cuda.is_available() or triton_interpreted()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

decode = pytest.importorskip("vreason_kernels.ops.linear_entropy.triton_decode")
tk = pytest.importorskip("vreason_kernels.ops.linear_entropy.triton_backend")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


_inputs = functools.partial(linear_entropy_inputs, 1, logit_scale=3.0, device=DEVICE)  # (vocab, dim, dtype): one row


def _run(fn, hidden, weight, bias, grad_entropy, **kw):
    """(entropy, logits, dL/dhidden) for L = g * H."""
    h = hidden.detach().clone().requires_grad_()
    entropy, logits = fn(h, weight, bias, return_logits=True, **kw)
    (entropy.double() * grad_entropy).sum().backward()
    return entropy, logits, h.grad


def _atol(dtype, reference):
    return (1e-5 if dtype == torch.float32 else 1e-3) * max(1.0, reference.abs().max().item())


def _check(hidden, weight, bias, *, temperature=1.0):
    dtype = hidden.dtype
    grad = torch.randn(1, dtype=torch.float64, device=DEVICE)
    as64 = [t.double() if t is not None else None for t in (hidden, weight, bias)]
    ref = _run(naive.linear_entropy, *as64, grad, temperature=temperature)
    base = _run(naive.linear_entropy, hidden, weight, bias, grad, temperature=temperature)
    got = _run(vk.linear_entropy, hidden, weight, bias, grad, temperature=temperature, backend="triton")
    assert_close_to_reference(got[0], ref[0], base[0], k=2.0, atol=_atol(dtype, ref[0]), name="entropy")
    assert_close_to_reference(got[2], ref[2], base[2], k=2.0, atol=_atol(dtype, ref[2]), name="grad hidden")
    finite = torch.isfinite(ref[1])
    assert torch.equal(torch.isfinite(got[1]), finite), "logits: -inf exactly where the reference has it"
    ref_logits, base_logits, got_logits = (x[finite] for x in (ref[1], base[1], got[1]))
    # The interpreter casts fp32 -> bf16 by truncation, not rounding: up to one bf16 ulp
    # at the largest logit where plain PyTorch is off by half of one.
    ulp = 2.0 ** (math.floor(math.log2(ref_logits.abs().max().item())) - 7) if dtype == torch.bfloat16 else 0.0
    assert_close_to_reference(got_logits, ref_logits, base_logits, k=2.0, atol=_atol(dtype, ref_logits) + ulp,
                              name="logits")


def test_decode_kernel_serves_one_row_up_to_its_max_dim(monkeypatch):
    assert decode.decode_kernel_applies(1, 80)
    assert decode.decode_kernel_applies(1, decode.MAX_DIM)
    assert not decode.decode_kernel_applies(2, 80)
    assert not decode.decode_kernel_applies(1, decode.MAX_DIM + 1)
    monkeypatch.setenv("VREASON_LINEAR_ENTROPY_DECODE_KERNEL", "0")
    assert not decode.decode_kernel_applies(1, 80)


def test_launches_the_decode_kernel_for_one_row(monkeypatch):
    launched = []
    original = decode.launch_partials
    monkeypatch.setattr(decode, "launch_partials", lambda *a, **k: launched.append(1) or original(*a, **k))
    vk.linear_entropy(*_inputs(97, 33, torch.float32)[:2], backend="triton")
    assert launched == [1]
    vk.linear_entropy(torch.randn(2, 33, device=DEVICE), torch.randn(97, 33, device=DEVICE), backend="triton")
    assert launched == [1]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "vocab,dim,bias", [(301, 33, True), pytest.param(1237, 80, False, marks=pytest.mark.slow), (37, 17, True)]
)
def test_matches_reference(dtype, vocab, dim, bias):
    _check(*_inputs(vocab, dim, dtype, bias=bias))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_temperature_and_large_logit_offset(dtype):
    _check(*_inputs(211, 48, dtype, offset=1e4 if dtype == torch.float32 else 300.0), temperature=0.37)


def test_masked_vocabulary_and_splits_that_see_only_masked_entries():
    hidden, weight, bias = _inputs(151, 29, torch.float32)
    bias[:100] = float("-inf")  # the first splits see no live entry at all
    _check(hidden, weight, bias, temperature=1.7)


@pytest.mark.parametrize("num_splits", [1, 3, 1000])
def test_split_counts_agree(num_splits):
    """Any split count (more than tiles included) gives the one-split result up to rounding."""
    hidden, weight, bias = _inputs(173, 41, torch.float32)
    blocks = decode.decode_blocks(41)
    assert triton.cdiv(173, blocks["BLOCK_V"]) > 3, "the shape must span several tiles"
    one = tk.one_pass_forward(hidden, weight, bias, 1.0, True, True, num_splits=1)
    many = tk.one_pass_forward(hidden, weight, bias, 1.0, True, True, num_splits=num_splits)
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_deterministic():
    hidden, weight, bias = _inputs(257, 37, torch.bfloat16)
    first = tk.forward(hidden, weight, bias, 1.0, True, True)
    second = tk.forward(hidden, weight, bias, 1.0, True, True)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
