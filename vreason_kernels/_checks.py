"""Argument checks shared by the public ops: each error names the argument and what was expected."""

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


def check_same(attr: str, reference: str, ref: torch.Tensor, others: Sequence[tuple]) -> None:
    """Every (name, tensor) in ``others`` must share ``ref``'s dtype or device (``attr``)."""
    want = getattr(ref, attr)
    for name, t in others:
        if t is not None and getattr(t, attr) != want:
            raise ValueError(f"{name} must have the same {attr} as {reference} ({want}), got {getattr(t, attr)}")
