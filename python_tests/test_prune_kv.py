"""prune_kv (the paper's Lite mode): exact selection vs brute force, cache pruning, and
decoding from a pruned cache (tiny Llama and SmolLM2)."""

import itertools
import math

import pytest
import torch

import vreason_kernels as vk
from python_tests.tiny_models import tiny_llama
from vreason_kernels.ops.prune_kv import prune_cache, pruned_span


def _brute_force_kept(value: torch.Tensor, span: list, keep_ratio: float) -> list:
    """Kept positions per row, by trying every subset of the span of the right size."""
    b, _, n, _ = value.shape
    n_keep = math.ceil(round(keep_ratio * len(span), 9))
    norms = value.double().square().sum(dim=(1, 3)).sqrt()  # [B, N]
    outside = [i for i in range(n) if i not in set(span)]
    rows = []
    for r in range(b):
        # The subset with the largest total norm.
        # Random norms are distinct, so the best subset is unique.
        best = max(itertools.combinations(span, n_keep), key=lambda c: float(norms[r, list(c)].sum()))
        rows.append(sorted(outside + list(best)))
    return rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("keep_ratio", [0.5, 0.3, 0.77, 0.01])
def test_keeps_highest_norm_positions(dtype, keep_ratio):
    b, h, n, d = 3, 2, 17, 5
    key, value = torch.randn(b, h, n, d, dtype=dtype), torch.randn(b, h, n, d, dtype=dtype)
    span = torch.tensor([1, 2, 4, 5, 6, 9, 10, 11, 15, 16])
    k2, v2, kept = vk.prune_kv(key, value, span, keep_ratio=keep_ratio)
    want = torch.tensor(_brute_force_kept(value, span.tolist(), keep_ratio))
    assert kept.dtype == torch.int64 and torch.equal(kept, want)
    assert (kept[:, 1:] > kept[:, :-1]).all(), "kept positions must stay in original order"
    index = kept[:, None, :, None].expand(b, h, kept.shape[1], d)
    assert torch.equal(k2, key.gather(2, index)) and torch.equal(v2, value.gather(2, index))
    assert k2.dtype == dtype


def test_count_rule_and_float_rounding():
    key = value = torch.randn(1, 1, 12, 4)
    span = torch.arange(10)
    # 0.3 * 10 is 3.0000000000000004 in floats; the rule means ceil(3) = 3.
    assert vk.prune_kv(key, value, span, keep_ratio=0.3)[2].shape[1] == 2 + 3
    assert vk.prune_kv(key, value, span, keep_ratio=0.31)[2].shape[1] == 2 + 4
    assert vk.prune_kv(key, value, span, keep_ratio=1e-6)[2].shape[1] == 2 + 1


def test_ties_keep_earlier_positions():
    value = torch.ones(2, 2, 8, 3)
    value[1, :, 5] = 2.0  # row 1: position 5 is strictly largest
    span = torch.tensor([2, 3, 5, 6])
    _, _, kept = vk.prune_kv(value.clone(), value, span, keep_ratio=0.5)
    assert kept.tolist() == [[0, 1, 2, 3, 4, 7], [0, 1, 2, 4, 5, 7]]


def test_keep_ratio_one_and_empty_span_are_identity():
    key, value = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    for span in (torch.tensor([0, 3, 8]), torch.tensor([], dtype=torch.int64)):
        k2, v2, kept = vk.prune_kv(key, value, span, keep_ratio=1.0 if span.numel() else 0.5)
        assert torch.equal(k2, key) and torch.equal(v2, value)
        assert torch.equal(kept, torch.arange(9).expand(2, 9))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(keep_ratio=0.0), ValueError, "keep_ratio"),
        (dict(keep_ratio=1.5), ValueError, "keep_ratio"),
        (dict(keep_ratio=float("nan")), ValueError, "keep_ratio"),
        (dict(keep_ratio=True), TypeError, "keep_ratio"),
        (dict(keep_ratio="0.5"), TypeError, "keep_ratio"),
        (dict(span=torch.tensor([2, 9])), ValueError, r"span positions must lie in \[0, N\)"),
        (dict(span=torch.tensor([-1, 2])), ValueError, "span positions"),
        (dict(span=torch.tensor([3, 2])), ValueError, "sorted"),
        (dict(span=torch.tensor([2, 2])), ValueError, "unique"),
        (dict(span=torch.tensor([[1, 2]])), ValueError, "span must have 1 dims"),
        (dict(span=torch.tensor([1.0, 2.0])), TypeError, "span"),
        (dict(span={1, 2}), TypeError, "span must be a tensor, list, tuple or range"),
        (dict(span=[1.0, 2]), TypeError, "span must hold int positions"),
        (dict(span=[True, 2]), TypeError, "span must hold int positions"),
        (dict(backend="cuda"), ValueError, "backend must be one of"),
        (dict(value=torch.randn(2, 2, 8, 4)), ValueError, "key and value must have the same shape"),
        (dict(value=torch.randn(2, 9, 4)), ValueError, "value must have 4 dims"),
        (dict(value=torch.randn(2, 2, 9, 4, dtype=torch.float64)), ValueError, "value must have the same dtype"),
        (dict(value=torch.full((2, 2, 9, 4), float("nan"))), ValueError, "NaN"),
    ],
)
def test_bad_input(kwargs, error, match):
    _assert_rejected(kwargs, error, match)


