"""linear_entropy accuracy sweep (docs/design.md §8.2): each backend within 2x of plain PyTorch.

The cases where ``lse - sum p z`` loses digits: a common offset of 1000 on every logit
(through the bias, or through the product W h), Liger-style all-positive weights with
logits of 10-100, tiny and huge temperatures; with odd V and D, large V over small D,
in float32, float16 and bfloat16. Every output and gradient goes through
``helpers.check_linear_entropy`` (float64 reference, k = 2).
"""

import pytest
import torch

from python_tests.helpers import BACKENDS, DTYPES, check_linear_entropy, linear_entropy_inputs

pytestmark = pytest.mark.slow  # the sweep: many cases of 3-7 s on a 2-core CPU

ROWS = 3


def _gaussian(vocab, dim, dtype):
    return linear_entropy_inputs(ROWS, vocab, dim, dtype) + (1.0,)


def _offset_by_bias(vocab, dim, dtype):
    hidden, weight, bias, tau = _gaussian(vocab, dim, dtype)
    return hidden, weight, (bias.float() + 1000.0).to(dtype), tau


def _offset_by_product(vocab, dim, dtype):
    """hidden[:, 0] = 1 and weight[:, 0] = 1000: every logit W h gains 1000."""
    hidden, weight, bias, tau = _gaussian(vocab, dim, dtype)
    hidden[:, 0] = 1.0
    weight[:, 0] = 1000.0
    return hidden, weight, None, tau


def _all_positive(vocab, dim, dtype):
    """Liger's shapes of trouble: uniform [0, 1) hidden and weights, logits ~ 10-100."""
    hidden = torch.rand(ROWS, dim)
    weight = torch.rand(vocab, dim) * (160.0 / dim)
    return hidden.to(dtype), weight.to(dtype), None, 1.0


def _tiny_temperature(vocab, dim, dtype):
    return _gaussian(vocab, dim, dtype)[:3] + (1e-3,)


def _huge_temperature(vocab, dim, dtype):
    return _gaussian(vocab, dim, dtype)[:3] + (1e3,)


CASES = {
    "offset-1000-bias": _offset_by_bias,
    "offset-1000-product": _offset_by_product,
    "all-positive": _all_positive,
    "tau-1e-3": _tiny_temperature,
    "tau-1e3": _huge_temperature,
}
# (V, D): odd sizes; the interpreter runs Triton, so it gets a smaller vocabulary.
SHAPES = {"torch": (1237, 97), "cpp": (1237, 97), "triton": (301, 80)}


# float32 for every case; the half types where their rounding meets large logits.
CASE_DTYPES = [(case, torch.float32) for case in CASES] + [
    (case, dtype) for case in ("offset-1000-bias", "all-positive") for dtype in DTYPES[1:]
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case,dtype", CASE_DTYPES, ids=lambda x: str(x).replace("torch.", ""))
def test_within_2x_of_pytorch(backend, case, dtype):
    hidden, weight, bias, temperature = CASES[case](*SHAPES[backend], dtype)
    check_linear_entropy(backend, hidden, weight, bias, temperature=temperature)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_vocabulary_over_small_dim(backend):
    vocab = 4999 if backend != "triton" else 1237
    check_linear_entropy(backend, *_gaussian(vocab, 7, torch.float32)[:3])


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_take_the_gemm_path(backend):
    """More than 16 rows: the C++ backend's GEMM tiles (the direct path covers fewer)."""
    hidden = torch.rand(19, 45)
    weight = torch.rand(301, 45) * (160.0 / 45)
    check_linear_entropy(backend, hidden, weight, None)
