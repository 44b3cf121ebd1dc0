"""The many-rows path of the Triton linear_entropy (statistics first, then G W) and its matmul.

The op-level accuracy, gradient and bad-input suites run this path for every multi-row
gradient; these tests pin what they cannot see: chunk boundaries, the matmul's split-K,
accumulation, strides and mixed dtypes, and which kernels each call launches.
"""

import functools

import pytest
import torch

from python_tests.helpers import assert_close_to_reference, linear_entropy_inputs
from vreason_kernels.backend import triton_interpreted
from vreason_kernels.ops.linear_entropy import naive

if not (torch.cuda.is_available() or triton_interpreted()):
    pytest.skip("Triton needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from vreason_kernels.ops.linear_entropy import triton_chunked as chunked  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_backend as tk  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_matmul  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


_inputs = functools.partial(linear_entropy_inputs, device=DEVICE)  # (rows, vocab, dim, dtype)


def _check(hidden, weight, bias, temperature=1.0):
    """Forward (with gradient and logits) and both weight grads against naive.py in float64.

    The rule is flash-attention's: at most 2x the error of the same computation in plain
    PyTorch at the inputs' dtype (naive.py on the unconverted inputs), plus a small floor.
    """
    out = tk.forward(hidden, weight, bias, temperature, True, True)
    as64 = [None if t is None else t.double() for t in (hidden, weight, bias)]
    ref = naive.forward(*as64, temperature, True, True)
    base = naive.forward(hidden, weight, bias, temperature, True, True)
    names = ("entropy", "dh", "row_max", "log_sum", "logits")
    for name, got, want, plain in zip(names, out, ref, base):
        _assert_within_2x(name, got, want, plain)
    grad = torch.randn(hidden.shape[0], device=DEVICE)
    need_bias = bias is not None
    got = tk.weight_grad(hidden, weight, bias, temperature, out[2], out[3], out[0], grad, need_bias)
    want = naive.weight_grad(*as64, temperature, ref[2], ref[3], ref[0], grad.double(), need_bias)
    plain = naive.weight_grad(hidden, weight, bias, temperature, base[2], base[3], base[0], grad, need_bias)
    for name, g, w, b in zip(("dW", "db"), got, want, plain):
        _assert_within_2x(name, g, w, b)


def _assert_within_2x(name, got, want, plain):
    if want.numel():  # db is empty without a bias
        floor = 1e-6 * max(1.0, want.abs().max().item())
        assert_close_to_reference(got, want, plain.double(), k=2.0, atol=floor, name=name)


@pytest.mark.parametrize(
    "scratch_rows", [pytest.param(1, marks=pytest.mark.slow), 4, 7, 1000], ids=lambda r: f"{r}-rows-per-chunk"
)
def test_any_chunking_matches_reference(monkeypatch, scratch_rows):
    vocab = 211
    monkeypatch.setattr(chunked, "SCRATCH_BYTES", scratch_rows * 4 * vocab)
    hidden, weight, bias = _inputs(23, vocab, 37)
    assert chunked.chunk_rows(23, vocab) == min(23, scratch_rows)
    _check(hidden, weight, bias, temperature=0.7)


def test_weight_grad_of_a_vocabulary_slice_uses_the_row_statistics_given():
    """A vocabulary-parallel rank holds some columns of W but needs G from whole rows: the
    weight gradient must read the statistics it is given, not its slice's own."""
    hidden, weight, bias = _inputs(11, 97, 31)
    entropy, _, row_max, log_sum, _ = tk.forward(hidden, weight, bias, 0.9, False, False)
    grad = torch.randn(11, device=DEVICE)
    whole = tk.weight_grad(hidden, weight, bias, 0.9, row_max, log_sum, entropy, grad, True)
    lo, hi = 30, 71
    part = tk.weight_grad(hidden, weight[lo:hi], bias[lo:hi], 0.9, row_max, log_sum, entropy, grad, True)
    for name, got, want in zip(("dW", "db"), part, whole):
        torch.testing.assert_close(got, want[lo:hi], rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_half_inputs(dtype):
    _check(*_inputs(13, 173, 29, dtype), temperature=1.3)


def test_large_offset_without_bias_and_strided_weight():
    wide = torch.randn(157, 70, device=DEVICE) * 3
    weight = wide[:, 5:48]  # row stride 70, D = 43
    hidden = torch.randn(9, 43, device=DEVICE) + 30.0  # logits near +-1000
    _check(hidden, weight, None)


def test_masked_vocabulary_and_a_row_with_no_distribution():
    hidden, weight, bias = _inputs(6, 97, 21)
    bias[::3] = float("-inf")
    out = tk.forward(hidden, weight, bias, 1.0, True, False)
    ref = naive.forward(hidden.double(), weight.double(), bias.double(), 1.0, True, False)
    torch.testing.assert_close(out[0].double(), ref[0], atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), ref[1], atol=2e-5, rtol=1e-5)
    bias[:] = float("-inf")  # every logit masked: no distribution, NaN like the one-pass kernels
    entropy, dh, row_max, log_sum, _ = tk.forward(hidden, weight, bias, 1.0, True, False)
    assert entropy.isnan().all() and dh.isnan().all()
    grad_weight, grad_bias = tk.weight_grad(hidden, weight, bias, 1.0, row_max, log_sum, entropy,
                                            torch.ones(6, device=DEVICE), True)
    assert torch.equal(grad_weight, torch.zeros_like(grad_weight))
    assert torch.equal(grad_bias, torch.zeros_like(grad_bias))


def test_same_bits_every_run():
    hidden, weight, bias = _inputs(19, 157, 40, torch.bfloat16)
    first, second = (tk.forward(hidden, weight, bias, 1.0, True, True) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    grad = torch.randn(19, device=DEVICE)
    dw1, dw2 = (tk.weight_grad(hidden, weight, bias, 1.0, first[2], first[3], first[0], grad, True) for _ in range(2))
    assert torch.equal(dw1[0], dw2[0]) and torch.equal(dw1[1], dw2[1])


def test_one_pass_kernels_only_where_they_read_w_once(monkeypatch):
    """The gradient of more than one row, and every weight gradient, take this path;
    the entropy alone and one row's gradient take the one-pass kernels."""
    launched = []
    one_pass, logits = tk.forward_partials, chunked._logits
    monkeypatch.setattr(tk, "forward_partials", lambda *a, **k: launched.append("one-pass") or one_pass(*a, **k))
    monkeypatch.setattr(chunked, "_logits", lambda *a, **k: launched.append("chunked") or logits(*a, **k))
    hidden, weight, bias = _inputs(3, 67, 17)
    out = tk.forward(hidden, weight, bias, 1.0, True, False)
    assert launched == ["chunked"]
    tk.forward(hidden, weight, bias, 1.0, False, False)
    tk.forward(hidden[:1], weight, bias, 1.0, True, False)
    assert launched == ["chunked", "one-pass", "one-pass"]
    tk.weight_grad(hidden[:1], weight, bias, 1.0, out[2][:1], out[3][:1], out[0][:1], torch.ones(1, device=DEVICE),
                   True)
    assert launched[-1] == "chunked"


def test_switch_sends_one_row_to_this_path(monkeypatch):
    monkeypatch.setenv("VREASON_LINEAR_ENTROPY_DECODE_KERNEL", "0")
    _check(*_inputs(1, 131, 26))


def test_chunk_budget_at_the_design_shapes():
    for rows, vocab, want in ((4096, 152064, 768), (16, 152064, 16), (1, 151936, 1), (5000, 10**7, 13)):
        got = chunked.chunk_rows(rows, vocab)
        assert got == want and got * vocab * 4 <= max(chunked.SCRATCH_BYTES, vocab * 4), (rows, vocab, got)


# ----------------------------------------------------------------------------------------
# The matmul
# ----------------------------------------------------------------------------------------


def _matmul_case(m, k, n, a_dtype, b_dtype, transpose_a, transpose_b):
    a = torch.randn(k, m, device=DEVICE).t() if transpose_a else torch.randn(m, k, device=DEVICE)
    b = torch.randn(n, k, device=DEVICE).t() if transpose_b else torch.randn(k, n, device=DEVICE)
    return a.to(a_dtype), b.to(b_dtype)


@pytest.mark.parametrize("split_k", [False, True], ids=["one-split", "split-k"])
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                    (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)], ids=str)
@pytest.mark.parametrize("layout", [(False, False), (True, False), (False, True)], ids=["nn", "tn", "nt"])
def test_matmul_matches_float64(split_k, dtypes, layout):
    a, b = _matmul_case(21, 203, 45, *dtypes, *layout)
    out = torch.full((21, 45), float("nan"), device=DEVICE)
    precision = "ieee" if dtypes == (torch.float32, torch.float32) else "tf32"
    triton_matmul.matmul(a, b, out, precision=precision, split_k=split_k)
    want = a.double() @ b.double()
    # tf32 keeps 10 mantissa bits of fp32 operands; bf16/fp16 ones it holds exactly.
    tol = 5e-3 * want.abs().max().item() if dtypes[0] == torch.float32 and precision == "tf32" and DEVICE == "cuda" \
        else 1e-5 * 203**0.5 * want.abs().max().item()
    torch.testing.assert_close(out.double(), want, atol=tol, rtol=0)


def test_matmul_split_k_really_splits():
    blocks = triton_matmul.matmul_blocks(5, True)
    k_split, splits = triton_matmul.split_k_plan(1, 1000, blocks["BLOCK_K"], None)
    assert splits > 1 and k_split % blocks["BLOCK_K"] == 0 and (splits - 1) * k_split < 1000


def test_matmul_bias_and_accumulate():
    a, b = _matmul_case(19, 37, 70, torch.float32, torch.float32, False, True)
    bias = torch.randn(70, device=DEVICE)
    out = torch.randn(19, 70, device=DEVICE)
    start = out.clone()
    triton_matmul.matmul(a, b, out, precision="ieee", accumulate=True)
    torch.testing.assert_close(out, start + a @ b, atol=1e-4, rtol=1e-5)
    triton_matmul.matmul(a, b, out, precision="ieee", bias=bias)
    torch.testing.assert_close(out, a @ b + bias, atol=1e-4, rtol=1e-5)
    with pytest.raises(ValueError, match="split K takes neither"):
        triton_matmul.matmul(torch.randn(1, 1000, device=DEVICE), torch.randn(1000, 1, device=DEVICE), out[:1, :1],
                             precision="ieee", bias=bias[:1], split_k=True)
