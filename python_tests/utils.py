"""Shared assertions: a kernel is judged against a float64 reference, relative to the
error the same-dtype PyTorch implementation makes on the same input (DESIGN.md §5)."""

import os
from pathlib import Path

import torch


def max_abs_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.detach().double() - reference.detach().double()).abs().max().item() if actual.numel() else 0.0


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    k: float = 4.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """``|actual - ref64| <= k * |baseline - ref64| + atol`` in max norm, with no NaN.

    ``baseline`` is the plain PyTorch implementation run in ``actual``'s dtype.
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    finite_ref = torch.isfinite(reference64)
    bad = ~torch.isfinite(actual.detach()) & finite_ref
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    err = max_abs_err(actual, reference64)
    base = max_abs_err(baseline, reference64)
    assert err <= k * base + atol, f"{name}: max error {err:.3e} > {k} x baseline {base:.3e} + {atol:.1e}"


REPO = Path(__file__).resolve().parents[1]


def repo_env(**extra) -> dict:
    """The environment for a subprocess that must import this source tree's package."""

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
