"""How the entropy switch starts: ``VReasonConfig.ema_init`` "first" vs "zero" (docs/design.md §10.4).

Every question of benchmarks/prompts/reasoning.jsonl and reasoning_extra.jsonl (108 in all,
short numeric answers, checked as "the expected number is the last number of the answer")
is answered greedily by SmolLM2-135M-Instruct (shipped), in left-padded batches, by plain
decoding and by V-Reason with each EMA start over an lr grid. Per config: accuracy, mean
output tokens, mean position (1-based token index) and height of the EMA's peak, the share
of tokens decoded with α = +1, and exact McNemar tests (two-sided binomial on the
discordant questions) against the base model and between the two starts at equal lr.

    OMP_NUM_THREADS=1 python benchmarks/ema_init.py [--questions N] [--max-new-tokens N] [--batch N] [--quick]

(one thread: on a shared 2-core machine two OpenMP threads fighting for a core made every
forward 10-40x slower). ``--quick`` runs one learning rate (5e-2, the default) instead of
the grid ``LRS``; a smoke run: ``--quick --questions 4 --max-new-tokens 8 --batch 4``.

The record (benchmarks/harness.py) goes to ``--out``, by default
``benchmarks/results/ema_init[_quick].json``; ``benchmarks/results/ema_init.md`` is the
annotated table the default was chosen from.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
import harness  # noqa: E402
from tune_defaults import last_number  # noqa: E402

PROMPTS = ("reasoning.jsonl", "reasoning_extra.jsonl")
LRS = (1e-2, 5e-2, 2e-1)
INITS = ("first", "zero")


def load_questions(limit: int) -> list:
    items = [json.loads(line) for name in PROMPTS for line in open(ROOT / "prompts" / name)]
    return items[:limit]


def answer_batches(model, tok, questions, config, max_new_tokens, batch):
    """Per question: (correct, tokens, EMA peak position, EMA peak height, share of α=+1)."""
    import vreason_kernels as vk

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


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, dtypes=("float32",), quick_help="one learning rate (5e-2) instead of LRS")
    parser.add_argument("--questions", type=int, default=108)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--batch", type=int, default=27)
    return parser


def main(argv=None):
    import vreason_kernels as vk

    args = build_parser().parse_args(argv)
    device = harness.resolve_device(args.device)
    harness.resolve_dtype(args, "float32")
    questions = load_questions(args.questions)
    model, tok = harness.load_smollm2()
    model = model.to(device)
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    run = harness.Run("ema_init", "How the switch starts: ema_init on SmolLM2-135M-Instruct", args, device,
                      argv=None if argv is None else [__file__, *argv])
    # The base model traces its EMA as "first" did when the table was made (tokens do not depend on it).
    configs = {"base": vk.VReasonConfig(enabled=False, ema_init="first")}
    for lr in (5e-2,) if args.quick else LRS:
        for init in INITS:
            configs[f"{init}, lr={lr:g}"] = vk.VReasonConfig(lr=lr, ema_init=init)
    results, seconds = {}, {}
    for name, config in configs.items():
        start = time.perf_counter()
        results[name] = answer_batches(model, tok, questions, config, args.max_new_tokens, args.batch)
        seconds[name] = time.perf_counter() - start
        print(name, summary(results[name]), f"{seconds[name]:.0f}s", flush=True)

    correct = {name: [r["correct"] for r in rows] for name, rows in results.items()}
    for name, rows in results.items():
        s = summary(rows)
        vs_base = vs_init = None
        if name != "base":
            p, a, b = mcnemar_exact(correct[name], correct["base"])
            vs_base = f"{p:.2f} ({a}/{b})"
            init, lr = name.split(", ")
            other = f"{INITS[1 - INITS.index(init)]}, {lr}"
            p, a, b = mcnemar_exact(correct[name], correct[other])
            vs_init = f"{p:.2f} ({a}/{b})"
        run.rows.append({
            "config": name, "accuracy": f"{s['acc']:.3f} ({sum(correct[name])}/{len(rows)})",
            "mean_tokens": s["tokens"], "ema_peak_position": s["peak_pos"], "ema_peak_height": s["peak"],
            "explore": s["explore"], "p_vs_base": vs_base, "p_vs_other_init": vs_init, "wall_s": seconds[name],
        })
    run.notes += [
        f"{len(questions)} questions ({' + '.join(PROMPTS)}), greedy, max_new_tokens={args.max_new_tokens}, "
        f"left-padded batches of {args.batch}; V-Reason: Adam, steps=1, every=1, ema_beta=0.9, span = prompt",
        "base: plain decoding (enabled=False); its EMA columns are traced with ema_init='first' "
        "(its tokens do not depend on it)",
        "ema_peak_position: 1-based index of the new token where the EMA is highest; explore: share of tokens "
        "with alpha = +1; p: exact McNemar (two-sided) on accuracy, with the discordant counts "
        "(this-only / other-only)",
    ]
    run.write(args.out or harness.RESULTS / f"ema_init{'_quick' if args.quick else ''}.json")


if __name__ == "__main__":
    main()
