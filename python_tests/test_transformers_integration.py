"""attn_implementation="vreason" inside transformers' own Llama and Qwen2.5-VL code: equality
with SDPA at zero delta, the delta's reach and gradient, kv overrides, and clean restore."""

import pytest
import torch

from python_tests.tiny_models import synthetic_video_inputs, tiny_llama, tiny_qwen2_5_vl, video_positions
from vreason_kernels.integrations import (
    IMPLEMENTATION,
    ValueDeltaContext,
    default_row_spans,
    default_span,
    vreason_attention,
)
from vreason_kernels.engine.attention import _CONTEXT_ATTR

# fp32 logits of the same model through two attention implementations differ by rounding only.
LOGIT_ATOL = 2e-4


def _zero_delta(model, batch: int, span: torch.Tensor) -> torch.Tensor:
    text = model.get_decoder().config
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    return torch.zeros(batch, text.num_key_value_heads, span.numel(), head_dim)


def _last_layer(model) -> int:
    return model.get_decoder().config.num_hidden_layers - 1


def _assert_restored(model, implementation: str = "sdpa") -> None:
    configs = [model.config] + [getattr(model.config, k) for k in model.config.sub_configs]
    assert all(c._attn_implementation == implementation for c in configs)
    assert not any(hasattr(m, _CONTEXT_ATTR) for m in model.modules())


@pytest.mark.slow  # the real SmolLM2-135M
def test_smollm2_zero_delta_matches_sdpa(smollm2):
    model, tokenizer = smollm2
    assert model.config._attn_implementation == "sdpa"
    input_ids = tokenizer("The three primary colours are", return_tensors="pt").input_ids
    span = torch.arange(input_ids.shape[1])
    with torch.no_grad():
        ref_logits = model(input_ids=input_ids).logits
    ref_tokens = model.generate(input_ids, max_new_tokens=16, do_sample=False)

    context = ValueDeltaContext(span=span, backend="auto")
    with vreason_attention(model, context):
        assert context.layers == (_last_layer(model),)
        context.delta_v[context.layers[0]] = _zero_delta(model, 1, span)
        with torch.no_grad():
            logits = model(input_ids=input_ids).logits
        tokens = model.generate(input_ids, max_new_tokens=16, do_sample=False)
        # A span with no delta passes through to plain attention.
        context.delta_v = {}
        with torch.no_grad():
            plain = model(input_ids=input_ids).logits
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    torch.testing.assert_close(plain, ref_logits, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    _assert_restored(model)


def test_load_time_vreason_matches_sdpa_with_padding(tmp_path):
    from transformers import AutoModelForCausalLM

    tiny_llama().save_pretrained(tmp_path)
    sdpa = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    vreason = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=IMPLEMENTATION).eval()
    assert vreason.config._attn_implementation == IMPLEMENTATION
    input_ids = torch.randint(3, 200, (2, 11), generator=torch.Generator().manual_seed(3))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :4] = 0  # left padding: the mask must reach the attention function
    with torch.no_grad():
        ref = sdpa(input_ids=input_ids, attention_mask=attention_mask).logits
        out = vreason(input_ids=input_ids, attention_mask=attention_mask).logits
    torch.testing.assert_close(out, ref, atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
def test_qwen2_5_vl_video_zero_delta_matches_sdpa(backend):
    model = tiny_qwen2_5_vl()
    inputs = synthetic_video_inputs(model, batch=2)
    span = default_span(model.config, inputs["input_ids"])
    assert torch.equal(span, video_positions(model, inputs["input_ids"]))
    with torch.no_grad():
        ref_logits = model(**inputs).logits
    ref_tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    context = ValueDeltaContext(span=span, delta_v={2: _zero_delta(model, 2, span)}, backend=backend)
    with vreason_attention(model, context):
        with torch.no_grad():
            logits = model(**inputs).logits
        tokens = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    torch.testing.assert_close(logits, ref_logits, atol=LOGIT_ATOL, rtol=0)
    assert torch.equal(tokens, ref_tokens)
    _assert_restored(model)


def test_nonzero_delta_reaches_last_layer_only_and_gradient_flows():
    model = tiny_llama().double()
    last = _last_layer(model)
    input_ids = torch.randint(3, 200, (2, 14), generator=torch.Generator().manual_seed(4))
    span = torch.arange(3, 9)
    with torch.no_grad():
        ref = model(input_ids=input_ids, output_hidden_states=True)
    gen = torch.Generator().manual_seed(5)
    delta = (0.5 * torch.randn(_zero_delta(model, 2, span).shape, generator=gen, dtype=torch.float64)).requires_grad_()
    context = ValueDeltaContext(span=span, delta_v={last: delta}, backend="torch")

    def loss_of(d):
        context.delta_v[last] = d
        out = model(input_ids=input_ids, output_hidden_states=True)
        return out.logits[:, -1].log_softmax(-1)[:, 7].sum(), out

    with vreason_attention(model, context):
        loss, out = loss_of(delta)
        loss.backward()
        # Central difference along a random direction against the autograd gradient. Llama's
        # RMSNorm computes in float32 even in a float64 model, so the step cannot be tiny.
        direction = torch.randn(delta.shape, generator=gen, dtype=torch.float64)
        eps = 1e-3
        with torch.no_grad():
            numeric = (loss_of(delta + eps * direction)[0] - loss_of(delta - eps * direction)[0]) / (2 * eps)
    for i in range(last + 1):  # inputs of every layer up to the last are untouched
        torch.testing.assert_close(out.hidden_states[i], ref.hidden_states[i], atol=1e-12, rtol=0)
    changed = (out.logits - ref.logits).abs().amax(dim=(0, 2))
    assert (changed[: span[0]] < 1e-12).all(), "positions before the span cannot see the delta"
    assert (changed[span[0] :] > 1e-6).all()
    assert delta.grad is not None and torch.isfinite(delta.grad).all() and delta.grad.abs().max() > 0
    torch.testing.assert_close((delta.grad * direction).sum(), numeric, rtol=2e-3, atol=1e-6)


def test_a_model_that_is_not_frozen_gets_the_delta_gradient():
    """Weights that require grad (as from_pretrained leaves them): the delta's layer treats
    its keys and values as constants, so the forward runs and ΔV gets the same gradient
    as with the model frozen; the query path, and so the layers below, keep theirs."""
    model = tiny_llama().requires_grad_(True)
    last = _last_layer(model)
    input_ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(8))
    span = torch.arange(2, 9)
    grads = []
    for frozen in (False, True):
        model.requires_grad_(not frozen)
        delta = (0.3 * torch.randn(_zero_delta(model, 1, span).shape, generator=torch.Generator().manual_seed(9)))
        delta.requires_grad_()
        with vreason_attention(model, ValueDeltaContext(span=span, delta_v={last: delta})):
            model(input_ids=input_ids).logits[0, -1].log_softmax(-1)[5].backward()
        grads.append(delta.grad)
    torch.testing.assert_close(grads[0], grads[1])
    assert grads[0].abs().max() > 0
    layers = model.get_decoder().layers
    model.requires_grad_(False)
    assert layers[last].self_attn.q_proj.weight.grad.abs().max() > 0
    assert layers[last].self_attn.v_proj.weight.grad is None  # the cache's projection: a constant here
    assert layers[0].self_attn.q_proj.weight.grad.abs().max() > 0


