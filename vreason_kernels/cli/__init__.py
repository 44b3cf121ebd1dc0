"""The command line, ``vreason`` (or ``python -m vreason_kernels``): ``demo`` and ``generate``.

Exit status: 0 on success; 2, with one ``vreason: error: ...`` line on stderr, for a
usage mistake or a bad input (path, file, checkpoint, value); 1, with one line, for an
unexpected failure (``-v`` shows its traceback); 130 when interrupted.
"""

from vreason_kernels.cli import console
from vreason_kernels.cli.demo import DEMO_QUESTIONS, demo_command
from vreason_kernels.cli.generate import generate_command
from vreason_kernels.cli.parser import UsageError, build_parser

__all__ = ["main"]

# Mistakes in what the user passed: bad flags, missing or unreadable files, checkpoints
# transformers cannot load, values the API refuses, missing optional packages.
USER_ERRORS = (UsageError, OSError, ValueError, ImportError)


def main(argv=None) -> int:
    """Run the command line on ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser(demo_command, generate_command, len(DEMO_QUESTIONS))
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        console.error(exc)
        return 2
    except SystemExit as exc:  # --help and --version print, then exit 0
        return exc.code if isinstance(exc.code, int) else 0
    with console.warnings_as_lines(args.verbose):
        try:
            return args.func(args)
        except USER_ERRORS as exc:
            console.error(exc)
            return 2
        except KeyboardInterrupt:
            console.error("interrupted")
            return 130
        except Exception as exc:
            if args.verbose:
                raise
            console.error(f"unexpected {type(exc).__name__}: {exc} (run with -v for the traceback)")
            return 1
