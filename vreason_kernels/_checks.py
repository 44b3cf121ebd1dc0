"""Argument checks shared by the public ops: each error names the argument and what was expected."""

import math
from numbers import Integral, Real
from typing import Optional, Sequence

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: Optional[int] = None,
    min_ndim: Optional[int] = None,
    floating: bool = True,
) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if floating and t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor (float32/float16/bfloat16/float64), got {t.dtype}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")
    return t


def check_device_type(name: str, t: torch.Tensor) -> None:
    """The kernels run on CPU and CUDA only; meta/mps/xpu tensors get a clear error here,
    not a failure deep in a backend (a ``.item()`` on a meta tensor, say)."""
    if t.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {t.device}")


def check_same(attr: str, reference: str, ref: torch.Tensor, others: Sequence[tuple]) -> None:
    """Every (name, tensor) in ``others`` must share ``ref``'s dtype or device (``attr``)."""
    want = getattr(ref, attr)
    for name, t in others:
        if t is not None and getattr(t, attr) != want:
            raise ValueError(f"{name} must have the same {attr} as {reference} ({want}), got {getattr(t, attr)}")


def check_positions(name: str, positions: object) -> torch.Tensor:
    """``positions`` must be a 1-D int32/int64 tensor (a span of sequence positions)."""
    check_tensor(name, positions, ndim=1, floating=False)
    if positions.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an int32/int64 tensor of positions, got {positions.dtype}")
    return positions


def as_positions(name: str, positions: object, device) -> torch.Tensor:
    """``positions`` as a 1-D int tensor: a tensor is taken as it is (``check_positions``
    then checks it), a list, tuple or ``range`` of ints becomes an int64 tensor on
    ``device``; any other type is a ``TypeError`` naming ``name``."""
    if isinstance(positions, torch.Tensor):
        return positions
    if isinstance(positions, (list, tuple, range)):
        bad = [x for x in positions if isinstance(x, bool) or not isinstance(x, Integral)]
        if bad:
            raise TypeError(f"{name} must hold int positions, got {type(bad[0]).__name__} {bad[0]!r}")
        return torch.tensor([int(x) for x in positions], dtype=torch.int64, device=device)
    raise TypeError(f"{name} must be a tensor, list, tuple or range of int positions, got {type(positions).__name__}")


def check_positions_values(name: str, positions: torch.Tensor, n: int, bound: str = "N") -> None:
    """The values of ``positions`` must be sorted, unique and in ``[0, n)``.

    On CPU a violation raises ``ValueError``. On CUDA the checks run on the device
    (``torch._assert_async``), since reading them back would cost a host sync on every
    decode step; a violation then fails as a device-side assertion.
    """
    if positions.numel() == 0:
        return
    in_range = (positions.min() >= 0) & (positions.max() < n)
    increasing = (positions[1:] > positions[:-1]).all()
    if positions.is_cuda:
        torch._assert_async(in_range & increasing, f"{name} must be sorted unique positions in [0, {bound})")
    elif not bool(in_range):
        lo, hi = int(positions.min()), int(positions.max())
        raise ValueError(f"{name} positions must lie in [0, {bound}) = [0, {n}), got values in [{lo}, {hi}]")
    elif not bool(increasing):
        raise ValueError(f"{name} must be sorted in increasing order with unique positions")


def check_bool(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def check_int(name: str, value: object, low: Optional[int] = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def check_number(
    name: str,
    value: object,
    *,
    low: Optional[float] = None,
    high: Optional[float] = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """``value`` must be a finite real number (not a bool) in the interval from ``low`` to
    ``high``; ``*_open`` excludes that end. A missing bound is unbounded."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    bad = not math.isfinite(value)
    bad |= low is not None and (value <= low if low_open else value < low)
    bad |= high is not None and (value >= high if high_open else value > high)
    if bad:
        lo = "(-inf" if low is None else f"{'(' if low_open else '['}{low}"
        hi = "inf)" if high is None else f"{high}{')' if high_open else ']'}"
        raise ValueError(f"{name} must be finite and in {lo}, {hi}, got {value}")
