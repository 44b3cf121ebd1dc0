"""Every ```` ```python ```` block of the README runs as written, each in a fresh namespace.

Blocks that cannot run here (a 7B checkpoint, a GPU, a process group) are fenced
```` ```python illustration ```` and are only checked to compile. The shipped SmolLM2 is
loaded once for the whole file: ``load_causal_lm`` on the shipped GGUF returns the
session's already-loaded model, as loading it again would (the loader has its own tests).
"""

import re
from pathlib import Path

import pytest

import vreason_kernels.loading
from vreason_kernels.loading import shipped_smollm2_path

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(?P<info>[^\n`]*)\n(?P<code>.*?)^```\s*$", re.S | re.M)


def _blocks(info: str) -> list:
    return [m["code"] for m in FENCE.finditer(README.read_text()) if m["info"].strip() == info]


RUNNABLE = _blocks("python")


def test_the_readme_has_runnable_blocks_and_only_marked_illustrations():
    infos = {m["info"].strip() for m in FENCE.finditer(README.read_text())}
    assert len(RUNNABLE) >= 3
    assert infos <= {"python", "python illustration", "bash"}, infos
    for code in _blocks("python illustration"):
        compile(code, "README illustration", "exec")


def _run(code: str, name: str, capsys) -> None:
    exec(compile(code, name, "exec"), {"__name__": "__readme__"})
    if "print(" in code:
        assert capsys.readouterr().out.strip()


# Blocks that load the shipped SmolLM2 get the session's model; the rest run without it.
WITH_MODEL = [i for i, code in enumerate(RUNNABLE) if "shipped_smollm2_path" in code]
WITHOUT_MODEL = [i for i in range(len(RUNNABLE)) if i not in WITH_MODEL]


@pytest.mark.slow  # loads the shipped SmolLM2 (~25 s) and generates
@pytest.mark.parametrize("index", WITH_MODEL, ids=lambda i: f"block{i + 1}")
def test_readme_block_with_the_shipped_model_runs(index, smollm2, monkeypatch, capsys):
    real = vreason_kernels.loading.load_causal_lm

    def load(model, **kwargs):
        return smollm2 if Path(model) == shipped_smollm2_path() and not kwargs else real(model, **kwargs)

    monkeypatch.setattr(vreason_kernels.loading, "load_causal_lm", load)
    _run(RUNNABLE[index], f"README.md python block {index + 1}", capsys)


@pytest.mark.parametrize("index", WITHOUT_MODEL, ids=lambda i: f"block{i + 1}")
def test_readme_block_runs(index, capsys):
    _run(RUNNABLE[index], f"README.md python block {index + 1}", capsys)


def test_the_readme_says_what_nan_input_does():
    """NaN in the inputs is not checked, so it comes out as NaN; the README must not promise otherwise."""
    import torch

    import vreason_kernels as vk

    hidden = torch.randn(2, 16)
    hidden[1, 3] = float("nan")
    entropy = vk.linear_entropy(hidden, torch.randn(40, 16))
    assert entropy[0].isfinite() and entropy[1].isnan()
    text = " ".join(README.read_text().split())
    assert "never a silent NaN" not in text and "NaN in gives NaN out" in text


def test_the_readme_states_the_demo_time_it_takes():
    text = " ".join(README.read_text().split())
    assert "a few minutes" not in text and "about 35 s on 2 free CPU cores" in text
