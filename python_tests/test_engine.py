"""The V-Reason engine (``vk.generate``) against the naive ``vk.reference.generate``,
the model's own ``generate``, and its robustness contract (CPU)."""

import inspect
import warnings

import pytest
import torch

import vreason_kernels as vk

NEW = 40  # tokens per comparison run (>= 32)
TRACES = ("entropy", "entropy_ema", "alpha", "delta_norm")


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=331, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=None, bos_token_id=None,
    )
    model = LlamaForCausalLM(config).eval()
    # Sharper, less uniform next-token distributions than the default init, so greedy
    # choices have margins well above float noise.
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _prompt(vocab, length, seed):
    return torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(seed))


def assert_same_run(a, b, *, atol=2e-4, rtol=2e-3):
    assert torch.equal(a.sequences, b.sequences), f"tokens differ:\n{a.sequences}\n{b.sequences}"
    for name in TRACES:
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        torch.testing.assert_close(x, y, atol=atol, rtol=rtol, equal_nan=True, msg=lambda m: f"{name}: {m}")


CONFIGS = {
    "every1-steps1": dict(lr=0.05, steps=1, every=1),
    "every3-steps2": dict(lr=0.05, steps=2, every=3, max_delta_norm=0.5),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_reference_tiny_llama(llama, name):
    config = vk.VReasonConfig(**CONFIGS[name])
    ids = _prompt(llama.config.vocab_size, 21, 1)
    fused = vk.generate(llama, ids, config=config, max_new_tokens=NEW)
    naive = vk.reference.generate(llama, ids, config=config, max_new_tokens=NEW)
    assert fused.sequences.shape == (1, 21 + NEW)
    assert_same_run(fused, naive)
    assert fused.stats["updates"] == naive.stats["updates"] > 0
    assert (fused.delta_norm[0, 1:] > 0).any()
    plain = vk.generate(llama, ids, config=vk.VReasonConfig(enabled=False), max_new_tokens=NEW)
    assert not torch.equal(plain.entropy, fused.entropy), "the controller changed nothing"


def test_ema_init_zero_climbs_before_it_peaks_and_matches_reference(llama):
    config = vk.VReasonConfig(lr=0.05, ema_init="zero", ema_beta=0.8)
    ids = _prompt(llama.config.vocab_size, 19, 14)
    fused = vk.generate(llama, ids, config=config, max_new_tokens=NEW)
    assert_same_run(fused, vk.reference.generate(llama, ids, config=config, max_new_tokens=NEW))
    h, ema = fused.entropy[0].double(), fused.entropy_ema[0].double()
    # H_ema_k = (1 - β) Σ_j β^(k-j) H_j from H_ema_0 = 0 (no bias correction).
    weights = (1 - 0.8) * 0.8 ** torch.arange(NEW, dtype=torch.float64)
    expected = torch.stack([(weights[:k].flip(0) * h[:k]).sum() for k in range(1, NEW + 1)])
    torch.testing.assert_close(ema, expected, atol=1e-5, rtol=1e-5)
    # It climbs from 0, so the first tokens are at a new peak: α = +1 (exploration).
    assert (fused.alpha[0, :3] == 1).all() and int(ema.argmax()) > 0
    first_config = vk.VReasonConfig(lr=0.05, ema_beta=0.8, ema_init="first")
    first = vk.generate(llama, ids, config=first_config, max_new_tokens=NEW)
    assert fused.entropy_ema[0, 0] == pytest.approx(0.2 * float(fused.entropy[0, 0]), rel=1e-6)
    assert first.entropy_ema[0, 0] == first.entropy[0, 0]


def test_fused_matches_reference_non_last_layer(llama):
    config = vk.VReasonConfig(lr=0.05, layer=1)
    ids = _prompt(llama.config.vocab_size, 17, 2)
    assert_same_run(
        vk.generate(llama, ids, config=config, max_new_tokens=NEW),
        vk.reference.generate(llama, ids, config=config, max_new_tokens=NEW),
    )


@pytest.mark.slow  # the real SmolLM2-135M
def test_fused_matches_reference_smollm2(smollm2):
    model, tok = smollm2
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 17 + 25? Think step by step."}],
        add_generation_prompt=True, return_tensors="pt", return_dict=True,
    )["input_ids"]
    config = vk.VReasonConfig(lr=0.05)
    fused = vk.generate(model, ids, config=config, max_new_tokens=32, eos_token_id=[])
    naive = vk.reference.generate(model, ids, config=config, max_new_tokens=32, eos_token_id=[])
    assert fused.entropy.shape == (1, 32)
    assert_same_run(fused, naive, atol=1e-3, rtol=1e-2)


