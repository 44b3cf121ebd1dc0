"""Per-row spans (docs/design.md §10.2): a left-padded batch whose rows modulate different positions
runs in one ``vk.generate`` call and matches its rows run one by one, tokens and traces,
with and without Lite pruning; the span forms ``generate`` accepts; and the property the
design rests on, that a zero delta leaves attention bit-exact on every backend."""

import pytest
import torch

import vreason_kernels as vk
from python_tests.tiny_models import synthetic_video_inputs, tiny_llama, tiny_qwen2_5_vl

TRACES = ("entropy", "entropy_ema", "alpha", "delta_norm")


@pytest.mark.parametrize("backend", ["torch", "cpp", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_delta_on_foreign_positions_is_bit_exact(backend, dtype):
    """The union span with zero delta outside a row's own positions gives exactly the
    attention of the row's own span: ||v|| / ||v + 0|| = 1 in every backend."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, t, 24, generator=gen).to(dtype) for t in (3, 37, 37))
    union, own = torch.tensor([2, 3, 5, 8, 9, 20, 21, 30]), torch.tensor([3, 8, 9, 21])
    delta_own = (0.3 * torch.randn(2, 2, own.numel(), 24, generator=gen)).to(dtype)
    delta_union = torch.zeros(2, 2, union.numel(), 24, dtype=dtype)
    delta_union[:, :, torch.isin(union, own)] = delta_own
    expected = vk.value_delta_attention(q, k[:, :2], v[:, :2], delta_own, own, backend=backend)
    got = vk.value_delta_attention(q, k[:, :2], v[:, :2], delta_union, union, backend=backend)
    assert torch.equal(got, expected)


def _left_pad(rows, pad_id=0):
    """Concatenate ``[1, L_b]`` tensors into ``[B, max L]`` with zeros on the left."""
    width = max(r.shape[1] for r in rows)
    return torch.cat([torch.nn.functional.pad(r, (width - r.shape[1], 0), value=pad_id) for r in rows])


def _assert_rows_match(batch, singles, new):
    for row, single in enumerate(singles):
        assert torch.equal(batch.sequences[row, -new:], single.sequences[0, -new:]), f"row {row} tokens differ"
        for name in TRACES:
            torch.testing.assert_close(
                getattr(batch, name)[row], getattr(single, name)[0], atol=2e-4, rtol=2e-3, equal_nan=True,
                msg=lambda m: f"row {row} {name}: {m}",
            )


@pytest.fixture(scope="module")
def qwen_videos():
    """Tiny Qwen2.5-VL and two one-video prompts: different video lengths (12 vs 4 tokens)
    and different text before them, so the left-padded batch puts them at different positions."""
    model = tiny_qwen2_5_vl()
    a = synthetic_video_inputs(model, frames=4, height_patches=4, width_patches=6, text_before=3, text_after=12,
                               seed=1)
    b = synthetic_video_inputs(model, frames=2, height_patches=4, width_patches=4, text_before=14, text_after=2,
                               seed=2)
    return model, [a, b]


def _batch_inputs(rows):
    batch = {
        "input_ids": _left_pad([r["input_ids"] for r in rows]),
        "attention_mask": _left_pad([r["attention_mask"] for r in rows]),
        "pixel_values_videos": torch.cat([r["pixel_values_videos"] for r in rows]),
        "video_grid_thw": torch.cat([r["video_grid_thw"] for r in rows]),
    }
    if "mm_token_type_ids" in rows[0]:
        batch["mm_token_type_ids"] = _left_pad([r["mm_token_type_ids"] for r in rows])
    return batch


@pytest.mark.parametrize("keep_ratio", [1.0, 0.5])
def test_qwen2_5_vl_videos_at_different_positions_match_one_by_one(qwen_videos, keep_ratio):
    model, rows = qwen_videos
    config = vk.VReasonConfig(lr=0.05, keep_ratio=keep_ratio)
    new = 24
    inputs = _batch_inputs(rows)
    ids = inputs.pop("input_ids")
    video = ids == model.config.video_token_id
    # Row 0 holds its video at 4..15, row 1 (left-padded by 7) at 22..25.
    assert video.sum(1).tolist() == [12, 4] and not (video[0] & video[1]).any()
    batch = vk.generate(model, ids, config=config, max_new_tokens=new, eos_token_id=[], **inputs)
    singles = []
    for row in rows:
        row = dict(row)
        singles.append(vk.generate(model, row.pop("input_ids"), config=config, max_new_tokens=new,
                                   eos_token_id=[], **row))
    _assert_rows_match(batch, singles, new)
    assert (batch.delta_norm[:, 1:] > 0).all(), "every row's ΔV must move"
    # The union of the rows' disjoint spans, each pruned to ceil(keep_ratio * S_b) positions.
    assert batch.stats["span_size"] == (16 if keep_ratio == 1.0 else 8)
    naive = vk.reference.generate(model, ids, config=config, max_new_tokens=new, eos_token_id=[], **inputs)
    assert torch.equal(naive.sequences, batch.sequences)
    for name in TRACES:
        torch.testing.assert_close(getattr(naive, name), getattr(batch, name), atol=2e-4, rtol=2e-3)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _llama_rows():
    gen = torch.Generator().manual_seed(5)
    a, b = torch.randint(3, 200, (1, 13), generator=gen), torch.randint(3, 200, (1, 8), generator=gen)
    # Row 0 modulates 5 positions, row 1 three others; row 1 is left-padded by 5.
    return (a, torch.tensor([1, 2, 6, 9, 12])), (b, torch.tensor([0, 3, 4]))


@pytest.mark.parametrize("form", ["list", "padded"])
def test_llama_explicit_per_row_spans_match_one_by_one(llama, form):
    (a, span_a), (b, span_b) = _llama_rows()
    ids, mask = _left_pad([a, b]), _left_pad([torch.ones_like(a), torch.ones_like(b)])
    shifted_b = span_b + (a.shape[1] - b.shape[1])
    span = [span_a, shifted_b] if form == "list" else torch.tensor([span_a.tolist(), shifted_b.tolist() + [-1, -1]])
    config = vk.VReasonConfig(lr=0.1, steps=2, every=2, keep_ratio=0.7, ema_init="zero")
    new = 20
    batch = vk.generate(llama, ids, attention_mask=mask, span=span, config=config, max_new_tokens=new,
                        eos_token_id=[])
    singles = [vk.generate(llama, x, span=s, config=config, max_new_tokens=new, eos_token_id=[])
               for x, s in ((a, span_a), (b, span_b))]
    _assert_rows_match(batch, singles, new)
    assert 4 <= batch.stats["span_size"] <= 4 + 3  # the union of ceil(0.7 * 5) and ceil(0.7 * 3) positions


def test_a_shared_span_drops_padding_and_equals_one_by_one(llama):
    """One [S] span for both rows: positions a row's attention mask hides are dropped."""
    (a, _), (b, _) = _llama_rows()
    ids, mask = _left_pad([a, b]), _left_pad([torch.ones_like(a), torch.ones_like(b)])
    span = torch.arange(2, 13)
    config = vk.VReasonConfig(lr=0.05)
    batch = vk.generate(llama, ids, attention_mask=mask, span=span, config=config, max_new_tokens=12, eos_token_id=[])
    singles = [
        vk.generate(llama, a, span=span, config=config, max_new_tokens=12, eos_token_id=[]),
        vk.generate(llama, b, span=torch.arange(0, 8), config=config, max_new_tokens=12, eos_token_id=[]),
    ]
    _assert_rows_match(batch, singles, 12)


@pytest.mark.parametrize(
    "span, error, match",
    [
        ([torch.tensor([0, 1])], ValueError, "2 entries"),
        ([torch.tensor([0, 1]), torch.tensor([2.0])], TypeError, r"span\[1\]"),
        ([torch.tensor([0, 1]), torch.tensor([3, 2])], ValueError, r"span\[1\] must be sorted"),
        ([torch.tensor([0, 1]), torch.tensor([2, 2])], ValueError, r"span\[1\] must be sorted"),
        ([torch.tensor([0, 1]), torch.tensor([13])], ValueError, r"span\[1\] positions must lie"),
        ([torch.tensor([0, 1]), [2, 3]], TypeError, r"span\[1\] must be a torch.Tensor"),
        (torch.tensor([[0, -1, 2], [1, 2, 3]]), ValueError, r"span\[0\]: the padding value"),
        (torch.tensor([[0, 1, 2]]), ValueError, "one row per batch row"),
        (torch.tensor([[0, 1], [1, -2]]), ValueError, r"span\[1\] positions must lie"),
        (torch.zeros(2, 2, 2, dtype=torch.long), ValueError, r"\[S\] or \[B, S\]"),
        (torch.tensor([[0.0, 1.0], [1.0, 2.0]]), TypeError, "span"),
    ],
)
def test_bad_per_row_spans(llama, span, error, match):
    ids = torch.randint(3, 200, (2, 13), generator=torch.Generator().manual_seed(9))
    with pytest.raises(error, match=match):
        vk.generate(llama, ids, span=span, config=vk.VReasonConfig(), max_new_tokens=2)
