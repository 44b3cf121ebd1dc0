"""Loads the compiled extension once; the package keeps working without it.

``STATUS`` says whether the C++ ops are registered (``torch.ops.vreason_C.*``) and, when
not, why; ``vreason_kernels.backend`` re-exports it. Without them ``backend="auto"``
runs CPU tensors on the PyTorch reference, and a warning says why, once per process.
"""

import importlib
import warnings
from typing import NamedTuple

import torch  # first: the extension resolves its libtorch symbols against this torch

# The extension is built on libtorch's stable ABI, whose calls it makes exist from 2.10 on.
MIN_TORCH = (2, 10)


class ExtensionStatus(NamedTuple):
    loaded: bool
    reason: str  # why the extension is not loaded; "" when it is


def _torch_version() -> tuple:
    return tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _load() -> ExtensionStatus:
    if _torch_version() < MIN_TORCH:
        return ExtensionStatus(
            False,
            f"torch {torch.__version__} is older than 2.10, the first release with the stable C++ ABI "
            "the extension is built on; upgrade torch to use the C++ CPU kernels",
        )
    try:
        importlib.import_module("vreason_kernels._C")  # registers torch.ops.vreason_C.*
    except ImportError as exc:  # a source checkout without a build, or a broken install
        return ExtensionStatus(False, str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    return ExtensionStatus(True, "")


STATUS = _load()

if not STATUS.loaded:
    warnings.warn(
        f"vreason_kernels: C++ extension not loaded ({STATUS.reason}); CPU ops fall back to the PyTorch reference.",
        RuntimeWarning,
        stacklevel=2,
    )
