"""``attn_implementation="vreason"`` after a plain ``import vreason_kernels``, in fresh
interpreters (registration is a process-wide side effect, so in-process tests would only
see whatever an earlier test registered)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("transformers")

_BUILD_MODEL = """
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                  num_attention_heads=4, num_key_value_heads=2)
model = AutoModelForCausalLM.from_config(cfg, attn_implementation="vreason")
assert model.config._attn_implementation == "vreason", model.config._attn_implementation
logits = model(torch.tensor([[1, 2, 3]])).logits
assert logits.shape == (1, 3, 97) and bool(torch.isfinite(logits).all())
print("OK")
"""


def _run(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=dict(os.environ), timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.mark.slow  # a fresh interpreter per case
def test_import_vreason_kernels_does_not_load_transformers():
    out = _run("import sys, vreason_kernels\nprint('transformers' in sys.modules)")
    assert out.strip() == "False"


@pytest.mark.slow
@pytest.mark.parametrize(
    "imports",
    [
        "import vreason_kernels",  # before transformers: registered when its model code loads
        "import transformers.modeling_utils\nimport vreason_kernels",  # after: registered at once
    ],
    ids=["vreason-first", "transformers-first"],
)
def test_attn_implementation_vreason_after_plain_import(imports):
    assert _run(imports + "\n" + _BUILD_MODEL).strip().endswith("OK")


@pytest.mark.slow
def test_without_the_import_transformers_rejects_it():
    """The control: the positive tests above pass because of the import, not by accident."""
    result = subprocess.run([sys.executable, "-c", _BUILD_MODEL], capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "vreason" in result.stderr
