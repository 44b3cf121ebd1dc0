"""What a new user meets first in ``vk.generate``: V-Reason on by default, Lite mode only on
video tokens, ``model.generate`` options refused by name (``top_k`` and ``max_length``
supported), the runaway warning, and the licence files (tiny random models, CPU)."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import vreason_kernels as vk
from python_tests.tiny_models import (
    VIDEO_TOKEN_ID,
    synthetic_video_inputs,
    tiny_llama,
    tiny_qwen2_5_vl,
)
from vreason_kernels.engine.guard import RUNAWAY_RATIO
from vreason_kernels.engine.sampling import select_next_token

REPO = Path(__file__).resolve().parents[1]
GENERATORS = {"engine": vk.generate, "reference": vk.reference.generate}


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


def _prompt(length, seed):
    return torch.randint(3, 200, (1, length), generator=torch.Generator().manual_seed(seed))


class _ForwardCounter:
    """Counts model forwards through the input embeddings (every forward starts there)."""

    def __init__(self, model):
        self.calls = 0
        self.model = model

    def __enter__(self):
        self.handle = self.model.get_input_embeddings().register_forward_pre_hook(self._count)
        return self

    def _count(self, *args):
        self.calls += 1

    def __exit__(self, *exc):
        self.handle.remove()


# 1. V-Reason by default ---------------------------------------------------------------


@pytest.mark.parametrize("name", list(GENERATORS))
def test_no_config_runs_v_reason(llama, name):
    generate = GENERATORS[name]
    ids = _prompt(12, 1)
    default = generate(llama, ids, max_new_tokens=8, eos_token_id=[])
    explicit = generate(llama, ids, config=vk.VReasonConfig(), max_new_tokens=8, eos_token_id=[])
    base = generate(llama, ids, config=vk.VReasonConfig(enabled=False), max_new_tokens=8, eos_token_id=[])
    assert default.stats["updates"] == 7 and default.stats["span_size"] == 12
    assert torch.equal(default.sequences, explicit.sequences)
    torch.testing.assert_close(default.delta_norm, explicit.delta_norm)
    assert (default.delta_norm[0, 1:] > 0).all()
    assert base.stats["updates"] == 0 and (base.delta_norm == 0).all()


def test_licence_file_matches_the_declared_licence_and_the_changelog_exists():
    assert 'license = { text = "Apache-2.0" }' in (REPO / "pyproject.toml").read_text()
    assert (REPO / "LICENSE").read_text().lstrip().startswith("Apache License\n                           Version 2.0")
    changelog = (REPO / "CHANGELOG.md").read_text()
    assert "## [Unreleased]" in changelog and "enabled=False" in changelog


# 2. Lite mode prunes video tokens only --------------------------------------------------


@pytest.mark.parametrize("name", list(GENERATORS))
def test_lite_refuses_a_text_prompt_before_any_model_call(llama, name):
    with _ForwardCounter(llama) as counter, pytest.raises(ValueError, match=r"keep_ratio=0.5 \(Lite mode\)"):
        GENERATORS[name](llama, _prompt(10, 2), config=vk.VReasonConfig(keep_ratio=0.5), max_new_tokens=4)
    assert counter.calls == 0


def test_lite_refuses_a_batch_row_without_video():
    model = tiny_qwen2_5_vl()
    inputs = synthetic_video_inputs(model, batch=2)
    ids = inputs.pop("input_ids").clone()
    ids[1][ids[1] == VIDEO_TOKEN_ID] = 5  # row 1 now holds no video token
    with pytest.raises(ValueError, match=r"keep_ratio=0.5 .* row\(s\) \[1\] hold none"):
        vk.generate(model, ids, config=vk.VReasonConfig(keep_ratio=0.5), max_new_tokens=2, **inputs)


def test_lite_with_an_explicit_span_prunes_that_span(llama):
    out = vk.generate(llama, _prompt(16, 3), span=torch.arange(4, 12), config=vk.VReasonConfig(keep_ratio=0.5),
                      max_new_tokens=3)
    assert out.stats["span_size"] == 4


def test_a_text_prompt_is_never_pruned_by_default(llama):
    ids = _prompt(14, 4)
    assert vk.VReasonConfig().keep_ratio == 1.0
    out = vk.generate(llama, ids, max_new_tokens=3)
    assert out.stats["span_size"] == 14  # the whole prompt, unpruned
    assert torch.equal(out.sequences[:, :14], ids)


# 5. model.generate options -----------------------------------------------------------


@pytest.mark.parametrize(
    "option",
    [dict(num_beams=2), dict(streamer=object()), dict(output_scores=True), dict(return_dict_in_generate=True),
     dict(num_return_sequences=2), dict(repetition_penalty=1.2), dict(generation_config=None)],
    ids=lambda option: next(iter(option)),
)
def test_generate_options_are_refused_by_name_before_any_model_call(llama, option):
    name = next(iter(option))
    with _ForwardCounter(llama) as counter, pytest.raises(ValueError, match=f"^vk.generate does not support {name}; "):
        vk.generate(llama, _prompt(6, 5), max_new_tokens=2, **option)
    assert counter.calls == 0


def test_several_refused_options_are_all_named(llama):
    with pytest.raises(ValueError, match=r"does not support num_beams; .*\(also refused: output_scores\)"):
        vk.generate(llama, _prompt(6, 5), max_new_tokens=2, output_scores=True, num_beams=3)


def test_max_length_counts_the_prompt(llama):
    ids = _prompt(9, 6)
    out = vk.generate(llama, ids, max_length=14, eos_token_id=[])
    assert out.sequences.shape == (1, 14) and out.stats["tokens"] == 5
    with pytest.raises(ValueError, match="max_new_tokens or max_length, not both"):
        vk.generate(llama, ids, max_length=14, max_new_tokens=5)
    with pytest.raises(ValueError, match="max_length .* >= the prompt length 9"):
        vk.generate(llama, ids, max_length=8)


def test_top_k_keeps_the_k_most_likely_tokens():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    allowed = logits.topk(4, dim=-1).indices
    generator = torch.Generator().manual_seed(1)
    drawn = torch.stack([
        select_next_token(logits, do_sample=True, temperature=1.0, top_k=4, top_p=1.0, min_p=0.0, generator=generator)
        for _ in range(200)
    ], dim=1)  # [3, 200]
    for row in range(3):
        assert set(drawn[row].tolist()) <= set(allowed[row].tolist())
        assert len(set(drawn[row].tolist())) > 1
    one = select_next_token(logits, do_sample=True, temperature=1.0, top_k=1, top_p=1.0, min_p=0.0, generator=generator)
    assert torch.equal(one, logits.argmax(-1))


def test_top_k_one_samples_the_greedy_tokens(llama):
    ids = _prompt(8, 7)
    greedy = vk.generate(llama, ids, max_new_tokens=6, eos_token_id=[])
    sampled = vk.generate(llama, ids, max_new_tokens=6, eos_token_id=[], do_sample=True, top_k=1,
                          generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampled.sequences, greedy.sequences)
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        vk.generate(llama, ids, max_new_tokens=2, top_k=-1)


def test_progress_is_called_with_the_steps_done(llama):
    seen = []
    vk.generate(llama, _prompt(7, 8), max_new_tokens=5, eos_token_id=[], progress=seen.append)
    assert seen == [1, 2, 3, 4, 5]
    with pytest.raises(TypeError, match="progress must be a callable"):
        vk.generate(llama, _prompt(7, 8), max_new_tokens=5, progress=3)


# 7. The runaway guard ------------------------------------------------------------------


def _runaway_warnings(caught):
    return [w for w in caught if "ΔV outgrew the values it modulates" in str(w.message)]


@pytest.mark.parametrize("name", list(GENERATORS))
def test_a_runaway_learning_rate_warns_once(llama, name):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = GENERATORS[name](llama, _prompt(10, 9), config=vk.VReasonConfig(lr=1e6), max_new_tokens=12,
                               eos_token_id=[])
    assert len(_runaway_warnings(caught)) == 1, [str(w.message) for w in caught]
    assert float(out.delta_norm.max()) > 1e6
    assert "lower lr" in str(_runaway_warnings(caught)[0].message)


def test_the_default_learning_rate_does_not_warn(llama):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vk.generate(llama, _prompt(10, 9), max_new_tokens=64, eos_token_id=[])
    assert _runaway_warnings(caught) == []


def test_the_guard_and_the_lr_range_are_documented():
    tuning = (REPO / "docs" / "tuning.md").read_text()
    for text in (vk.VReasonConfig.__doc__, tuning):
        assert f"{RUNAWAY_RATIO:g}×" in text or f"{RUNAWAY_RATIO:g}x" in text
        assert re.search(r"1e-3 to 2e-1", text)