@pytest.mark.slow  # the real SmolLM2-135M
def test_disabled_equals_model_generate(llama, smollm2):
    for model, ids in ((llama, _prompt(llama.config.vocab_size, 11, 3)), (smollm2[0], None)):
        if ids is None:
            ids = smollm2[1]("The capital of France is", return_tensors="pt")["input_ids"]
        expected = model.generate(ids, max_new_tokens=NEW, do_sample=False)
        out = vk.generate(model, ids, config=vk.VReasonConfig(enabled=False), max_new_tokens=NEW)
        assert torch.equal(out.sequences, expected)
        assert torch.isfinite(out.entropy).all() and (out.delta_norm == 0).all()


def test_batch_left_padded_equals_one_by_one(llama):
    config = vk.VReasonConfig(lr=0.05, every=2)
    a, b = _prompt(llama.config.vocab_size, 9, 4), _prompt(llama.config.vocab_size, 14, 5)
    ids = torch.cat([torch.cat([torch.zeros(1, 5, dtype=torch.long), a], 1), b])
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    batch = vk.generate(llama, ids, attention_mask=mask, config=config, max_new_tokens=NEW)
    for row, single_ids in enumerate((a, b)):
        single = vk.generate(llama, single_ids, config=config, max_new_tokens=NEW)
        assert torch.equal(batch.sequences[row, -NEW:], single.sequences[0, -NEW:])
        for name in TRACES:
            torch.testing.assert_close(getattr(batch, name)[row], getattr(single, name)[0], atol=2e-4, rtol=2e-3)


def test_sampling_is_reproducible_with_a_generator(llama):
    ids = _prompt(llama.config.vocab_size, 8, 6)
    runs = [
        vk.generate(
            llama, ids, config=vk.VReasonConfig(lr=0.05), max_new_tokens=12, do_sample=True, temperature=0.8,
            top_p=0.9, min_p=0.05, generator=torch.Generator().manual_seed(7),
        ).sequences
        for _ in range(2)
    ]
    assert torch.equal(runs[0], runs[1])


def _nan_at_step(n):
    """An optimizer factory whose n-th step writes NaN into ΔV (the injection)."""

    class NaNAdam(torch.optim.Adam):
        calls = 0

        def step(self, closure=None):
            super().step(closure)
            NaNAdam.calls += 1
            if NaNAdam.calls == n:
                self.param_groups[0]["params"][0].data[0, 0, 0, 0] = float("nan")

    return lambda params, lr: NaNAdam(params, lr=lr)


def test_nan_delta_is_reset_with_a_warning(llama):
    ids = _prompt(llama.config.vocab_size, 10, 8)
    config = vk.VReasonConfig(lr=0.05, optimizer=_nan_at_step(3))
    with pytest.warns(UserWarning, match="NaN/Inf and was reset"):
        out = vk.generate(llama, ids, config=config, max_new_tokens=20, eos_token_id=[])
    assert out.stats["nan_resets"] == 1 and out.stats["tokens"] == 20
    assert torch.isfinite(out.delta_norm).all() and torch.isfinite(out.entropy).all()
    assert out.delta_norm[0, 3] == 0  # token 4's update (the 3rd) was reset
    assert out.delta_norm[0, 4] > 0  # and the controller went on


def test_empty_span_decodes_plainly_with_a_warning(llama):
    ids = _prompt(llama.config.vocab_size, 10, 9)
    with pytest.warns(UserWarning, match="span is empty"):
        out = vk.generate(llama, ids, config=vk.VReasonConfig(), span=torch.tensor([], dtype=torch.long),
                          max_new_tokens=10)
    plain = vk.generate(llama, ids, config=vk.VReasonConfig(enabled=False), max_new_tokens=10)
    assert torch.equal(out.sequences, plain.sequences)
    assert out.stats["updates"] == 0


def test_max_new_tokens_zero_returns_at_once(llama):
    ids = _prompt(llama.config.vocab_size, 6, 10)
    out = vk.generate(llama, ids, config=vk.VReasonConfig(), max_new_tokens=0)
    assert torch.equal(out.sequences, ids) and out.entropy.shape == (1, 0) and out.stats["tokens"] == 0


def _model_state(model):
    return (
        model.config._attn_implementation,
        [(n, p.requires_grad) for n, p in model.named_parameters()],
        sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules()),
    )


