"""Backend names and how ``backend="auto"`` resolves them (docs/design.md §3).

- ``"auto"``: Triton on CUDA tensors, the C++ extension on CPU tensors (the torch
  reference when the extension is missing).
- ``"triton"``: CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).
- ``"cpp"``: the compiled extension.
- ``"torch"``: the pure-PyTorch reference, the spec the fused paths must match.
"""

import functools
import importlib
import os

import torch

from vreason_kernels._extension import STATUS as EXTENSION_STATUS  # (loaded: bool, reason: str)

BACKENDS = ("auto", "triton", "cpp", "torch")


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def sm_count_or_none(device: torch.device):
    """The CUDA device's SM count (the launchers size their grids by it), or None off CUDA."""
    return _cuda_sm_count(device.index or 0) if device.type == "cuda" else None


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def check_backend(backend: object) -> str:
    """The one check of a backend name (the ops, ``VReasonConfig``, the attention hook)."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map a user-facing backend name to a concrete one for tensors on ``device``."""
    check_backend(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton"
        return "cpp" if EXTENSION_STATUS.loaded and device.type == "cpu" else "torch"
    if backend == "triton" and device.type != "cuda" and not triton_interpreted():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {device.type}); "
            "on CPU set TRITON_INTERPRET=1 before importing triton, or use backend='cpp'/'torch'"
        )
    if backend == "cpp":
        if not EXTENSION_STATUS.loaded:
            raise RuntimeError(f"backend='cpp' needs the compiled extension, which failed to load: {EXTENSION_STATUS.reason}")
        if device.type != "cpu":
            raise ValueError(f"backend='cpp' runs on CPU tensors only, got {device.type} tensors")
    return backend


def resolve_backend_for(backend: str, name: str, x: torch.Tensor) -> str:
    """``resolve_backend`` for the input ``name``: float64 runs only on the torch reference
    (the fused backends accumulate in float32), which ``"auto"`` then picks."""
    resolved = resolve_backend(backend, x.device)
    if x.dtype != torch.float64:
        return resolved
    if backend == "auto":
        return "torch"
    if resolved != "torch":
        raise TypeError(f"{name} of dtype float64 is supported only by backend='torch', not {backend!r}")
    return resolved


# Every op package names its backends alike: naive.py is the torch reference.
_BACKEND_MODULES = {"torch": "naive", "cpp": "cpp", "triton": "triton_backend"}


def backend_module(op_package: str, backend: str):
    """The module implementing ``backend`` for the op package ``op_package``.

    Imported lazily: the package must import without triton or the extension.
    """
    return importlib.import_module(f"{op_package}.{_BACKEND_MODULES[backend]}")


def accumulator_dtype(dtype: torch.dtype) -> torch.dtype:
    """Kernels accumulate in float32; the float64 reference stays in float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32