@pytest.mark.parametrize("new_tokens", [1, 3])
def test_kv_override_reruns_one_layer(new_tokens):
    """The engine's re-run: the last layer's attention on the last tokens, with the full
    cache as kv override, reproduces the full forward (with and without a delta)."""
    model = tiny_llama()
    last = _last_layer(model)
    attention = model.get_decoder().layers[last].self_attn
    input_ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(6))
    span = torch.arange(2, 7)
    delta = 0.3 * torch.randn(_zero_delta(model, 2, span).shape, generator=torch.Generator().manual_seed(7))
    seen = {}

    def capture(module, args, kwargs, output):
        seen.update(hidden=kwargs["hidden_states"], rope=kwargs["position_embeddings"], out=output[0])

    for delta_v in ({}, {last: delta}):
        context = ValueDeltaContext(span=span, delta_v=dict(delta_v), backend="torch")
        handle = attention.register_forward_hook(capture, with_kwargs=True)
        try:
            with vreason_attention(model, context), torch.no_grad():
                cache = model(input_ids=input_ids, use_cache=True).past_key_values
        finally:
            handle.remove()
        cos, sin = seen["rope"]
        context.kv_override[last] = (cache.layers[last].keys, cache.layers[last].values)
        with vreason_attention(model, context), torch.no_grad():
            rerun, _ = attention(
                hidden_states=seen["hidden"][:, -new_tokens:],
                position_embeddings=(cos[:, -new_tokens:], sin[:, -new_tokens:]),
                attention_mask=None,
                past_key_values=None,
            )
        torch.testing.assert_close(rerun, seen["out"][:, -new_tokens:], atol=1e-5, rtol=0)