def test_model_restored_after_generate_and_after_an_exception(llama):
    ids = _prompt(llama.config.vocab_size, 12, 11)
    llama.model.norm.weight.requires_grad_(True)  # a flag generate must put back
    try:
        before_state = _model_state(llama)
        with torch.no_grad():
            before = llama(ids).logits
        vk.generate(llama, ids, config=vk.VReasonConfig(lr=0.1), max_new_tokens=8)

        def broken(params, lr):
            raise RuntimeError("optimizer exploded")

        with pytest.raises(RuntimeError, match="optimizer exploded"):
            vk.generate(llama, ids, config=vk.VReasonConfig(optimizer=broken), max_new_tokens=8)
        assert _model_state(llama) == before_state
        with torch.no_grad():
            assert torch.equal(llama(ids).logits, before)
    finally:
        llama.model.norm.weight.requires_grad_(False)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(lr=0.0), ValueError, "lr"),
        (dict(lr=float("nan")), ValueError, "lr"),
        (dict(steps=0), ValueError, "steps"),
        (dict(every=1.5), TypeError, "every"),
        (dict(ema_beta=1.0), ValueError, "ema_beta"),
        (dict(ema_init="one"), ValueError, "ema_init"),
        (dict(keep_ratio=0.0), ValueError, "keep_ratio"),
        (dict(max_delta_norm=-1.0), ValueError, "max_delta_norm"),
        (dict(optimizer="rmsprop"), ValueError, "optimizer"),
        (dict(backend="cuda"), ValueError, "backend"),
        (dict(enabled=1), TypeError, "enabled"),
    ],
)
def test_bad_config_values(kwargs, error, match):
    with pytest.raises(error, match=match):
        vk.VReasonConfig(**kwargs)


def test_bad_generate_arguments(llama):
    ids = _prompt(llama.config.vocab_size, 6, 12)
    cases = [
        (dict(input_ids=ids.float()), TypeError, "input_ids"),
        (dict(input_ids=ids[0]), ValueError, "input_ids"),
        (dict(input_ids=ids[:, :0]), ValueError, "input_ids"),
        (dict(max_new_tokens=-1), ValueError, "max_new_tokens"),
        (dict(temperature=0.0, do_sample=True), ValueError, "temperature"),
        (dict(top_p=1.5), ValueError, "top_p"),
        (dict(config="fast"), TypeError, "config"),
        (dict(config=vk.VReasonConfig(layer=7)), ValueError, "layer"),
        (dict(config=vk.VReasonConfig(), span=torch.tensor([3, 2])), ValueError, "span"),
        (dict(config=vk.VReasonConfig(), span=torch.tensor([0, 6])), ValueError, "span"),
        (dict(attention_mask=torch.ones(1, 5, dtype=torch.long)), ValueError, "attention_mask"),
        (dict(attention_mask=torch.tensor([[1, 1, 1, 1, 1, 0]])), ValueError, "left-padded"),
        (dict(past_key_values=None), ValueError, "past_key_values"),
        (dict(pixel_values_video=torch.zeros(1)), ValueError, "pixel_values_video"),
        (dict(input_ids=ids + 1000), ValueError, "input_ids must be token ids"),
        (dict(input_ids=ids - 1000), ValueError, "input_ids must be token ids"),
        (dict(max_new_tokens=10**12), ValueError, "max_new_tokens"),
        (dict(eos_token_id=-1), ValueError, "eos_token_id"),
        (dict(eos_token_id=[2, "a"]), ValueError, "eos_token_id"),
        (dict(pad_token_id=-1), ValueError, "pad_token_id"),
        (dict(pad_token_id=1.5), ValueError, "pad_token_id"),
        (dict(attention_mask=torch.full_like(ids, 2)), ValueError, "only 0"),
        (dict(config=vk.VReasonConfig(optimizer=lambda params, lr: None)), TypeError, "optimizer"),
        (dict(config=vk.VReasonConfig(), span=torch.tensor([0, 1], device="meta")), ValueError, "span"),
    ]
    for kwargs, error, match in cases:
        kwargs = {"input_ids": ids, "max_new_tokens": 2, **kwargs}
        with pytest.raises(error, match=match):
            vk.generate(llama, kwargs.pop("input_ids"), **kwargs)


def test_config_changed_after_construction_is_checked_again(llama):
    config = vk.VReasonConfig()
    config.steps = 0
    with pytest.raises(ValueError, match="steps"):
        vk.generate(llama, _prompt(llama.config.vocab_size, 4, 15), config=config, max_new_tokens=2)


