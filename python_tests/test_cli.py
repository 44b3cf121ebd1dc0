"""The command line (``vreason demo`` / ``vreason generate``) on the shipped SmolLM2.

The model load itself is covered by the ``smollm2`` fixture (the same GGUF loader), so
these tests hand the CLI that already-loaded model instead of loading it twice more.
"""

import importlib.util
import subprocess
import sys

import pytest

import vreason_kernels.models
from vreason_kernels.__main__ import main
from python_tests.utils import repo_env
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


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_videos")
    (folder / "notes.mp4").write_text("this is text, not a video\n")
    if importlib.util.find_spec("av") is not None:
        from python_tests.tiny_models import write_frameless_video

        write_frameless_video(folder / "empty.avi")
    return folder


GENERATE = ["generate", "--model", "/nonexistent", "--prompt", "hi"]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--model", "/nonexistent/model.gguf", "--prompt", "hi"], "no such file or folder"),
        (["generate", "--prompt", "hi"], "the following arguments are required: --model"),
        (["generate", "--model", "{bad}", "--prompt", "hi"], "{bad}"),
        (["generate", "--model", "{bad}/notes.mp4", "--prompt", "hi"], "expected a checkpoint folder or a .gguf file"),
        (["generate", "--model", "/tmp"], "the following arguments are required: --prompt"),
        (GENERATE + ["--video", "/nonexistent/clip.mp4"], "video: no such file: /nonexistent/clip.mp4"),
        (GENERATE + ["--video", "{bad}/notes.mp4"], "notes.mp4 is not a video file"),
        (GENERATE + ["--video", "{bad}/empty.avi"], "empty.avi has no frames"),
        (GENERATE + ["--max-new-tokens", "-3"], "--max-new-tokens: must be >= 0, got -3"),
        (GENERATE + ["--max-new-tokens", "2.5"], "--max-new-tokens: expected an integer"),
        (GENERATE + ["--fps", "-1"], "--fps: must be > 0"),
        (GENERATE + ["--fps", "nan"], "--fps: must be > 0"),
        (GENERATE + ["--num-frames", "0"], "--num-frames: must be >= 1"),
        (GENERATE + ["--fps", "1", "--num-frames", "4"], "not allowed with argument"),
        (["demo", "--questions", "0"], "--questions: must be >= 1"),
        (["demo", "--questions", "9"], "--questions must be in [1, 3]"),
        (["demo", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
        (["demo", "--unknown"], "unrecognized arguments: --unknown"),
        (["train"], "invalid choice: 'train'"),
        ([], "the following arguments are required: command"),
    ],
    ids=["missing-model", "no-model-arg", "not-a-checkpoint", "not-a-model-file", "no-prompt-arg", "missing-video", "not-a-video", "frameless-video",
         "negative-tokens", "float-tokens", "negative-fps", "nan-fps", "zero-frames", "fps-and-frames",
         "no-questions", "too-many-questions", "demo-negative-tokens", "unknown-flag", "unknown-command", "no-command"],
)
def test_mistakes_print_one_line_and_exit_2(argv, message, bad_files, capsys):
    if any("{bad}/empty.avi" in a for a in argv):
        pytest.importorskip("av", reason="the video extra (PyAV) writes the frameless video")
    argv = [a.replace("{bad}", str(bad_files)) for a in argv]
    message = message.replace("{bad}", str(bad_files))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vreason: error: "), err
    assert message in err


def test_a_mistake_in_a_real_process_has_no_traceback(bad_files):
    """The installed entry point, not only ``main``: exit status 2, one line, no traceback."""
    argv = GENERATE + ["--video", str(bad_files / "notes.mp4")]
    if importlib.util.find_spec("av") is None:
        argv = GENERATE + ["--max-new-tokens", "-1"]
    done = subprocess.run([sys.executable, "-m", "vreason_kernels", *argv], capture_output=True, text=True, env=repo_env(),
                          timeout=120)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr
