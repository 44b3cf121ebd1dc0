"""Per-token latency and peak memory: vk.generate vs vk.reference.generate vs plain decoding.

CPU (``--device cpu``, the default without CUDA): SmolLM2-135M-Instruct (the shipped GGUF,
fp32), one prompt, medians over ``--repeats`` runs; peak memory is the RSS high-water mark
above the RSS before each mode's runs.
CUDA (``--device cuda``): a random-weight Qwen2.5-VL-7B-shaped text model in bf16 with a
video span of ``--span`` tokens (2k-8k) placed in the prompt; peak memory from
``torch.cuda.max_memory_allocated`` (the engine's own ``stats["peak_memory_bytes"]``).

Plain decoding is ``vk.generate`` with ``VReasonConfig(enabled=False)``: the same loop with
the controller off. Per-token time is the engine's ``stats["time_per_token_s"]`` (decode
forwards after the prefill).

    python benchmarks/bench_generate.py [--device cuda --span 4096] [--quick] [--out FILE]

The record (benchmarks/harness.py) goes to ``--out``, by default
``benchmarks/results/generate_<device>[_quick].json``.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

import vreason_kernels as vk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

PROMPT = "A train travels 60 km in 45 minutes. What is its speed in km/h? Think step by step."


def cpu_setup():
    model, tok = harness.load_smollm2()
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return model, ids, None


def gpu_setup(span_len: int, dtype):
    """Qwen2.5-VL-7B text shapes (docs/design.md §6), random weights; the 'video' is a
    block of span_len prompt positions given as the span."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(dtype).eval().requires_grad_(False)
    ids = torch.randint(0, 150000, (1, span_len + 64), device="cuda")
    return model, ids, torch.arange(16, 16 + span_len, device="cuda")


def measure(fn, repeats, device):
    memory = harness.PeakMemory(device).start()
    outs = [fn() for _ in range(repeats)]
    rss_peak = memory.stop()
    tpt = statistics.median(o.stats["time_per_token_s"] for o in outs)
    engine_peak = max((o.stats["peak_memory_bytes"] or 0) for o in outs) or None
    return tpt, (engine_peak if device == "cuda" else rss_peak), outs[-1].stats["tokens"]


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    harness.add_common_args(parser, dtypes=("float32", "bfloat16"), default_dtype=harness.DEVICE_DTYPES,
                            quick_help="8 new tokens, 2 repeats")
    parser.add_argument("--span", type=int, default=2048, help="video span length of the CUDA model (default 2048)")
    parser.add_argument("--new", type=int, default=32, help="new tokens per run (default 32)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, median taken (default 3)")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    device, dtype = harness.resolve_device_and_dtype(args)
    if args.quick:
        args.new, args.repeats = min(args.new, 8), min(args.repeats, 2)
    if device == "cuda":
        model, ids, span = gpu_setup(args.span, getattr(torch, dtype))
        title = f"generate latency (CUDA, Qwen2.5-VL-7B-shaped {dtype}, span {args.span})"
    else:
        model, ids, span = cpu_setup()
        model = model.to(getattr(torch, dtype))
        title = f"generate latency (CPU, SmolLM2-135M-Instruct, {dtype})"
    run = harness.Run("generate", title, args, device, argv=None if argv is None else [__file__, *argv])
    config = vk.VReasonConfig()
    common = dict(max_new_tokens=args.new, eos_token_id=[], span=span)
    cases = {
        "plain (enabled=False)": lambda: vk.generate(model, ids, config=vk.VReasonConfig(enabled=False), **common),
        "vk.generate (fused)": lambda: vk.generate(model, ids, config=config, **common),
        "vk.reference.generate (naive)": lambda: vk.reference.generate(model, ids, config=config, **common),
    }
    results = {name: measure(fn, args.repeats, device) for name, fn in cases.items()}
    plain = results["plain (enabled=False)"][0]
    for name, (tpt, mem, tokens) in results.items():
        run.rows.append({"mode": name, "ms_per_token": 1e3 * tpt, "vs_plain": tpt / plain,
                         "peak_memory_mb": harness.mib(mem), "tokens": tokens})
    run.notes += [
        f"prompt {ids.shape[1]} tokens, {args.new} new tokens (EOS ignored), median of {args.repeats} runs",
        f"config {config}",
        "peak_memory_mb: " + ("torch.cuda.max_memory_allocated during the runs (engine stats)" if device == "cuda"
                              else "RSS high-water mark above the RSS before the mode's runs"),
    ]
    run.write(args.out or harness.RESULTS / f"generate_{device}{'_quick' if args.quick else ''}.json")


if __name__ == "__main__":
    main()
