"""The real video path: a video file written with PyAV, decoded, prepared by a real Qwen2.5-VL
processor saved with ``save_pretrained``, and decoded with V-Reason by the API and the CLI.

The processor half needs transformers' Qwen2-VL video processor, which needs a torchvision
that imports with the installed torch: the lock's torch 2.14.1 + torchvision 0.29.1. Where
torchvision does not import (the CPU build of torch off x86_64), those tests skip and say why.
"""

import subprocess
import sys

import pytest
import torch

import vreason_kernels as vk
from python_tests.tiny_models import (
    needs_video_processor,
    save_tiny_qwen2_5_vl_checkpoint,
    write_frameless_video,
    write_moving_shapes_video,
)
from python_tests.utils import repo_env

pytest.importorskip("av", reason="the video extra (PyAV) is not installed")
pytestmark = [pytest.mark.video, pytest.mark.slow]

from vreason_kernels.integrations import default_span  # noqa: E402
from vreason_kernels.video import check_video_file, video_chat_inputs  # noqa: E402

@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    return write_moving_shapes_video(tmp_path_factory.mktemp("video") / "shapes.mp4", frames=8, fps=4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_qwen2_5_vl_checkpoint(tmp_path_factory.mktemp("tiny_qwen2_5_vl"))


def test_synthetic_video_is_small_and_decodes_to_its_frames(video_file):
    from transformers.video_utils import load_video

    assert video_file.stat().st_size < 1 << 20
    assert check_video_file(video_file) == video_file
    frames, metadata = load_video(str(video_file), backend="pyav")
    assert frames.shape == (8, 32, 48, 3) and metadata.fps == 4
    # The square moves: the first and last frames differ where it was.
    assert abs(frames[0].astype(int) - frames[-1].astype(int)).max() > 100


@pytest.mark.parametrize("kind", ["missing", "not-a-video", "no-frames"])
def test_bad_video_files_are_a_value_error_naming_the_file(kind, tmp_path):
    path = tmp_path / {"missing": "absent.mp4", "not-a-video": "notes.mp4", "no-frames": "empty.avi"}[kind]
    if kind == "not-a-video":
        path.write_text("this is text, not a video\n")
    elif kind == "no-frames":
        write_frameless_video(path)
    message = {"missing": "no such file", "not-a-video": "not a video file", "no-frames": "has no frames"}[kind]
    with pytest.raises(ValueError, match=message) as info:
        check_video_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("kwargs,message", [
    (dict(fps=2.0, num_frames=4), "mutually exclusive"),
    (dict(fps=0.0), "fps must be > 0"),
    (dict(num_frames=-1), "num_frames must be > 0"),
])
def test_sampling_arguments_are_checked(kwargs, message, video_file):
    with pytest.raises(ValueError, match=message):
        video_chat_inputs(object(), video_file, "hi", **kwargs)


def test_a_processor_without_video_support_is_a_clear_error(smollm2, video_file):
    with pytest.raises(ValueError, match="has no video processor"):
        video_chat_inputs(smollm2[1], video_file, "hi")


@needs_video_processor
def test_api_video_tokens_come_from_the_processor_and_form_the_span(checkpoint, video_file):
    from vreason_kernels.loading import load_causal_lm

    model, processor = load_causal_lm(checkpoint)
    inputs = video_chat_inputs(processor, video_file, "What moves?", num_frames=4)
    grid = inputs["video_grid_thw"]
    assert grid.tolist() == [[2, 8, 12]]  # 4 frames / temporal patch 2; 32x48 px / patch 4
    ids = inputs.pop("input_ids")
    video_positions = (ids[0] == processor.video_token_id).nonzero().flatten()
    n_video = int(grid.prod()) // processor.video_processor.merge_size**2
    assert video_positions.numel() == n_video == 48
    # One contiguous run of placeholders between <|vision_start|> and <|vision_end|>.
    assert (video_positions.diff() == 1).all()
    torch.testing.assert_close(default_span(model.config, ids), video_positions)

    out = vk.generate(model, ids, config=vk.VReasonConfig(), max_new_tokens=5, **inputs)
    assert out.stats["span_size"] == n_video and out.stats["updates"] > 0
    assert out.sequences.shape == (1, ids.shape[1] + out.entropy.shape[1])
    assert torch.isfinite(out.entropy).all() and (out.delta_norm[:, 1:] > 0).any()
    base = vk.generate(model, ids, config=vk.VReasonConfig(enabled=False), max_new_tokens=5, **inputs)
    assert base.stats["span_size"] == 0 and base.stats["updates"] == 0
    # Sampling at 2 fps from an 8-frame, 4 fps clip keeps 4 frames: the same grid.
    assert video_chat_inputs(processor, video_file, "What moves?", fps=2.0)["video_grid_thw"].tolist() == [[2, 8, 12]]


@needs_video_processor
def test_cli_generates_from_a_video_file(checkpoint, video_file):
    cmd = [sys.executable, "-m", "vreason_kernels", "generate", "--model", str(checkpoint), "--video", str(video_file),
           "--prompt", "What moves?", "--max-new-tokens", "4"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=repo_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert "span 48 tokens" in done.stderr and "ms/token" in done.stderr
