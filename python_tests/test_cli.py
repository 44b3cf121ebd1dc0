"""The command line (``vreason demo`` / ``vreason generate``) on the shipped SmolLM2.

The model load itself is covered by the ``smollm2`` fixture (the same GGUF loader), so
these tests hand the CLI that already-loaded model instead of loading it twice more.
"""

import pytest

import vreason_kernels.models
from vreason_kernels.__main__ import main
from vreason_kernels.models import shipped_smollm2_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def loaded_smollm2(smollm2, monkeypatch):
    monkeypatch.setattr(vreason_kernels.models, "load_causal_lm", lambda *args, **kwargs: smollm2)


def test_generate_prints_an_answer_and_its_stats(loaded_smollm2, capsys):
    args = ["generate", "--model", str(shipped_smollm2_path()), "--prompt", "What is 2 + 2?", "--max-new-tokens", "5"]
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip(), "no answer printed"
    assert "tokens" in out.err and "ms/token" in out.err


def test_demo_prints_the_table_and_writes_the_plot(loaded_smollm2, tmp_path, capsys):
    plot = tmp_path / "figure.png"
    assert main(["demo", "--questions", "1", "--max-new-tokens", "6", "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "v-reason" in printed and "overhead" in printed
    assert plot.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], "no such file or folder"),
        (["generate", "--model", "/nonexistent", "--prompt", "hi", "--video", "/nonexistent/clip.mp4"],
         "--video: no such file"),
        (["demo", "--questions", "0"], "--questions must be in"),
    ],
    ids=["missing-model", "missing-video", "no-questions"],
)
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err
