"""V-Reason inside ``model.generate`` (``vk.vreason_decoding``, ``vk.GENERATE_RECIPE``):
plain decoding through it is bit for bit ``model.generate``'s, V-Reason through it is
``vk.generate``'s, both forms agree, unsupported modes fail before any forward, and the
model is left as it was (docs/hf-generate.md)."""

import re
from pathlib import Path

import pytest
import torch
from transformers import StoppingCriteriaList, StopStringCriteria
from transformers.generation import GenerateDecoderOnlyOutput
from transformers.generation.streamers import BaseStreamer

import vreason_kernels as vk
import vreason_kernels.loading
from python_tests.tiny_models import synthetic_video_inputs, tiny_llama, tiny_qwen2_5_vl

TRACES = ("entropy", "entropy_ema", "alpha", "delta_norm")
PLAIN = vk.VReasonConfig(enabled=False)
# The torch backend's logits are the LM head's own (F.linear), so scores match bit for bit.
PLAIN_TORCH = vk.VReasonConfig(enabled=False, backend="torch")
VREASON = vk.VReasonConfig(lr=0.05, every=2)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama()


@pytest.fixture(scope="module")
def qwen_vl():
    model = tiny_qwen2_5_vl()
    return model, synthetic_video_inputs(model)


def _padded_batch(vocab, seed=0):
    """Two prompts of 9 and 14 tokens, the first left-padded, with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 14), generator=gen)
    mask = torch.ones_like(ids)
    ids[0, :5], mask[0, :5] = 0, 0
    return dict(input_ids=ids, attention_mask=mask)


def _callable(**kw):
    return dict(custom_generate=vk.vreason_decoding, **kw)


def _folder(**kw):
    return dict(custom_generate=vk.GENERATE_RECIPE, trust_remote_code=True, **kw)


def _generate(model, inputs, seed=0, **kw):
    torch.manual_seed(seed)  # sampling draws from the global generator, as in model.generate
    return model.generate(**inputs, **kw)


def assert_same_traces(a, b):
    for name in TRACES:
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0, equal_nan=True,
                                   msg=lambda m: f"{name}: {m}")


# What model.generate users pass, each run plain and through V-Reason switched off.
DECODING = {
    "greedy": dict(do_sample=False),
    "repetition-penalty": dict(do_sample=False, repetition_penalty=1.5),
    "sampled": dict(do_sample=True, temperature=0.8, top_k=20, top_p=0.9),
    "min-new-tokens-bad-words": dict(do_sample=False, min_new_tokens=12, bad_words_ids=[[5], [7, 8]]),
    "two-samples-a-prompt": dict(do_sample=True, num_return_sequences=2),  # rows repeated before decoding
}


@pytest.mark.parametrize("form", [_callable, _folder], ids=["callable", "folder"])
@pytest.mark.parametrize("name", list(DECODING))
def test_plain_decoding_is_bit_identical_to_model_generate(llama, name, form):
    inputs = _padded_batch(llama.config.vocab_size)
    kw = dict(max_new_tokens=16, return_dict_in_generate=True, output_scores=True, output_logits=True,
              **DECODING[name])
    expected = _generate(llama, inputs, **kw)
    out = _generate(llama, inputs, **form(vreason=PLAIN_TORCH), **kw)
    assert torch.equal(out.sequences, expected.sequences)
    for got, want in ((out.scores, expected.scores), (out.logits, expected.logits)):
        assert len(got) == len(want) and all(torch.equal(g, w) for g, w in zip(got, want))
    # The fused backend (the default) gives the same tokens; its logits agree to rounding.
    fused = _generate(llama, inputs, **form(vreason=PLAIN), **kw)
    assert torch.equal(fused.sequences, expected.sequences)
    torch.testing.assert_close(torch.stack(fused.logits), torch.stack(expected.logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("form", [_callable, _folder], ids=["callable", "folder"])
def test_eos_one_or_several_ids_stop_rows_as_model_generate_does(llama, form):
    batch = _padded_batch(llama.config.vocab_size, seed=1)
    free = llama.generate(**batch, max_new_tokens=24, do_sample=False, eos_token_id=[])
    one_row = {k: v[1:] for k, v in batch.items()}
    # One id that row 1 meets; then an id from each row, so the rows end at different steps.
    for inputs, eos in ((one_row, int(free[1, -15])), (batch, [int(free[0, -18]), int(free[1, -15])])):
        expected = llama.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eos)
        out = llama.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=eos, **form(vreason=PLAIN))
        assert out.shape[1] < free.shape[1] and torch.equal(out, expected)


def test_v_reason_through_generate_is_vk_generate(llama):
    inputs = _padded_batch(llama.config.vocab_size, seed=2)
    ids = inputs["input_ids"]
    reference = vk.generate(llama, ids, attention_mask=inputs["attention_mask"], config=VREASON, max_new_tokens=12,
                            eos_token_id=[])
    for form in (_callable, _folder):
        out = llama.generate(**inputs, max_new_tokens=12, eos_token_id=[], return_dict_in_generate=True,
                             **form(vreason=VREASON))
        assert isinstance(out, GenerateDecoderOnlyOutput) and isinstance(out.vreason, vk.VReasonOutput)
        assert torch.equal(out.sequences, reference.sequences) and torch.equal(out.vreason.sequences, out.sequences)
        assert_same_traces(out.vreason, reference)
        assert out.vreason.stats["updates"] == reference.stats["updates"] > 0
        assert out.scores is None and out.logits is None  # not asked for
    # Without return_dict_in_generate: the plain tensor, as model.generate returns it.
    plain = llama.generate(**inputs, max_new_tokens=12, eos_token_id=[], **_callable(vreason=VREASON))
    assert isinstance(plain, torch.Tensor) and torch.equal(plain, reference.sequences)


def test_video_model_passes_its_inputs_and_modulates_the_video(qwen_vl):
    model, inputs = qwen_vl
    config = vk.VReasonConfig(lr=0.05)
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    reference = vk.generate(model, inputs["input_ids"], config=config, max_new_tokens=16, eos_token_id=[], **rest)
    video = int((inputs["input_ids"] == model.config.video_token_id).sum())
    for form in (_callable, _folder):
        out = model.generate(**inputs, max_new_tokens=16, eos_token_id=[], return_dict_in_generate=True,
                             **form(vreason=config))
        assert out.vreason.stats["span_size"] == video > 0
        assert torch.equal(out.sequences, reference.sequences)
        assert_same_traces(out.vreason, reference)
    expected = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=16, **_callable(vreason=PLAIN)), expected)


class _Recording(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ended += 1


def test_the_folder_form_streams_every_token_then_end(llama):
    ids = _padded_batch(llama.config.vocab_size, seed=3)["input_ids"][1:]
    streamer, plain_streamer = _Recording(), _Recording()
    out = llama.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=streamer, **_folder(vreason=VREASON))
    llama.generate(ids, max_new_tokens=12, eos_token_id=[], streamer=plain_streamer)
    assert torch.equal(streamer.puts[0], ids)  # the prompt first, as model.generate streams it
    assert torch.equal(torch.cat([p.reshape(1, -1) for p in streamer.puts], 1), out)
    assert len(streamer.puts) == len(plain_streamer.puts) == 13 and streamer.ended == 1


def test_callable_form_refuses_a_streamer_it_would_not_get(llama):
    streamer = _Recording()
    with pytest.raises(ValueError, match="streamer: .*GENERATE_RECIPE"):
        llama.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, streamer=streamer, **_callable())
    assert streamer.ended == 0 and len(streamer.puts) == 1  # transformers itself streamed the prompt


REFUSED = [
    (dict(num_beams=2), "num_beams=2"),
    (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens=3"),
    (dict(synced_gpus=True), "synced_gpus=True"),
    (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha=0.6"),
    (dict(return_dict_in_generate=True, output_hidden_states=True), "output_hidden_states=True"),
    ("assistant", "assistant_model="),
]


@pytest.mark.parametrize("form", [_callable, _folder], ids=["callable", "folder"])
@pytest.mark.parametrize("kwargs, message", REFUSED, ids=[m.split("=")[0] for _, m in REFUSED])
def test_unsupported_modes_fail_before_any_forward(llama, form, kwargs, message):
    if kwargs == "assistant":
        kwargs = dict(assistant_model=tiny_llama(seed=1))
    forwards = []
    hook = llama.model.register_forward_pre_hook(lambda *args: forwards.append(1))
    try:
        with pytest.raises(ValueError, match=f"does not support {message}"):
            llama.generate(torch.tensor([[5, 6, 7, 8]]), max_new_tokens=4, **kwargs, **form())
    finally:
        hook.remove()
    assert not forwards


def test_stop_strings_need_the_tokenizer_the_callable_form_does_not_get(llama):
    # transformers keeps tokenizer= from a callable, and says so before any forward.
    with pytest.raises(ValueError, match="tokenizer"):
        llama.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, stop_strings=["x"], tokenizer=object(),
                       **_callable())


def _attention_state(model):
    config = model.config
    subs = {name: getattr(config, name)._attn_implementation for name in getattr(config, "sub_configs", {})
            if getattr(config, name, None) is not None}
    return (
        config._attn_implementation, subs,
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
        sorted(k for m in model.modules() for k in vars(m) if "vreason" in k.lower()),
        [getattr(m, "rope_deltas", None) for m in model.modules()],
    )


@pytest.mark.parametrize("form", [_callable, _folder], ids=["callable", "folder"])
def test_model_is_restored_after_success_and_after_an_error(qwen_vl, form):
    model, inputs = qwen_vl

    def broken(params, lr):
        raise RuntimeError("optimizer exploded")

    state = _attention_state(model)
    before = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    model.generate(**inputs, max_new_tokens=10, **form(vreason=VREASON))
    assert _attention_state(model) == state
    with pytest.raises(RuntimeError, match="optimizer exploded"):
        model.generate(**inputs, max_new_tokens=10, **form(vreason=vk.VReasonConfig(optimizer=broken)))
    assert _attention_state(model) == state
    assert torch.equal(model.generate(**inputs, max_new_tokens=10, do_sample=False), before)


# The real SmolLM2-135M ---------------------------------------------------------------------


def _chat_batch(tokenizer, questions):
    rows = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
            for q in questions]
    rows = [r["input_ids"] if isinstance(r, dict) or hasattr(r, "keys") else r for r in rows]
    width = max(len(r) for r in rows)
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(r)) + list(r) for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask)


@pytest.mark.slow  # the shipped SmolLM2 (~20 s to load) and several generate calls
def test_smollm2_plain_bit_identical_and_v_reason_equals_vk_generate(smollm2):
    model, tokenizer = smollm2
    inputs = _chat_batch(tokenizer, ["What is 12 * 13?", "Name a primary colour."])
    for name in ("greedy", "repetition-penalty", "sampled"):
        kw = dict(max_new_tokens=16, **DECODING[name])
        expected = _generate(model, inputs, **kw)
        assert torch.equal(_generate(model, inputs, **_callable(vreason=PLAIN), **kw), expected), name
    reference = vk.generate(model, inputs["input_ids"], attention_mask=inputs["attention_mask"], config=VREASON,
                            max_new_tokens=16)
    for form in (_callable, _folder):
        out = model.generate(**inputs, max_new_tokens=16, return_dict_in_generate=True, **form(vreason=VREASON))
        assert torch.equal(out.sequences, reference.sequences)
        assert_same_traces(out.vreason, reference)


@pytest.mark.slow  # the shipped SmolLM2
def test_smollm2_stop_strings_and_text_streamer_in_the_folder_form(smollm2, capsys):
    from transformers import TextStreamer

    model, tokenizer = smollm2
    inputs = _chat_batch(tokenizer, ["Count from 1 to 20, separated by commas."])
    free = model.generate(**inputs, max_new_tokens=24, do_sample=False, eos_token_id=[])
    prompt = inputs["input_ids"].shape[1]
    stop = tokenizer.decode(free[0, prompt + 8: prompt + 11])  # three tokens met mid-answer
    expected = model.generate(**inputs, max_new_tokens=24, do_sample=False, stop_strings=[stop], tokenizer=tokenizer)
    assert expected.shape[1] < free.shape[1]
    streamer = TextStreamer(tokenizer, skip_prompt=True)
    out = model.generate(**inputs, max_new_tokens=24, stop_strings=[stop], tokenizer=tokenizer, streamer=streamer,
                         **_folder(vreason=PLAIN))
    assert torch.equal(out, expected)
    printed = capsys.readouterr().out
    assert printed.strip() == tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    # The callable form takes the same criterion when it is built by hand.
    criteria = StoppingCriteriaList([StopStringCriteria(tokenizer=tokenizer, stop_strings=[stop])])
    out = model.generate(**inputs, max_new_tokens=24, stopping_criteria=criteria, **_callable(vreason=PLAIN))
    assert torch.equal(out, expected)


DOC = Path(__file__).resolve().parents[1] / "docs" / "hf-generate.md"


@pytest.mark.slow  # the shipped SmolLM2 and four generate calls
def test_the_docs_example_runs(smollm2, monkeypatch, capsys):
    blocks = re.findall(r"^```python\n(.*?)^```", DOC.read_text(), flags=re.S | re.M)
    assert blocks, "docs/hf-generate.md has no python block"
    # load_causal_lm of the shipped GGUF gets the session's model, as loading it again would.
    monkeypatch.setattr(vreason_kernels.loading, "load_causal_lm", lambda path, **kw: smollm2)
    for i, code in enumerate(blocks):
        exec(compile(code, f"docs/hf-generate.md python block {i + 1}", "exec"), {"__name__": "__doc_example__"})
    assert "updates of ΔV" in capsys.readouterr().out
