"""How the package reports its C++ extension (vreason_kernels/_extension.py).

`make test-wheel` sets VREASON_REQUIRE_EXTENSION=1: there an extension that fails to load
is an error, not a reason for the C++ tests to skip.
"""

import os
import subprocess
import sys

import pytest

import vreason_kernels.backend as backend
from vreason_kernels import _extension


def test_status_is_reexported_and_consistent():
    status = backend.EXTENSION_STATUS
    assert status is _extension.STATUS
    assert status.loaded == (status.reason == "")


@pytest.mark.skipif(os.environ.get("VREASON_REQUIRE_EXTENSION") != "1", reason="VREASON_REQUIRE_EXTENSION is not 1")
def test_extension_is_loaded():
    assert _extension.STATUS.loaded, _extension.STATUS.reason


@pytest.mark.slow  # a fresh interpreter
def test_torch_older_than_2_10_turns_the_extension_off_with_one_warning():
    # A fresh interpreter that sees torch as 2.9: the package imports, says why once, and
    # `auto` runs CPU tensors on the torch reference.
    code = """
import warnings
import torch
torch.__version__ = "2.9.1"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import vreason_kernels as vk
    import vreason_kernels.backend as backend
mine = [str(w.message) for w in caught if "vreason_kernels" in str(w.message)]
assert len(mine) == 1, mine
status = backend.EXTENSION_STATUS
assert not status.loaded and "2.10" in status.reason and status.reason in mine[0], (status, mine)
assert backend.resolve_backend("auto", torch.device("cpu")) == "torch"
hidden, weight = torch.randn(2, 8), torch.randn(16, 8)
assert vk.linear_entropy(hidden, weight).shape == (2,)
"""
    subprocess.run([sys.executable, "-c", code], check=True)
