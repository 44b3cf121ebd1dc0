"""Shared assertions: a kernel is judged against a float64 reference, relative to the
error the same-dtype PyTorch implementation makes on the same input (docs/design.md §5).

This is flash-attention's rule: ``err(kernel) <= k * err(plain PyTorch) + floor`` with
k = 2, where both errors are measured against the same computation in float64.
"""

import os
from pathlib import Path

import torch


def max_abs_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """Largest |actual - reference| over the entries where the reference is finite."""
    finite = torch.isfinite(reference)
    if not finite.any():
        return 0.0
    return (actual.detach().double()[finite] - reference.detach().double()[finite]).abs().max().item()


def rounding_floor(reference64: torch.Tensor, dtype: torch.dtype, ulps: float = 2.0) -> float:
    """``ulps`` units of ``dtype``'s epsilon at the largest finite magnitude of the reference.

    The error an exact result makes once rounded to ``dtype`` is half a unit; the floor
    absorbs a few such roundings that land by chance on the entry holding the max error.
    Kernels compute in float32, whose values below its smallest normal number are
    subnormal or flushed to zero (GPUs' fast exp and log flush them): at tau = 1e-3 a
    near one-hot row's entropy can be 1e-39, and an error of that size carries no
    information. So the floor is never below ``ulps`` float32 smallest normals.
    """
    finite = reference64[torch.isfinite(reference64)]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    return ulps * max(torch.finfo(dtype).eps * scale, torch.finfo(torch.float32).tiny)


def assert_close_to_reference(
    actual: torch.Tensor,
    reference64: torch.Tensor,
    baseline: torch.Tensor,
    *,
    k: float = 2.0,
    atol: float = 1e-5,
    name: str = "output",
) -> None:
    """``|actual - ref64| <= k * |baseline - ref64| + atol`` in max norm.

    ``baseline`` is the plain PyTorch implementation run in ``actual``'s dtype. Where the
    reference is finite, ``actual`` must be finite; where it is not (masked logits of
    -inf, NaN rows), ``actual`` must hold the same non-finite value.
    """
    assert actual.shape == reference64.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(reference64.shape)}"
    actual = actual.detach().double()
    finite_ref = torch.isfinite(reference64)
    bad = ~torch.isfinite(actual) & finite_ref
    assert not bad.any(), f"{name}: {int(bad.sum())} non-finite values where the reference is finite"
    nonfinite_ref = reference64[~finite_ref].double()
    assert torch.equal(actual[~finite_ref].isnan(), nonfinite_ref.isnan()), f"{name}: NaN pattern differs"
    inf_ref = ~finite_ref & ~reference64.isnan()
    assert torch.equal(actual[inf_ref], reference64[inf_ref].double()), f"{name}: infinities differ"
    err = max_abs_err(actual, reference64)
    base = max_abs_err(baseline, reference64)
    assert err <= k * base + atol, f"{name}: max error {err:.3e} > {k} x baseline {base:.3e} + {atol:.1e}"


REPO = Path(__file__).resolve().parents[1]


def repo_env(**extra) -> dict:
    """The environment for a subprocess that must import this source tree's package."""

    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}
