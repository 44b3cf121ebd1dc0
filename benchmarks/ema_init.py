"""How the entropy switch starts: ``VReasonConfig.ema_init`` "first" vs "zero" (issue 11 §4).

Every question of benchmarks/prompts/reasoning.jsonl and reasoning_extra.jsonl (108 in all,
short numeric answers, checked as "the expected number is the last number of the answer")
is answered greedily by SmolLM2-135M-Instruct (shipped), in left-padded batches, by plain
decoding and by V-Reason with each EMA start over an lr grid. Per config: accuracy, mean
output tokens, mean position (1-based token index) and height of the EMA's peak, the share
of tokens decoded with α = +1, and exact McNemar tests (two-sided binomial on the
discordant questions) against the base model and between the two starts at equal lr.

    OMP_NUM_THREADS=1 python benchmarks/ema_init.py [--questions N] [--max-new-tokens N] [--batch N]

(one thread: on a shared 2-core machine two OpenMP threads fighting for a core made every
forward 10-40x slower).

Results: benchmarks/results/ema_init.md.
"""

import argparse
import datetime
import json
import math
import platform
import time
from pathlib import Path

import torch
import transformers

import vreason_kernels as vk
from vreason_kernels.models import load_causal_lm, shipped_smollm2_path

from tune_defaults import last_number

ROOT = Path(__file__).resolve().parent
PROMPTS = ("reasoning.jsonl", "reasoning_extra.jsonl")
LRS = (1e-2, 5e-2, 2e-1)
INITS = ("first", "zero")


def load_questions(limit: int) -> list:
    items = [json.loads(line) for name in PROMPTS for line in open(ROOT / "prompts" / name)]
    return items[:limit]


def answer_batches(model, tok, questions, config, max_new_tokens, batch):
    """Per question: (correct, tokens, EMA peak position, EMA peak height, share of α=+1)."""
    rows = []
    for start in range(0, len(questions), batch):
        chunk = questions[start : start + batch]
        texts = [
            tok.apply_chat_template([{"role": "user", "content": q["question"]}], add_generation_prompt=True,
                                    tokenize=False)
            for q in chunk
        ]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        out = vk.generate(model, enc["input_ids"], attention_mask=enc["attention_mask"], config=config,
                          max_new_tokens=max_new_tokens)
        new = out.sequences[:, enc["input_ids"].shape[1]:]
        for i, q in enumerate(chunk):
            alive = ~out.entropy[i].isnan()
            n = int(alive.sum())
            ema = out.entropy_ema[i, :n]
            answer = tok.decode(new[i, :n], skip_special_tokens=True)
            rows.append(dict(
                correct=last_number(answer) == q["answer"], tokens=n, peak_pos=int(ema.argmax()) + 1,
                peak=float(ema.max()), explore=float((out.alpha[i, :n] > 0).float().mean()),
            ))
    return rows


def mcnemar_exact(a: list, b: list):
    """Two-sided exact McNemar p-value for paired booleans, with the discordant counts."""
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    n = only_a + only_b
    if n == 0:
        return 1.0, only_a, only_b
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail), only_a, only_b


def summary(rows):
    n = len(rows)
    mean = lambda key: sum(r[key] for r in rows) / n  # noqa: E731
    return dict(acc=mean("correct"), tokens=mean("tokens"), peak_pos=mean("peak_pos"), peak=mean("peak"),
                explore=mean("explore"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--questions", type=int, default=108)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=27)
    parser.add_argument("--out", default=str(ROOT / "results" / "ema_init.md"))
    args = parser.parse_args()
    questions = load_questions(args.questions)
    model, tok = load_causal_lm(shipped_smollm2_path())
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # The base model traces its EMA as "first" did when the table was made (tokens do not depend on it).
    configs = {"base": vk.VReasonConfig(enabled=False, ema_init="first")}
    for lr in LRS:
        for init in INITS:
            configs[f"{init}, lr={lr:g}"] = vk.VReasonConfig(lr=lr, ema_init=init)
    results, seconds = {}, {}
    for name, config in configs.items():
        start = time.perf_counter()
        results[name] = answer_batches(model, tok, questions, config, args.max_new_tokens, args.batch)
        seconds[name] = time.perf_counter() - start
        print(name, summary(results[name]), f"{seconds[name]:.0f}s", flush=True)

    correct = {name: [r["correct"] for r in rows] for name, rows in results.items()}
    lines = [
        "# How the switch starts: ema_init on SmolLM2-135M-Instruct", "",
        f"- date: {datetime.date.today()}, device: CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, shared with other jobs), torch {torch.__version__}, "
        f"transformers {transformers.__version__}",
        f"- {len(questions)} questions ({' + '.join(PROMPTS)}), greedy, max_new_tokens={args.max_new_tokens}, "
        f"left-padded batches of {args.batch}; V-Reason: Adam, steps=1, every=1, ema_beta=0.9, span = prompt",
        "- command: `python benchmarks/ema_init.py "
        f"--questions {args.questions} --max-new-tokens {args.max_new_tokens} --batch {args.batch}`",
        "- peak position: 1-based index of the new token where the EMA is highest; explore: share of tokens "
        "with α = +1; p: exact McNemar (two-sided) on accuracy, with the discordant counts (this-only / other-only)",
        "",
        "| config | accuracy | mean tokens | EMA peak position | EMA peak height | explore | p vs base | "
        "p vs other init (same lr) | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, rows in results.items():
        s = summary(rows)
        vs_base = vs_init = "-"
        if name != "base":
            p, a, b = mcnemar_exact(correct[name], correct["base"])
            vs_base = f"{p:.2f} ({a}/{b})"
            init, lr = name.split(", ")
            other = f"{INITS[1 - INITS.index(init)]}, {lr}"
            p, a, b = mcnemar_exact(correct[name], correct[other])
            vs_init = f"{p:.2f} ({a}/{b})"
        lines.append(
            f"| {name} | {s['acc']:.3f} ({sum(correct[name])}/{len(rows)}) | {s['tokens']:.1f} | "
            f"{s['peak_pos']:.1f} | {s['peak']:.3f} | {s['explore']:.2f} | {vs_base} | {vs_init} | "
            f"{seconds[name]:.0f} |"
        )
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
