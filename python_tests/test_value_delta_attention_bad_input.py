"""value_delta_attention bad-input sweep (docs/design.md §8.5): a clear error naming the argument,
or the reference's result, on every backend; never a crash in C++ or a silent NaN/0.

The argument checks run before a backend is picked, so they are tested once (the cases
of ``test_bad_inputs`` in test_value_delta_attention.py are not repeated); layouts, masked
rows, T > N, extreme scales and non-finite inputs per backend, output and both grads
against float64 under the 2x rule (whose NaN-pattern check also holds for NaN inputs).
"""

import pytest
import torch

import vreason_kernels as vk
from python_tests.helpers import BACKENDS, assert_close_to_reference, check_vda, run_vda, vda_inputs
from vreason_kernels.ops.value_delta_attention import naive

B, HQ, HKV, T, N, D = 2, 4, 2, 3, 11, 16
SPAN = torch.tensor([1, 4, 5, 9])


def _inputs(t=T, dtype=torch.float32):
    return vda_inputs(B, HQ, HKV, t, N, D, dtype, span=SPAN)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(causal="yes"), TypeError, "causal must be a bool"),
        (dict(causal=None), TypeError, "causal must be a bool"),
        (dict(delta_v=None, span=torch.tensor([50])), ValueError, r"span positions must lie in \[0, N\)"),
        (dict(delta_v=None, span=torch.tensor([4, 1])), ValueError, "sorted"),
        (dict(span=SPAN.short()), TypeError, "span must be an int32/int64"),
        (dict(span=torch.tensor(3)), ValueError, "span must have 1 dims"),
        (dict(query=torch.randn(B, HQ, 0, D)), ValueError, "query .* must have no empty dim"),
        (dict(query=torch.randn(B, HQ, T, 0)), ValueError, "query .* must have no empty dim"),
        (dict(key=torch.randn(B, HKV, 0, D), value=torch.randn(B, HKV, 0, D)), ValueError, "N >= 1"),
        (dict(key=torch.randn(B, 0, N, D), value=torch.randn(B, 0, N, D)), ValueError, "multiple of"),
        (dict(delta_v=torch.ones(B, HKV, 4, D, dtype=torch.int64)), ValueError, "delta_v must have the same dtype"),
        (dict(key=torch.randn(B, HKV, N, D, device="meta")), ValueError, "key must have the same device"),
        (dict(span=SPAN.to("meta")), ValueError, "span must have the same device"),
        (dict(attention_mask=torch.ones(1, B, 1, T, N, dtype=torch.bool)), ValueError, "attention_mask must be"),
        (dict(scale=float("nan")), ValueError, "scale must be finite"),
        (dict(scale=torch.tensor(0.5)), TypeError, "scale must be a float"),
        (dict(query=torch.randn(B, HQ, T, D).double()), ValueError, "key must have the same dtype"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_arguments_name_the_argument(change, error, match):
    query, key, value, delta, span = _inputs()
    kwargs = {**dict(query=query, key=key, value=value, delta_v=delta, span=span), **change}
    with pytest.raises(error, match=match):
        vk.value_delta_attention(**kwargs)


def test_meta_tensors_get_a_device_error():
    query, key, value, delta, span = (x.to("meta") for x in _inputs())
    with pytest.raises(ValueError, match="query must be on a CPU or CUDA device, got meta"):
        vk.value_delta_attention(query, key, value, delta, span, backend="torch")


def _strided(x: torch.Tensor, how: str) -> torch.Tensor:
    """The same values as ``x`` in another layout."""
    if how == "transposed":  # [B, H, M, D] stored as [B, M, H, D]
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    if how == "strided-last":
        return torch.stack([x, torch.zeros_like(x)], -1)[..., 0]
    return x[:1, :1].expand_as(x) if how == "expanded" else x.clone()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["expanded", "transposed", "strided-last"])
def test_key_value_delta_in_any_layout(backend, how):
    query, key, value, delta, span = _inputs()
    key, value, delta = (_strided(x, how) for x in (key, value, delta))
    check_vda(backend, query, key, value, delta, torch.stack([span, span], 1)[:, 0])  # stride 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("how", ["expanded", "stride0-last"])
def test_query_with_stride_0(backend, how):
    """An expanded query (one row broadcast over batch/heads, or one value over D) and the
    grads of the leaf it was expanded from."""
    leaf_shape = (1, 1, T, D) if how == "expanded" else (B, HQ, T, 1)
    leaf = torch.randn(leaf_shape)
    _, key, value, delta, span = _inputs()
    grad = torch.randn(B, HQ, T, D)
    results = []
    for dt, kw in ((torch.float64, {}), (torch.float32, {}), (torch.float32, dict(backend=backend))):
        q = leaf.to(dt).requires_grad_()
        fn = naive.value_delta_attention if not kw else vk.value_delta_attention
        out = fn(q.expand(B, HQ, T, D), key.to(dt), value.to(dt), delta.to(dt), span, **kw)
        out.backward(grad.to(dt))
        results.append((out, q.grad))
    (ref_out, ref_dq), (base_out, base_dq), (out, dq) = results
    assert_close_to_reference(out, ref_out, base_out, atol=1e-6)
    assert_close_to_reference(dq, ref_dq, base_dq, atol=1e-6, name="grad query")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mask", ["bool", "additive"])
