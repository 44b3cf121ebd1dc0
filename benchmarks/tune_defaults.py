"""Measure V-Reason hyper-parameters on SmolLM2-135M-Instruct (CPU) instead of guessing them.

For each config of a small grid (lr x steps x every x ema_beta) and for plain decoding,
every question of benchmarks/prompts/reasoning.jsonl is answered greedily; we report mean
output tokens, mean EMA-entropy peak, accuracy (the expected number appears as the last
number of the answer) and time per token. Results: benchmarks/results/tune_defaults.md.

    python benchmarks/tune_defaults.py [--questions N] [--max-new-tokens N] [--quick]

Budget: ~2 s/question/config at 64 tokens on 2 free cores; --quick runs the 7-config grid QUICK.
"""

import argparse
import datetime
import itertools
import json
import platform
import re
import time
from pathlib import Path

import torch
import transformers

import vreason_kernels as vk
from vreason_kernels.models import load_causal_lm, shipped_smollm2_path

ROOT = Path(__file__).resolve().parent
GRID = dict(lr=(1e-3, 1e-2, 5e-2), steps=(1, 2), every=(1, 4), ema_beta=(0.9,))
# The grid actually run for the README (~20 min on 2 free cores at 128 tokens): lr over two
# decades at the cheapest schedule, then steps/every and the EMA's beta around lr=1e-2.
QUICK = [dict(lr=lr, steps=1, every=1, ema_beta=0.9) for lr in (1e-3, 1e-2, 5e-2, 1e-1)] + [
    dict(lr=1e-2, steps=2, every=1, ema_beta=0.9),
    dict(lr=1e-2, steps=2, every=4, ema_beta=0.9),
    dict(lr=1e-2, steps=1, every=1, ema_beta=0.7),
]


def last_number(text: str):
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return numbers[-1] if numbers else None


def run(model, tok, questions, config, max_new_tokens):
    tokens, peaks, correct, tpt = [], [], 0, []
    for item in questions:
        ids = tok.apply_chat_template([{"role": "user", "content": item["question"]}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
        out = vk.generate(model, ids, config=config, max_new_tokens=max_new_tokens)
        answer = tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        correct += last_number(answer) == item["answer"]
        tokens.append(out.stats["tokens"])
        peaks.append(float(out.entropy_ema.nan_to_num(float("-inf")).max()))
        tpt.append(out.stats["time_per_token_s"])
    n = len(questions)
    return dict(tokens=sum(tokens) / n, peak=sum(peaks) / n, acc=correct / n, ms=1e3 * sorted(tpt)[n // 2])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "results" / "tune_defaults.md"))
    args = parser.parse_args()
    questions = [json.loads(line) for line in open(ROOT / "prompts" / "reasoning.jsonl")][: args.questions]
    model, tok = load_causal_lm(shipped_smollm2_path())
    grid = QUICK if args.quick else [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    rows = [("base", run(model, tok, questions, None, args.max_new_tokens))]
    print(rows[-1], flush=True)
    for params in grid:
        start = time.perf_counter()
        rows.append((params, run(model, tok, questions, vk.VReasonConfig(**params), args.max_new_tokens)))
        print(params, rows[-1][1], f"{time.perf_counter() - start:.0f}s", flush=True)
    base = rows[0][1]
    lines = [
        "# V-Reason defaults on SmolLM2-135M-Instruct", "",
        f"- date: {datetime.date.today()}, device: CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, shared), torch {torch.__version__}, transformers {transformers.__version__}",
        f"- {len(questions)} questions from benchmarks/prompts/reasoning.jsonl, greedy, max_new_tokens={args.max_new_tokens}",
        "- accuracy: the expected number is the last number in the answer; ms/token: median per question", "",
        "| config | mean tokens | mean EMA peak | accuracy | ms/token | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for params, r in rows:
        name = params if isinstance(params, str) else ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"| {name} | {r['tokens']:.1f} | {r['peak']:.3f} | {r['acc']:.2f} | {r['ms']:.1f} | "
                     f"{r['ms'] / base['ms']:.2f}x |")
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