def _assert_rejected(kwargs, error, match):
    """prune_kv on a valid call with ``kwargs`` changed raises ``error`` matching ``match``."""
    args = dict(key=torch.randn(2, 2, 9, 4), value=torch.randn(2, 2, 9, 4), span=torch.tensor([1, 4, 5]))
    args["keep_ratio"] = 0.5
    args.update(kwargs)
    with pytest.raises(error, match=match):
        vk.prune_kv(**args)


@pytest.mark.parametrize("form", [list, tuple, "range"])
def test_span_as_a_list_tuple_or_range(form):
    """A span of plain Python ints is the same span as its tensor."""
    key, value = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4)
    span = range(2, 7) if form == "range" else form([2, 3, 4, 5, 6])
    got = vk.prune_kv(key, value, span, keep_ratio=0.5)
    want = vk.prune_kv(key, value, torch.arange(2, 7), keep_ratio=0.5)
    assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert pruned_span(got[2], span).tolist() == pruned_span(want[2], torch.arange(2, 7)).tolist()


def test_positional_keep_ratio_still_works_with_a_deprecation_warning():
    key, value, span = torch.randn(2, 2, 9, 4), torch.randn(2, 2, 9, 4), torch.tensor([1, 4, 5])
    with pytest.warns(DeprecationWarning, match="keep_ratio as a keyword"):
        old = vk.prune_kv(key, value, span, 0.5)
    new = vk.prune_kv(key, value, span, keep_ratio=0.5)
    assert all(torch.equal(a, b) for a, b in zip(old, new))
    with pytest.raises(TypeError, match="both positionally and as a keyword"):
        vk.prune_kv(key, value, span, 0.5, keep_ratio=0.5)
    with pytest.raises(TypeError, match="missing the keyword argument keep_ratio"):
        vk.prune_kv(key, value, span)


def test_pruned_span():
    kept = torch.tensor([[0, 1, 3, 5, 6], [0, 2, 3, 5, 6]])
    assert pruned_span(kept, torch.tensor([1, 2, 3])).tolist() == [1, 2]
    # Span {1, 2, 5}: row 0 keeps 1 and 5 (indices 1, 3), row 1 keeps 2 and 5 (indices 1, 3).
    assert pruned_span(kept, torch.tensor([1, 2, 5])).tolist() == [1, 3]
    with pytest.raises(ValueError, match="different pruned indices"):
        pruned_span(kept, torch.tensor([1, 3]))


def _prefill(model, input_ids):
    with torch.no_grad():
        out = model(input_ids=input_ids, use_cache=True)
    return out.logits[:, -1], out.past_key_values


def _greedy_from_cache(model, cache, first_logits, original_length, steps):
    """Greedy decode from a (possibly pruned) cache: RoPE positions continue from the
    original prompt length, the 2-D mask has the pruned length (prune_cache's contract)."""
    token = first_logits.argmax(-1, keepdim=True)
    batch, tokens = token.shape[0], [token]
    for step in range(steps):
        length = cache.get_seq_length()
        with torch.no_grad():
            out = model(
                input_ids=token,
                past_key_values=cache,
                position_ids=torch.full((batch, 1), original_length + step),
                attention_mask=torch.ones(batch, length + 1, dtype=torch.long),
                use_cache=True,
            )
        assert torch.isfinite(out.logits).all()
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        tokens.append(token)
    return torch.cat(tokens, dim=1)


def _check_prune_then_generate(model, input_ids, span, steps):
    n = input_ids.shape[1]
    first, cache = _prefill(model, input_ids)
    kept = prune_cache(cache, span, 0.5)
    n_kept = n - span.numel() + math.ceil(span.numel() / 2)
    assert kept.shape == (model.config.num_hidden_layers, input_ids.shape[0], n_kept)
    assert all(layer.keys.shape[2] == n_kept and layer.values.shape[2] == n_kept for layer in cache.layers)
    assert torch.isin(torch.arange(n)[~torch.isin(torch.arange(n), span)], kept).all()
    tokens = _greedy_from_cache(model, cache, first, n, steps)
    assert tokens.shape == (input_ids.shape[0], steps + 1)

    # keep_ratio=1 prunes nothing: the continuation is plain greedy decoding.
    first, cache = _prefill(model, input_ids)
    prune_cache(cache, span, 1.0)
    full = model.generate(input_ids, max_new_tokens=steps + 1, do_sample=False)
    assert torch.equal(_greedy_from_cache(model, cache, first, n, steps), full[:, n:])


@pytest.mark.slow  # over ~3 s on a 2-core CPU
def test_prune_cache_tiny_llama_generates():
    model = tiny_llama()
    input_ids = torch.randint(3, 200, (2, 23), generator=torch.Generator().manual_seed(1))
    _check_prune_then_generate(model, input_ids, torch.arange(4, 19), steps=5)


