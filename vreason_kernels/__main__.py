"""Command line: ``python -m vreason_kernels {demo,generate}`` (also the ``vreason`` script).

- ``demo``: the shipped SmolLM2-135M-Instruct answers a few questions with plain and with
  V-Reason decoding; prints a summary table and saves a PNG of the entropy and EMA curves
  (as in the paper's Figure 2) to ``--plot`` (default ``./vreason_demo.png``).
- ``generate``: any local HF checkpoint folder or ``.gguf`` file; ``--video`` goes through
  the model's own processor (Qwen2.5-VL).
"""

import argparse
import sys
from pathlib import Path

DEMO_QUESTIONS = (
    "A farmer has 17 sheep. All but 9 run away. How many sheep are left?",
    "What is 12 * 13? Think step by step.",
    "If a train travels 60 km in 45 minutes, what is its speed in km/h?",
)
DEFAULT_PLOT = "vreason_demo.png"


def _chat_ids(tok, prompt: str, **extra):
    messages = [{"role": "user", "content": prompt}]
    return tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True, **extra)


def _config(args):
    import vreason_kernels as vk

    return vk.VReasonConfig(keep_ratio=0.5 if getattr(args, "lite", False) else 1.0)


def demo(args) -> int:
    if not 1 <= args.questions <= len(DEMO_QUESTIONS):
        raise ValueError(f"--questions must be in [1, {len(DEMO_QUESTIONS)}], got {args.questions}")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch
    from tqdm import tqdm

    import vreason_kernels as vk
    from vreason_kernels.models import load_causal_lm, shipped_smollm2_path

    torch.set_num_threads(max(1, torch.get_num_threads()))
    print("loading the shipped SmolLM2-135M-Instruct ...", flush=True)
    model, tok = load_causal_lm(shipped_smollm2_path())
    config = _config(args)
    questions = DEMO_QUESTIONS[: args.questions]
    runs = []
    with tqdm(total=2 * len(questions), desc="decoding", unit="run") as bar:
        for q in questions:
            ids = _chat_ids(tok, q)["input_ids"]
            pair = {}
            for name, cfg in (("base", None), ("v-reason", config)):
                pair[name] = vk.generate(model, ids, config=cfg, max_new_tokens=args.max_new_tokens)
                bar.update(1)
            runs.append((q, ids.shape[1], pair))

    print(f"\nV-Reason config: {config}\n")
    header = f"{'#':>2} {'mode':<9} {'tokens':>6} {'EMA peak':>9} {'ms/token':>9} {'overhead':>9}  answer"
    print(header + "\n" + "-" * len(header))
    for i, (q, plen, pair) in enumerate(runs):
        base_tpt = pair["base"].stats["time_per_token_s"]
        for name, out in pair.items():
            tpt = out.stats["time_per_token_s"]
            answer = tok.decode(out.sequences[0, plen:], skip_special_tokens=True).replace("\n", " ")
            peak = float(out.entropy_ema.nan_to_num(float("-inf")).max())
            print(f"{i:>2} {name:<9} {out.stats['tokens']:>6} {peak:>9.3f} {1e3 * tpt:>9.1f} "
                  f"{tpt / base_tpt:>8.2f}x  {answer[:70]}")

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 3 * len(runs)), squeeze=False)
    for ax, (q, _, pair) in zip(axes[:, 0], runs):
        for (name, out), color in zip(pair.items(), ("tab:blue", "tab:red")):
            steps = range(1, out.entropy.shape[1] + 1)
            ax.plot(steps, out.entropy[0].numpy(), color=color, alpha=0.3, lw=1, label=f"{name} H_k")
            ax.plot(steps, out.entropy_ema[0].numpy(), color=color, lw=2, label=f"{name} EMA")
        ax.set_title(q[:80], fontsize=9)
        ax.set_xlabel("generated token")
        ax.set_ylabel("entropy (nats)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    plot = Path(args.plot)
    plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(plot, dpi=110)
    print(f"\nentropy plot saved to {plot.resolve()}")
    return 0


def generate_cmd(args) -> int:
    import vreason_kernels as vk
    from vreason_kernels.models import load_causal_lm

    if args.video is not None:
        from vreason_kernels.video import check_video_file

        check_video_file(args.video)  # a bad file fails before the (slow) model load
    model, proc = load_causal_lm(args.model)
    if args.video is not None:
        from vreason_kernels.video import video_chat_inputs

        inputs = video_chat_inputs(proc, args.video, args.prompt, fps=args.fps, num_frames=args.num_frames)
    else:
        inputs = _chat_ids(proc, args.prompt) if getattr(proc, "chat_template", None) else proc(args.prompt, return_tensors="pt")
    inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in dict(inputs).items()}
    ids = inputs.pop("input_ids")
    out = vk.generate(model, ids, config=_config(args), max_new_tokens=args.max_new_tokens, **inputs)
    decode = proc.batch_decode if hasattr(proc, "batch_decode") else proc.tokenizer.batch_decode
    print(decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)[0])
    s = out.stats
    print(f"\n[{s['tokens']} tokens, {1e3 * s['time_per_token_s']:.1f} ms/token, "
          f"EMA-entropy peak {float(out.entropy_ema.nan_to_num(float('-inf')).max()):.3f}, "
          f"span {s['span_size']} tokens]", file=sys.stderr)
    return 0


class UsageError(Exception):
    """A command-line mistake, reported as one line with exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage and error on several lines; ours raise, for ``main`` to print one."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _number(kind, low, *, inclusive: bool):
    """An argparse type: ``kind`` (int/float) at least (``inclusive``) or above ``low``."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="vreason", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    count, tokens = _number(int, 1, inclusive=True), _number(int, 0, inclusive=True)
    p = sub.add_parser("demo", help="base vs V-Reason on the shipped SmolLM2, with a table and an entropy plot")
    p.add_argument("--questions", type=count, default=len(DEMO_QUESTIONS), help="how many demo questions (default all 3)")
    p.add_argument("--max-new-tokens", type=tokens, default=80)
    p.add_argument("--plot", default=DEFAULT_PLOT, help=f"PNG path (default ./{DEFAULT_PLOT})")
    p.add_argument("--lite", action="store_true", help="Lite mode: prune half of the span after prefill")
    p.set_defaults(func=demo)
    g = sub.add_parser("generate", help="V-Reason decoding with a local HF checkpoint folder or .gguf file")
    g.add_argument("--model", required=True, help="checkpoint folder or .gguf file")
    g.add_argument("--prompt", required=True)
    g.add_argument("--video", default=None, help="video file, decoded with PyAV and prepared by the model's own processor")
    frames = g.add_mutually_exclusive_group()
    frames.add_argument("--fps", type=_number(float, 0, inclusive=False), default=None,
                        help="frames sampled per second of video (default: the processor's, else 2)")
    frames.add_argument("--num-frames", type=count, default=None, help="frames sampled from the video, evenly")
    g.add_argument("--lite", action="store_true", help="Lite mode: prune half of the video tokens after prefill")
    g.add_argument("--max-new-tokens", type=tokens, default=256)
    g.set_defaults(func=generate_cmd)
    return parser


def main(argv=None) -> int:
    """Run the command line; returns the exit status (2, with one line on stderr, for any mistake)."""
    try:
        args = _parser().parse_args(argv)
        return args.func(args)
    except (UsageError, OSError, ValueError, ImportError) as exc:
        # Usage mistakes, bad paths and files, unloadable checkpoints, missing optional packages.
        print(f"vreason: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
