"""Per-token latency and peak memory: vk.generate vs vk.reference.generate vs plain decoding.

CPU mode (default): SmolLM2-135M-Instruct, one prompt, medians over --repeats runs.
GPU mode (--gpu): a random-weight Qwen2.5-VL-7B-shaped text model in bf16 with a video span
of --span tokens (2k-8k) placed in the prompt; peak memory from torch.cuda.
Results to benchmarks/results/generate_{cpu,gpu}.md.
"""

import argparse
import datetime
import os
import statistics
from pathlib import Path

import torch
import transformers

import vreason_kernels as vk

ROOT = Path(__file__).resolve().parent
PROMPT = "A train travels 60 km in 45 minutes. What is its speed in km/h? Think step by step."


def cpu_setup():
    from vreason_kernels.models import load_causal_lm, shipped_smollm2_path

    model, tok = load_causal_lm(shipped_smollm2_path())
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    return model, ids, None


def gpu_setup(span_len: int):
    """Qwen2.5-VL-7B text shapes (DESIGN.md §6), random bf16 weights; the 'video' is a
    block of span_len prompt positions given as the span."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=32768)
    with torch.device("cuda"):
        model = Qwen2ForCausalLM(config).to(torch.bfloat16).eval().requires_grad_(False)
    ids = torch.randint(0, 150000, (1, span_len + 64), device="cuda")
    return model, ids, torch.arange(16, 16 + span_len, device="cuda")


def measure(fn, repeats):
    outs = [fn() for _ in range(repeats)]
    tpt = statistics.median(o.stats["time_per_token_s"] for o in outs)
    mem = max((o.stats["peak_memory_bytes"] or 0) for o in outs) or None
    return tpt, mem, outs[-1].stats["tokens"]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--span", type=int, default=2048)
    parser.add_argument("--new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model, ids, span = gpu_setup(args.span) if args.gpu else cpu_setup()
    config = vk.VReasonConfig()
    common = dict(max_new_tokens=args.new, eos_token_id=[], span=span)
    cases = {
        "plain (enabled=False)": lambda: vk.generate(model, ids, **common),
        "vk.generate (fused)": lambda: vk.generate(model, ids, config=config, **common),
        "vk.reference.generate (naive)": lambda: vk.reference.generate(model, ids, config=config, **common),
    }
    load_before = os.getloadavg()[0]
    results = {name: measure(fn, args.repeats) for name, fn in cases.items()}
    plain = results["plain (enabled=False)"][0]
    device = torch.cuda.get_device_name() if args.gpu else (
        f"CPU, {torch.get_num_threads()} threads, 1-minute load average {load_before:.1f} before / "
        f"{os.getloadavg()[0]:.1f} after (includes this run's own threads)"
    )
    lines = [
        f"# generate latency ({'GPU, Qwen2.5-VL-7B-shaped bf16, span ' + str(args.span) if args.gpu else 'CPU, SmolLM2-135M'})",
        "", f"- date {datetime.date.today()}, {device}, torch {torch.__version__}, transformers {transformers.__version__}",
        f"- prompt {ids.shape[1]} tokens, {args.new} new tokens, median of {args.repeats} runs, config {config}", "",
        "| mode | ms/token | vs plain | peak memory |", "|---|---|---|---|",
    ]
    for name, (tpt, mem, _) in results.items():
        mem_s = f"{mem / 2**30:.2f} GiB" if mem else "n/a (CPU)"
        lines.append(f"| {name} | {1e3 * tpt:.1f} | {tpt / plain:.2f}x | {mem_s} |")
    out = ROOT / "results" / f"generate_{'gpu' if args.gpu else 'cpu'}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
