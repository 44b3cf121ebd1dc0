"""The environment for tests that run this source tree in a subprocess (the oracles and the
tolerance rule are in helpers.py)."""

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def repo_env(**extra) -> dict:
    """The environment for a subprocess that must import this source tree's package."""

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