@pytest.mark.slow  # over ~3 s on a 2-core CPU
def test_prune_cache_smollm2_generates(smollm2):
    model, tokenizer = smollm2
    prompt = "Describe the video frame by frame: a red ball rolls across a wooden table and falls."
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    _check_prune_then_generate(model, input_ids, torch.arange(3, input_ids.shape[1] - 3), steps=4)


def test_prune_cache_rejects_bad_caches():
    from transformers import DynamicCache

    with pytest.raises(TypeError, match="DynamicCache"):
        prune_cache(object(), torch.tensor([0]), 0.5)
    model = tiny_llama(num_hidden_layers=1)
    with pytest.raises(ValueError, match="empty"):
        prune_cache(DynamicCache(config=model.config), torch.tensor([0]), 0.5)


# ---- bad-input sweep (docs/design.md §8.5): a clear error naming the argument, or the right result


def _kept_by_float64_norm(value: torch.Tensor, span: torch.Tensor, n_keep: int) -> list:
    """The span positions each batch row keeps, ranked by the float64 norm (earlier on ties)."""
    norms = value.double()[:, :, span].square().sum(dim=(1, 3))
    order = torch.sort(norms, dim=1, descending=True, stable=True).indices[:, :n_keep]
    return [sorted(span[row].tolist()) for row in order]


@pytest.mark.parametrize(
    "make_value",
    [
        pytest.param(lambda v: v * 1e30, id="fp32-squares-past-float32"),
        pytest.param(lambda v: (v * 1e36).bfloat16(), id="bf16-squares-past-float32"),
        pytest.param(lambda v: v[:1, :1].expand_as(v), id="expanded"),
        pytest.param(lambda v: v.transpose(1, 2).contiguous().transpose(1, 2), id="transposed"),
        pytest.param(lambda v: torch.stack([v, v], -1)[..., 1], id="strided-last"),
    ],
)
def test_ranks_by_exact_norm_in_any_layout(make_value):
    """Squares past float32's range once tied every norm at inf (kept by position)."""
    span = torch.tensor([0, 2, 3, 5, 6, 8])
    value = make_value(torch.randn(2, 3, 9, 5))
    key = torch.randn(value.shape, dtype=value.dtype)
    _, v2, kept = vk.prune_kv(key, value, span, keep_ratio=0.5)
    wanted = _kept_by_float64_norm(value, span, 3)
    for row in range(2):
        assert [p for p in kept[row].tolist() if p in span.tolist()] == wanted[row]
    assert torch.equal(v2, value.gather(2, kept[:, None, :, None].expand(2, 3, kept.shape[1], 5)))


def test_keep_ratio_1e_9_keeps_one_span_row():
    value = torch.randn(2, 2, 9, 4)
    key, v2, kept = vk.prune_kv(torch.randn(2, 2, 9, 4), value, torch.tensor([1, 4, 5]), keep_ratio=1e-9)
    assert kept.shape == (2, 7) and v2.shape == (2, 2, 7, 4)


def test_empty_batch_and_empty_cache():
    key, value, kept = vk.prune_kv(torch.randn(0, 2, 9, 4), torch.randn(0, 2, 9, 4), torch.tensor([1, 4, 5]), keep_ratio=0.5)
    assert key.shape == (0, 2, 8, 4) and kept.shape == (0, 8)
    empty = torch.zeros(2, 2, 0, 4)
    key, value, kept = vk.prune_kv(empty, empty, torch.tensor([], dtype=torch.int64), keep_ratio=0.5)
    assert key.shape == (2, 2, 0, 4) and kept.shape == (2, 0)


def test_inf_value_rows_rank_first():
    value = torch.randn(1, 2, 9, 4)
    value[0, 1, 5, 0] = float("inf")
    _, _, kept = vk.prune_kv(torch.randn(1, 2, 9, 4), value, torch.tensor([1, 4, 5]), keep_ratio=0.3)
    assert 5 in kept[0].tolist() and 1 not in kept[0].tolist() and 4 not in kept[0].tolist()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(key=torch.randn(2, 2, 9, 4, device="meta"), value=torch.randn(2, 2, 9, 4, device="meta"),
          span=torch.tensor([1, 4], device="meta")), ValueError, "key must be on a CPU or CUDA device"),
        (dict(span=torch.tensor([1, 4], device="meta")), ValueError, "span must have the same device"),
        (dict(span=torch.tensor([True, False])), TypeError, "span must be an int32/int64"),
        (dict(span=torch.tensor(3)), ValueError, "span must have 1 dims"),
        (dict(key=torch.ones(2, 2, 9, 4, dtype=torch.int64)), TypeError, "key must be a floating tensor"),
        (dict(keep_ratio=torch.tensor(0.5)), TypeError, "keep_ratio must be a float"),
        (dict(keep_ratio=float("inf")), ValueError, "keep_ratio must be finite"),
        (dict(keep_ratio=-1e-9), ValueError, "keep_ratio"),
    ],
)  # fmt: skip
def test_more_bad_input(kwargs, error, match):
    _assert_rejected(kwargs, error, match)
