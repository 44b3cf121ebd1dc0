"""``python -m vreason_kernels``: the command line of :mod:`vreason_kernels.cli`."""

import sys

from vreason_kernels.cli import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
