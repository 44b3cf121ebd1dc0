"""Test-session setup: runs before any test module imports triton or vreason_kernels."""

import os

import torch

# Triton kernels run under the interpreter on machines without CUDA; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN so that an unwritten element fails (vreason_kernels/_alloc.py).
os.environ.setdefault("VREASON_POISON_OUTPUTS", "1")
