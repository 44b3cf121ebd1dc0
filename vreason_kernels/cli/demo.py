"""``vreason demo``: the shipped SmolLM2 answers a few questions with plain decoding and with
V-Reason; a table of the questions and full answers, and a PNG of the entropy curves."""

import re
import sys
import textwrap
import time
from pathlib import Path

from vreason_kernels.cli.console import TokenBar, silenced_stderr, third_party_quiet
from vreason_kernels.cli.generate import chat_inputs, ema_peak
from vreason_kernels.engine.config import VReasonConfig

# (question, known answer): an answer is right when its last number is the known one.
DEMO_QUESTIONS = (
    ("A farmer has 17 sheep. All but 9 run away. How many sheep are left?", "9"),
    ("What is 12 * 13? Think step by step.", "156"),
    ("If a train travels 60 km in 45 minutes, what is its speed in km/h?", "80"),
)
MODES = {"base": VReasonConfig(enabled=False), "v-reason": VReasonConfig()}
WIDTH = 100


def last_number(text: str):
    """The last number in ``text`` (thousands separators dropped), as written, or None."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", text.replace(",", ""))
    return numbers[-1] if numbers else None


def is_right(answer: str, known: str) -> bool:
    number = last_number(answer)
    return number is not None and float(number) == float(known)


def demo_command(args) -> int:
    import vreason_kernels.loading as loading
    from vreason_kernels.engine import generate

    questions = DEMO_QUESTIONS[: args.questions]
    print("loading the shipped SmolLM2-135M-Instruct ...", file=sys.stderr, flush=True)
    with third_party_quiet(args.verbose):
        with silenced_stderr(args.verbose):
            model, tok = loading.load_causal_lm(loading.shipped_smollm2_path())
        runs = []
        start = time.perf_counter()
        for i, (question, known) in enumerate(questions, 1):
            ids = chat_inputs(tok, question)["input_ids"]
            outs = {}
            for name, config in MODES.items():
                with TokenBar(args.max_new_tokens, f"question {i}/{len(questions)}, {name}") as bar:
                    outs[name] = generate(model, ids, config=config, max_new_tokens=args.max_new_tokens, progress=bar)
            answers = {name: tok.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True).strip()
                       for name, out in outs.items()}
            runs.append((question, known, outs, answers))
        seconds = time.perf_counter() - start
    print(_table(runs))
    print(f"\ndecoding took {seconds:.1f} s ({2 * len(runs)} runs, after the model load)")
    plot = _plot(runs, Path(args.plot))
    print(f"\nentropy plot saved to {plot.resolve()}")
    return 0


def _table(runs) -> str:
    lines = [
        "base     = VReasonConfig(enabled=False): plain decoding through the same loop (the baseline)",
        f"v-reason = {MODES['v-reason']}",
        "right: the answer's last number is the known answer",
    ]
    header = f"    {'mode':<9} {'tokens':>6} {'EMA peak':>9} {'ms/token':>9} {'overhead':>9}  right"
    indent = " " * 6
    score = dict.fromkeys(MODES, 0)
    for i, (question, known, outs, answers) in enumerate(runs, 1):
        lines += ["", textwrap.fill(f"Q{i}. {question} (known answer: {known})", WIDTH, subsequent_indent="    "),
                  header]
        base_tpt = outs["base"].stats["time_per_token_s"]
        for name, out in outs.items():
            right = is_right(answers[name], known)
            score[name] += right
            tpt = out.stats["time_per_token_s"]
            lines.append(f"    {name:<9} {out.stats['tokens']:>6} {ema_peak(out):>9.3f} {1e3 * tpt:>9.1f} "
                         f"{tpt / base_tpt:>8.2f}x  {'yes' if right else 'no'}")
            lines.append(textwrap.fill(" ".join(answers[name].split()) or "(empty)", WIDTH,
                                       initial_indent=indent, subsequent_indent=indent))
    lines += ["", "right: " + ", ".join(f"{name} {score[name]}/{len(runs)}" for name in MODES)]
    return "\n".join(lines)


def _plot(runs, plot: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3 * len(runs)), squeeze=False)
    for ax, (question, _, outs, _) in zip(axes[:, 0], runs):
        for (name, out), color in zip(outs.items(), ("tab:blue", "tab:red")):
            steps = range(1, out.entropy.shape[1] + 1)
            ax.plot(steps, out.entropy[0].numpy(), color=color, alpha=0.3, lw=1, label=f"{name} H_k")
            ax.plot(steps, out.entropy_ema[0].numpy(), color=color, lw=2, label=f"{name} EMA")
        ax.set_title(question[:80], fontsize=9)
        ax.set_xlabel("generated token")
        ax.set_ylabel("entropy (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    plt.close(fig)
    return plot
