"""Loads the compiled extension once; the package keeps working without it."""

import importlib
import warnings

try:
    importlib.import_module("vreason_kernels._C")  # registers torch.ops.vreason_C.*

    HAS_EXTENSION = True
    EXTENSION_ERROR = ""
except ImportError as exc:  # a source checkout, or a build made against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    warnings.warn(
        f"vreason_kernels: C++ extension not loaded ({EXTENSION_ERROR}); "
        "CPU ops fall back to the PyTorch reference.",
        RuntimeWarning,
        stacklevel=2,
    )