def test_tiny_temperature_samples_the_argmax_and_tensor_eos_is_accepted(llama):
    ids = _prompt(llama.config.vocab_size, 6, 16)
    base = vk.VReasonConfig(enabled=False)
    greedy = vk.generate(llama, ids, config=base, max_new_tokens=6, eos_token_id=[])
    sampled = vk.generate(
        llama, ids, config=base, max_new_tokens=6, do_sample=True, temperature=1e-45, eos_token_id=torch.tensor(2),
        generator=torch.Generator().manual_seed(0),
    )
    # ties aside, (z - max) / 1e-45 leaves 0 for the argmax and -inf elsewhere (no inf - inf = NaN)
    assert torch.equal(sampled.sequences, greedy.sequences[:, : sampled.sequences.shape[1]])


def test_model_without_lm_head_is_rejected(llama):
    with pytest.raises(ValueError, match="language-model head"):
        vk.generate(llama.model, _prompt(llama.config.vocab_size, 4, 13), max_new_tokens=2)


@pytest.fixture(scope="module")
def qwen_vl():
    from python_tests.tiny_models import synthetic_video_inputs, tiny_qwen2_5_vl

    model = tiny_qwen2_5_vl()
    return model, synthetic_video_inputs(model)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_fused_matches_reference_qwen2_5_vl_video(qwen_vl, name):
    model, inputs = qwen_vl
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    config = vk.VReasonConfig(**CONFIGS[name])
    fused = vk.generate(model, ids, config=config, max_new_tokens=32, eos_token_id=[], **inputs)
    naive = vk.reference.generate(model, ids, config=config, max_new_tokens=32, eos_token_id=[], **inputs)
    video = int((ids[0] == model.config.video_token_id).sum())
    assert fused.stats["span_size"] == video > 0  # the default span is the video
    assert_same_run(fused, naive)


def test_disabled_equals_model_generate_qwen2_5_vl(qwen_vl):
    model, inputs = qwen_vl
    expected = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    inputs = dict(inputs)
    out = vk.generate(model, inputs.pop("input_ids"), config=vk.VReasonConfig(enabled=False), max_new_tokens=24,
                      **inputs)
    assert torch.equal(out.sequences, expected)


def test_lite_pruning_matches_reference_qwen2_5_vl(qwen_vl):
    model, inputs = qwen_vl
    inputs = dict(inputs)
    ids = inputs.pop("input_ids")
    config = vk.VReasonConfig(lr=0.05, keep_ratio=0.5)
    fused = vk.generate(model, ids, config=config, max_new_tokens=24, eos_token_id=[], **inputs)
    naive = vk.reference.generate(model, ids, config=config, max_new_tokens=24, eos_token_id=[], **inputs)
    video = int((ids[0] == model.config.video_token_id).sum())
    assert fused.stats["span_size"] == -(-video // 2)
    assert_same_run(fused, naive)


def test_last_layer_update_reuses_the_token_forward(llama, monkeypatch):
    """With the last layer controlled and steps=1, an update needs no layer re-run (the
    token's own forward carries the graph from ΔV, so one LM-head pass gives dH/dh);
    each further step re-runs the layer once."""
    from vreason_kernels.engine.controller import LayerRerun

    reruns = []
    original = LayerRerun.forward
    monkeypatch.setattr(LayerRerun, "forward", lambda self, *a, **k: reruns.append(1) or original(self, *a, **k))
    ids = _prompt(331, 9, seed=5)
    one_step = vk.generate(llama, ids, config=vk.VReasonConfig(steps=1), max_new_tokens=8)
    assert one_step.stats["updates"] == 7 and reruns == []
    two_steps = vk.generate(llama, ids, config=vk.VReasonConfig(steps=2), max_new_tokens=8)
    assert len(reruns) == two_steps.stats["updates"] == 7


def _host_syncs(run) -> int:
    """Host-device synchronisations during ``run()``, counted via CUDA sync debug warnings."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync check needs CUDA")
def test_decode_loop_has_no_per_token_host_sync(llama):
    """Syncs do not grow with the number of tokens: 8 more tokens add only the one EOS
    check that falls between them (set-up and output syncs happen once per call)."""
    model = llama.cuda()
    try:
        ids = _prompt(331, 9, seed=6).cuda()

        def decode(n):
            return lambda: vk.generate(model, ids, config=vk.VReasonConfig(), max_new_tokens=n)

        decode(4)()  # warm-up: lazy initialisation and kernel compilation sync
        assert _host_syncs(decode(15)) - _host_syncs(decode(7)) <= 1
    finally:
        llama.cpu()


def test_reference_takes_the_same_arguments_as_the_engine():
    # The reference is the spec of vk.generate: any call of one must be a call of the other.
    assert inspect.signature(vk.reference.generate) == inspect.signature(vk.generate)