def test_fully_masked_rows_are_zero_with_zero_grads(backend, mask):
    """Row t = 1 of every head attends to nothing: out 0, dq 0 (not NaN), the rest exact."""
    query, key, value, delta, span = _inputs()
    if mask == "bool":
        attention_mask = torch.ones(B, 1, T, N, dtype=torch.bool)
        attention_mask[:, :, 1] = False
    else:
        attention_mask = torch.zeros(B, 1, T, N)
        attention_mask[:, :, 1] = float("-inf")
    out, dq, ddelta = check_vda(backend, query, key, value, delta, span,
                                              attention_mask=attention_mask)  # fmt: skip
    assert torch.equal(out[:, :, 1], torch.zeros_like(out[:, :, 1]))
    assert torch.equal(dq[:, :, 1], torch.zeros_like(dq[:, :, 1]))
    assert torch.isfinite(ddelta).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_more_queries_than_keys(backend, causal, dtype):
    """T = N + 4: causally (bottom-right) the first 4 rows see no key and are 0."""
    out, dq, _ = check_vda(backend, *_inputs(t=N + 4, dtype=dtype), causal=causal)
    if causal:
        assert torch.equal(out[:, :, :4], torch.zeros_like(out[:, :, :4]))
        assert torch.equal(dq[:, :, :4], torch.zeros_like(dq[:, :, :4]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("scale", [0.0, 1e-30, -1.0])
def test_tiny_and_negative_scales(backend, scale):
    """0 and 1e-30: the plain mean of the visible values; -1: the nearest keys least."""
    check_vda(backend, *_inputs(), scale=scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_scale_near_one_hot_rows(backend):
    """Scale 30 (|s| up to ~450): each fp32 score is off by up to an ulp of |s|, which
    moves every P by as much relative, in plain PyTorch as in the kernels; which of the two
    lands closer to float64 is then chance, so the 2x rule gets that much floor on top."""
    query, key, value, delta, span = _inputs()
    grad = torch.randn(query.shape)
    ref = run_vda(naive.value_delta_attention, *(x.double() for x in (query, key, value, delta)), span, "random",
              grad.double(), (True, True), scale=30.0)
    base = run_vda(naive.value_delta_attention, query, key, value, delta, span, "random", grad, (True, True), scale=30.0)
    got = run_vda(vk.value_delta_attention, query, key, value, delta, span, "random", grad, (True, True), scale=30.0,
              backend=backend)
    max_score = 30.0 * (query.double() @ key.double().repeat_interleave(HQ // HKV, 1).transpose(-1, -2)).abs().max()
    for name, actual, reference, baseline in zip(("output", "grad query", "grad delta_v"), got, ref, base):
        floor = 2 * torch.finfo(torch.float32).eps * max_score.item() * reference.abs().max().item()
        assert_close_to_reference(actual, reference, baseline, atol=floor, name=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_scores_past_float32_raise_naming_scale(backend):
    with pytest.raises(ValueError, match="scale \\* query.key overflows"):
        vk.value_delta_attention(*_inputs(), scale=1e38, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["query", "key", "value", "delta_v"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the interpreter's numpy on NaN
def test_non_finite_input_is_never_hidden(backend, where, bad):
    """One non-finite element. Wherever the float64 reference's output or grads are NaN,
    the backend's are NaN too: never a plain number made of it (the C++ and torch
    backends once let a NaN query row pass as a row that sees no key, 0). The kernels may
    spread NaN further (a masked key's 0 * NaN inside a tile), as PyTorch's SDPA does. A
    NaN query row is NaN in out and dq, and no other row is."""
    query, key, value, delta, span = _inputs()
    tensors = dict(query=query, key=key, value=value, delta_v=delta)
    tensors[where] = tensors[where].clone()
    tensors[where][0, 0, 1, 2] = bad
    grad = torch.randn(B, HQ, T, D)
    as64 = [x.double() for x in tensors.values()]
    ref = run_vda(naive.value_delta_attention, *as64, span, "random", grad.double(), (True, True))
    got = run_vda(vk.value_delta_attention, *tensors.values(), span, "random", grad, (True, True), backend=backend)
    for name, actual, reference in zip(("output", "grad query", "grad delta_v"), got, ref):
        assert actual.isnan()[reference.isnan()].all(), f"{name}: a number where the reference is NaN"
    if where == "query" and bad != bad:
        for actual in got[:2]:
            assert actual[0, 0, 1].isnan().all(), "the NaN query's row must be NaN"
            assert actual.isnan().sum() == D, "only the NaN query's row may be NaN"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("which", ["delta_v", "both"])
def test_rows_whose_squares_overflow_float32(backend, dtype, which):
    """Finite rows past ~1.8e19 (a delta of 1e25, or value and delta): their plain fp32 sum
    of squares is inf, which once gave ||u|| = inf and so v' = 0 for every such row."""
    query, key, value, delta, span = _inputs()
    value = value * (1e25 if which == "both" else 1.0)
    check_vda(backend, query.to(dtype), key.to(dtype), value.to(dtype), (delta * 1e25).to(dtype), span)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_nan_query_survives_the_merge_of_key_chunks(backend):
    """Decode over keys split into chunks merged afterwards (C++: 3 chunks at N = 1237;
    Triton: 3 flash-decoding splits): the NaN row stays NaN in out and lse through the
    merge, which once took a NaN chunk for one that sees no key."""
    from vreason_kernels.ops.value_delta_attention import cpp, triton_backend

    n = 1237 if backend == "cpp" else 131
    query, key, value = torch.randn(1, 4, 1, D), torch.randn(1, 2, n, D), torch.randn(1, 2, n, D)
    query[0, 1, 0, 3] = float("nan")
    span_index = torch.full((n,), -1, dtype=torch.int32)
    if backend == "cpp":
        out, lse = cpp.forward(query, key, value, None, span_index, None, 0.25, True)
    else:
        out, lse = triton_backend.forward(query, key, value, None, span_index, None, 0.25, True, num_splits=3)
    assert out[0, 1].isnan().all() and lse[0, 1].isnan().all()
    assert torch.isfinite(out[0, [0, 2, 3]]).all() and torch.isfinite(lse[0, [0, 2, 3]]).all()
