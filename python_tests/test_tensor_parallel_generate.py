"""``vk.generate`` on transformers tensor-parallel models (``tp_plan="auto"``), 2 gloo ranks on CPU.

A tiny Llama and a tiny Qwen2.5-VL (with a video) are saved to a temporary folder; each
rank loads them twice, whole and with ``tp_plan="auto"`` (LM head "colwise_gather_output":
the vocabulary is sharded; q/k/v "colwise": each rank holds one of the 2 kv heads, hence
its half of ΔV; o_proj/down_proj "rowwise": an all-reduce). The sharded run must give the
whole model's tokens and traces (within rounding) with V-Reason off and on (two optimizer
steps: the first from the token's own graph, the second a layer re-run; Llama also sampled). It also checks that
the update's gradient crosses the TP collectives: ΔV must move, per rank, exactly as the
whole run's corresponding half.
"""

import os

import pytest
import torch

from python_tests.distributed_utils import run_ranks

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

NEW = 8
TRACES = ("entropy", "entropy_ema", "alpha", "delta_norm")


def _runs(model, inputs, kind):
    """V-Reason off, on with 2 optimizer steps (the first from the token's own graph, the
    second a layer re-run), and (Llama) on with sampling."""
    import vreason_kernels as vk

    settings = {
        "off": dict(config=vk.VReasonConfig(enabled=False)),
        "on-2-steps": dict(config=vk.VReasonConfig(lr=0.05, steps=2)),
    }
    if kind == "llama":
        settings["on-sampled"] = dict(config=vk.VReasonConfig(lr=0.05), do_sample=True, temperature=0.9, min_p=0.02)
    out = {}
    for name, kw in settings.items():
        generator = torch.Generator().manual_seed(3) if kw.get("do_sample") else None
        out[name] = vk.generate(model, **inputs, max_new_tokens=NEW, generator=generator, **kw)
    return out


def _compare(tag, sharded, whole):
    for name in sharded:
        got, want = sharded[name], whole[name]
        assert torch.equal(got.sequences, want.sequences), f"{tag}/{name}: tokens differ"
        for trace in TRACES:
            torch.testing.assert_close(getattr(got, trace), getattr(want, trace), atol=1e-5, rtol=1e-4,
                                       equal_nan=True, msg=f"{tag}/{name}: {trace} differs")
        if name != "off":
            assert got.stats["updates"] == want.stats["updates"] > 0
            assert (got.delta_norm.nan_to_num() > 0).any(), f"{tag}/{name}: ΔV never moved"


def _delta_moves_like_whole(model_tp, model, inputs):
    """One V-Reason update by hand: each rank's ΔV gradient equals its heads' slice of the whole one."""
    from vreason_kernels.engine.controller import kl_to_uniform_loss
    from vreason_kernels.engine.model_parts import model_parts
    from vreason_kernels.engine.hf_cache import cache_kwargs, output_cache
    from vreason_kernels.integrations.transformers import ValueDeltaContext, vreason_attention

    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    grads = []
    for m in (model, model_tp):
        parts = model_parts(m)
        with torch.no_grad():
            out = parts.base(**inputs, use_cache=True)
        cache = output_cache(out)
        values = cache.layers[-1].values
        span = torch.arange(values.shape[2])
        delta = torch.full((values.shape[0], values.shape[1], span.numel(), values.shape[3]), 0.01, requires_grad=True)
        context = ValueDeltaContext(layers=(len(parts.layers) - 1,), span=span)
        context.delta_v[len(parts.layers) - 1] = delta
        token = torch.tensor([[5]])
        mask = torch.ones(1, inputs["input_ids"].shape[1] + 1, dtype=torch.long)
        with vreason_attention(m, context):
            hidden = parts.base(input_ids=token, attention_mask=mask, use_cache=True,
                                **cache_kwargs(parts.base, cache)).last_hidden_state[:, -1]
        loss = kl_to_uniform_loss(parts.entropy(hidden), torch.ones(1), parts.vocab_size)
        loss.backward()
        grads.append(delta.grad)
    whole, local = grads
    heads = whole.shape[1] // world
    assert local.shape[1] == heads
    torch.testing.assert_close(local, whole[:, rank * heads:(rank + 1) * heads], atol=1e-6, rtol=1e-4)
    assert whole.abs().max() > 0


def _checks(rank, world, out_dir, folders):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from python_tests.tiny_models import synthetic_video_inputs

    results = {}
    for kind, folder in folders.items():
        loader = AutoModelForImageTextToText if kind == "qwen2_5_vl" else AutoModelForCausalLM
        whole = loader.from_pretrained(folder, dtype=torch.float32).eval().requires_grad_(False)
        sharded = loader.from_pretrained(folder, dtype=torch.float32, tp_plan="auto").eval().requires_grad_(False)
        _assert_sharded(sharded, kind)
        if kind == "qwen2_5_vl":
            inputs = synthetic_video_inputs(whole)
        else:
            inputs = dict(input_ids=torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(1)))
        if kind == "llama":
            _delta_moves_like_whole(sharded, whole, inputs)
        tp_runs, whole_runs = _runs(sharded, inputs, kind), _runs(whole, inputs, kind)
        _compare(kind, tp_runs, whole_runs)
        results[kind] = {name: (o.sequences, o.entropy) for name, o in tp_runs.items()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))


def _assert_sharded(model, kind):
    """The controlled layer is really split; so is the head, except where transformers' plan
    replicates it (5.17's Qwen2.5-VL plan has no lm_head entry: ΔV's group then comes
    from the layer alone, which this run checks)."""
    import transformers
    from packaging.version import Version
    from torch.distributed.tensor import DTensor

    from vreason_kernels.engine.model_parts import model_parts

    parts = model_parts(model)
    assert parts.kv_process_group(len(parts.layers) - 1) is not None, f"{kind}: the last layer is not sharded"
    if kind == "llama" or Version(transformers.__version__) >= Version("5.24"):
        assert isinstance(model.lm_head.weight, DTensor) and parts.process_group is not None, f"{kind}: head not sharded"
        assert parts.head_weight.shape[0] < parts.vocab_size


def _vocab_rows() -> int:
    """An odd vocabulary (uneven shards, 106 + 105 rows) where transformers takes one: 5.17,
    the GPU image's, refuses a "colwise_gather_output" head whose rows the TP size does not
    divide (5.24 accepts it), so there the vocabulary is one row longer."""
    import transformers
    from packaging.version import Version

    from python_tests.tiny_models import TINY_VOCAB

    return TINY_VOCAB if Version(transformers.__version__) >= Version("5.24") else TINY_VOCAB + 1


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    from python_tests.tiny_models import tiny_llama, tiny_qwen2_5_vl

    root = tmp_path_factory.mktemp("tp_models")
    folders = {}
    for kind, build in (("llama", tiny_llama), ("qwen2_5_vl", tiny_qwen2_5_vl)):
        folders[kind] = str(root / kind)
        build(vocab_size=_vocab_rows()).save_pretrained(folders[kind])
    return folders


def test_generate_on_tensor_parallel_models_matches_single_process(saved_models, tmp_path):
    out_dir = run_ranks(_checks, 2, tmp_path, saved_models)
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt")) for r in range(2)]
    for kind, runs in ranks[0].items():
        for name, (tokens, entropy) in runs.items():
            assert torch.equal(tokens, ranks[1][kind][name][0]), f"{kind}/{name}: ranks chose different tokens"
            assert torch.equal(entropy, ranks[1][kind][name][1]), f"{kind}/{name}: ranks' entropies differ"
