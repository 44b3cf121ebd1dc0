"""What the command line writes to stderr besides its own lines: third-party noise kept
quiet unless ``-v``, warnings as one ``vreason: warning:`` line each, a token progress bar."""

import contextlib
import logging
import os
import sys
import warnings

PREFIX = "vreason"


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def error(message) -> None:
    print(f"{PREFIX}: error: {_one_line(message)}", file=sys.stderr)


@contextlib.contextmanager
def warnings_as_lines(verbose: bool):
    """Every warning raised inside, as one ``vreason: warning: ...`` line on stderr. Without
    ``verbose`` only the package's own (the runaway and NaN-reset warnings) are shown:
    deprecation notes and the like from transformers, torch or gguf are not the user's."""
    with warnings.catch_warnings():
        if not verbose:
            warnings.filterwarnings("ignore")
            warnings.filterwarnings("default", module=r"vreason_kernels(\.|$)")
        warnings.showwarning = lambda message, *args, **kwargs: print(
            f"{PREFIX}: warning: {_one_line(message)}", file=sys.stderr
        )
        yield


@contextlib.contextmanager
def third_party_quiet(verbose: bool):
    """transformers' logs and other Python loggers at error level, and transformers'
    progress bars off, for the duration; with ``verbose`` nothing changes. Some bars do not
    go through transformers' switch: see :func:`silenced_stderr`."""
    if verbose:
        yield
        return
    from transformers.utils import logging as hf_logging

    root = logging.getLogger()
    level, root_level, bars = hf_logging.get_verbosity(), root.level, hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        root.setLevel(root_level)
        if bars:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def silenced_stderr(verbose: bool):
    """stderr to ``os.devnull`` for the duration (unless ``verbose``): for third-party
    code that writes there directly, such as the GGUF loader's progress bar."""
    if verbose:
        yield
        return
    with open(os.devnull, "w") as sink, contextlib.redirect_stderr(sink):
        yield


class TokenBar:
    """A tqdm bar of decoded tokens on stderr, drawn only when stderr is a terminal (none in
    pipes and logs). Pass the instance as ``vk.generate(..., progress=bar)``."""

    def __init__(self, total: int, desc: str):
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, leave=False,
                        disable=not sys.stderr.isatty() or total == 0)
        self.done = 0

    def __call__(self, steps: int) -> None:
        self.bar.update(steps - self.done)
        self.done = steps

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()
