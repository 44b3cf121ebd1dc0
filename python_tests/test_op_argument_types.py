"""The ops take what users pass (docs/design.md §8.6): ``span`` as a tensor, list, tuple or
``range``; ``attention_mask`` as a boolean, additive float or transformers' integer 0/1
``[B, N]`` padding mask. Any other type is an error that names the argument.

The other forms must give exactly the tensor forms' result, so each is compared bit for
bit with its tensor twin on the same backend (their accuracy is tested elsewhere).
"""

import pytest
import torch

import vreason_kernels as vk

B, HQ, HKV, T, N, D = 2, 4, 2, 3, 21, 16
BACKENDS = ["torch", "triton", "cpp"]  # cpp skips where the extension is not loaded (conftest.py)


def _inputs():
    query, key, value = torch.randn(B, HQ, T, D), torch.randn(B, HKV, N, D), torch.randn(B, HKV, N, D)
    return query, key, value, torch.randn(B, HKV, 16, D) * 0.5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["list", "tuple", "range"])
def test_span_as_a_list_tuple_or_range(backend, form):
    query, key, value, delta = _inputs()
    span = {"list": list(range(4, 20)), "tuple": tuple(range(4, 20)), "range": range(4, 20)}[form]
    got = vk.value_delta_attention(query, key, value, delta, span, backend=backend)
    want = vk.value_delta_attention(query, key, value, delta, torch.arange(4, 20), backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8])
def test_integer_padding_mask_is_a_boolean_key_mask(backend, dtype):
    """transformers' 2-D ``attention_mask`` (1 = attend, 0 = padding) masks the same keys
    for every head and query: the boolean ``[B, 1, 1, N]`` mask."""
    query, key, value, _ = _inputs()
    mask = torch.ones(B, N, dtype=dtype)
    mask[0, :5] = 0  # left padding of the first sequence
    mask[1, 7] = 0
    got = vk.value_delta_attention(query, key, value, attention_mask=mask, backend=backend)
    want = vk.value_delta_attention(query, key, value, attention_mask=mask.bool()[:, None, None, :],
                                    backend=backend)
    assert torch.equal(got, want)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(span={4, 5}), TypeError, "span must be a tensor, list, tuple or range"),
        (dict(span="4:20"), TypeError, "span must be a tensor, list, tuple or range"),
        (dict(span=[4.0, 5.0]), TypeError, "span must hold int positions"),
        (dict(span=[True, False]), TypeError, "span must hold int positions"),
        (dict(attention_mask=[[1] * N] * B), TypeError, "attention_mask must be a torch.Tensor"),
        (dict(attention_mask=torch.ones(B, N, dtype=torch.int64) * 2), ValueError, "only 0 .* and 1"),
        (dict(attention_mask=torch.ones(B, 1, T, N, dtype=torch.int64)), TypeError,
         "attention_mask must be boolean .* or an integer 0/1 padding mask"),
        (dict(attention_mask=torch.ones(B, N + 1, dtype=torch.int64)), TypeError, r"\[B, N\] = \[2, 21\]"),
        (dict(attention_mask=torch.ones(B, N, dtype=torch.complex64)), TypeError, "attention_mask must be"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_other_types_name_the_argument(change, error, match):
    query, key, value, delta = _inputs()
    kwargs = dict(query=query, key=key, value=value)
    if "span" in change:
        kwargs["delta_v"] = delta[:, :, :2]
    with pytest.raises(error, match=match):
        vk.value_delta_attention(**kwargs, **change)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logprob_labels_as_int32(backend):
    """``linear_logprob_entropy`` takes int32 labels as their int64 twin; any other type of
    ``labels`` is an error naming it."""
    hidden, weight = torch.randn(2, 5, D), torch.randn(37, D)
    labels = torch.randint(0, 37, (2, 5))
    labels[0, 1] = -100
    want = vk.linear_logprob_entropy(hidden, weight, labels, backend=backend)
    got = vk.linear_logprob_entropy(hidden, weight, labels.int(), backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    for wrong in (labels.tolist(), labels.float(), labels.to(torch.int16)):
        with pytest.raises(TypeError, match="labels"):
            vk.linear_logprob_entropy(hidden, weight, wrong, backend=backend)