def test_context_manager_restores_model_also_on_error():
    model = tiny_qwen2_5_vl()
    context = ValueDeltaContext(span=torch.arange(3))
    with pytest.raises(KeyError, match="boom"):
        with vreason_attention(model, context):
            assert model.config._attn_implementation == IMPLEMENTATION
            assert model.config.text_config._attn_implementation == IMPLEMENTATION
            assert context.layers == (2,)
            raise KeyError("boom")
    _assert_restored(model)

    eager = tiny_llama(attn_implementation="eager")
    with vreason_attention(eager, ValueDeltaContext(layers=(0, -1))):
        with pytest.raises(RuntimeError, match="do not nest"):
            with vreason_attention(eager, ValueDeltaContext()):
                pass
        assert sum(hasattr(m, _CONTEXT_ATTR) for m in eager.modules()) == 2
    _assert_restored(eager, "eager")


def test_bad_context():
    with pytest.raises(TypeError, match="layers"):
        ValueDeltaContext(layers=())
    with pytest.raises(ValueError, match="backend"):
        ValueDeltaContext(backend="cuda")
    with pytest.raises(TypeError, match="span"):
        ValueDeltaContext(span=torch.tensor([0.5]))
    model = tiny_llama()
    with pytest.raises(ValueError, match="context.layers"):
        with vreason_attention(model, ValueDeltaContext(layers=(3,))):
            pass
    _assert_restored(model)
    with pytest.raises(TypeError, match="ValueDeltaContext"):
        with vreason_attention(model, {"layers": (0,)}):
            pass


def test_default_span():
    model = tiny_qwen2_5_vl()
    config = model.config
    video = synthetic_video_inputs(model, batch=2, text_before=4)["input_ids"]
    assert torch.equal(default_span(config, video), video_positions(model, video))
    assert torch.equal(default_span(config, video[0]), video_positions(model, video))
    image = video.clone()
    image[image == config.video_token_id] = config.image_token_id
    assert torch.equal(default_span(config, image), video_positions(model, video))
    text = torch.randint(3, 200, (2, 9))
    assert torch.equal(default_span(config, text), torch.arange(9))
    assert torch.equal(default_span(tiny_llama().config, text), torch.arange(9))
    shifted = torch.cat([video[:1], video[1:].roll(1, dims=1)])
    with pytest.raises(ValueError, match="differ across batch rows"):
        default_span(config, shifted)


def test_default_row_spans_per_row_and_without_padding():
    model = tiny_qwen2_5_vl()
    config = model.config
    video = synthetic_video_inputs(model, batch=2, text_before=4)["input_ids"]
    text = torch.randint(3, 200, (1, video.shape[1]))
    ids = torch.cat([video[:1].roll(3, dims=1), text, video[1:]])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding of the text row
    rows = default_row_spans(config, ids, mask)
    assert torch.equal(rows[0], video_positions(model, video) + 3)
    assert torch.equal(rows[1], torch.arange(5, ids.shape[1]))  # no video: the visible prompt
    assert torch.equal(rows[2], video_positions(model, video))


def test_static_cache_generation_matches_sdpa():
    """A prefill into an empty static cache gets no mask and N > T: SDPA's top-left rule applies."""
    model = tiny_llama()
    input_ids = torch.randint(3, 200, (2, 9), generator=torch.Generator().manual_seed(8))
    kwargs = dict(
        max_new_tokens=6,
        do_sample=False,
        cache_implementation="static",
        return_dict_in_generate=True,
        output_logits=True,
    )
    ref = model.generate(input_ids, **kwargs)
    span = torch.arange(2, 9)
    context = ValueDeltaContext(span=span, delta_v={2: _zero_delta(model, 2, span)}, backend="torch")
    with vreason_attention(model, context):
        out = model.generate(input_ids, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=LOGIT_ATOL, rtol=0)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(layers=5), TypeError, "layers"),
        (dict(layers=()), TypeError, "layers"),
        (dict(delta_v=torch.zeros(1)), TypeError, "delta_v must be a dict"),
        (dict(kv_override=[]), TypeError, "kv_override must be a dict"),
        (dict(mask_override=None), TypeError, "mask_override must be a dict"),
        (dict(span=torch.tensor([0.0])), TypeError, "span"),
    ],
)
def test_bad_context_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        ValueDeltaContext(**kwargs)


def test_a_delta_without_a_span_is_an_error_not_ignored():
    model = tiny_llama()
    context = ValueDeltaContext(delta_v={_last_layer(model): torch.zeros(1, 2, 2, 8)})
    with vreason_attention(model, context), torch.no_grad(), pytest.raises(ValueError, match="span is None"):
        model(torch.tensor([[3, 4, 5]]))
    _assert_restored(model)
