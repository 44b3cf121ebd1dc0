"""Output allocation for the kernels' Python launchers.

With ``VREASON_POISON_OUTPUTS=1`` (set by the test suite) every output starts as NaN,
so an element a kernel forgets to write fails the comparison instead of passing on
whatever memory happened to hold. csrc/common.h does the same for the C++ kernels.
"""

import os

import torch

POISON = os.environ.get("VREASON_POISON_OUTPUTS") == "1"


def new_output(shape, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if POISON:
        out.fill_(float("nan") if out.is_floating_point() else -(2**30))
    return out
