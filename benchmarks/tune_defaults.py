"""Measure V-Reason hyper-parameters on SmolLM2-135M-Instruct (CPU) instead of guessing them.

For each config of a small grid (lr x steps x every x ema_beta) and for plain decoding,
every question of benchmarks/prompts/reasoning.jsonl is answered greedily; we report mean
output tokens, mean EMA-entropy peak, accuracy (the expected number appears as the last
number of the answer) and time per token.

    python benchmarks/tune_defaults.py [--questions N] [--max-new-tokens N] [--quick]

Without ``--quick`` the grid is the product ``GRID``; ``--quick`` runs the 7-config grid
``QUICK`` (the one behind benchmarks/results/tune_defaults.md). A smoke run:
``--quick --questions 2 --max-new-tokens 8``. Budget: ~2 s/question/config at 64 tokens on
2 free cores.

The record (benchmarks/harness.py) goes to ``--out``, by default
``benchmarks/results/tune_defaults[_quick].json``; ``benchmarks/results/tune_defaults.md``
is the annotated table the defaults were chosen from (docs/design.md §1).
"""

import argparse
import itertools
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402

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
    import vreason_kernels as vk

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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, dtypes=("float32",), quick_help="the 7-config grid QUICK instead of GRID")
    parser.add_argument("--questions", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    return parser


def main(argv=None):
    import vreason_kernels as vk

    args = build_parser().parse_args(argv)
    device = harness.resolve_device(args.device)
    harness.resolve_dtype(args, "float32")
    questions = [json.loads(line) for line in open(ROOT / "prompts" / "reasoning.jsonl")][: args.questions]
    model, tok = harness.load_smollm2()
    model = model.to(device)
    grid = QUICK if args.quick else [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]
    run_ = harness.Run("tune_defaults", "V-Reason defaults on SmolLM2-135M-Instruct", args, device,
                       argv=None if argv is None else [__file__, *argv])
    rows = [("base", run(model, tok, questions, vk.VReasonConfig(enabled=False), args.max_new_tokens))]
    print(rows[-1], flush=True)
    for params in grid:
        start = time.perf_counter()
        rows.append((params, run(model, tok, questions, vk.VReasonConfig(**params), args.max_new_tokens)))
        print(params, rows[-1][1], f"{time.perf_counter() - start:.0f}s", flush=True)
    base = rows[0][1]
    for params, r in rows:
        name = params if isinstance(params, str) else ", ".join(f"{k}={v}" for k, v in params.items())
        run_.rows.append({"config": name, "mean_tokens": r["tokens"], "mean_ema_peak": r["peak"],
                          "accuracy": r["acc"], "ms_per_token": r["ms"], "overhead": r["ms"] / base["ms"]})
    run_.notes += [
        f"{len(questions)} questions from benchmarks/prompts/reasoning.jsonl, greedy, "
        f"max_new_tokens={args.max_new_tokens}",
        "accuracy: the expected number is the last number in the answer; ms_per_token: median per question",
    ]
    run_.write(args.out or harness.RESULTS / f"tune_defaults{'_quick' if args.quick else ''}.json")


if __name__ == "__main__":
    main()
