"""A video file to model inputs, through the model's own processor (Qwen2.5-VL and kin).

The file is decoded by PyAV through transformers' ``load_video``; which frames are kept is
decided by the processor's own ``video_processor.sample_frames`` (its ``fps`` or
``num_frames``), and resizing, normalising, patching and the expansion of the video
placeholder into one ``<|video_pad|>`` per merged patch are the processor's too. Nothing
here touches pixels. The video tokens' positions in ``input_ids`` are what
``vk.generate`` takes as its default span.

Needs the ``video`` extra (PyAV) and, for transformers' video processors, a torchvision
that matches the installed torch.
"""

from functools import partial
from pathlib import Path
from typing import Optional, Union

__all__ = ["DEFAULT_FPS", "check_video_file", "video_chat_inputs"]

# Qwen2.5-VL samples videos at 2 frames per second (its report and qwen-vl-utils); the
# processors that transformers saves for it carry no rate of their own.
DEFAULT_FPS = 2.0


def check_video_file(video: Union[str, Path]) -> Path:
    """``video`` as a ``Path`` once PyAV has decoded its first frame.

    Raises ``ValueError`` naming the file when it is missing, not a video PyAV can decode,
    has no video stream, or has no frames. Only the first frame is decoded.
    """
    path = Path(video)
    if not path.is_file():
        raise ValueError(f"video: no such file: {path}")
    av = _import_av()
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise ValueError(f"video: {path} has no video stream")
            if next(container.decode(video=0), None) is None:
                raise ValueError(f"video: {path} has no frames")
    except av.FFmpegError as exc:
        raise ValueError(f"video: {path} is not a video file PyAV can decode ({exc})") from exc
    return path


def video_chat_inputs(
    processor,
    video: Union[str, Path],
    prompt: str,
    *,
    fps: Optional[float] = None,
    num_frames: Optional[int] = None,
    system_prompt: Optional[str] = None,
) -> dict:
    """Model inputs for one user turn holding ``video`` then ``prompt``, with the generation prompt.

    Args:
        processor: the checkpoint's ``AutoProcessor`` (e.g. ``Qwen2_5_VLProcessor``); it
            must have a ``video_processor`` and a chat template.
        video: path of a video file (checked with :func:`check_video_file`).
        prompt: the question.
        fps, num_frames: frame sampling, passed to the processor's ``sample_frames``
            (mutually exclusive; default: the video processor's own setting, else
            ``DEFAULT_FPS`` = 2 frames per second, Qwen2.5-VL's training rate).
        system_prompt: an optional system turn before the user turn.

    Returns:
        A dict of ``[1, ...]`` tensors: ``input_ids``, ``attention_mask``,
        ``pixel_values_videos``, ``video_grid_thw`` and whatever else the processor adds
        (``second_per_grid_ts``, ``mm_token_type_ids``), ready for
        ``vk.generate(model, inputs.pop("input_ids"), **inputs)``.
    """
    if fps is not None and num_frames is not None:
        raise ValueError(f"fps and num_frames are mutually exclusive, got fps={fps} and num_frames={num_frames}")
    for name, value in (("fps", fps), ("num_frames", num_frames)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    video_processor = getattr(processor, "video_processor", None)
    if video_processor is None:
        raise ValueError(f"processor: {type(processor).__name__} has no video processor (Qwen2.5-VL's has one)")
    path = check_video_file(video)
    own_rate = (getattr(video_processor, "fps", None), getattr(video_processor, "num_frames", None))
    if fps is None and num_frames is None and own_rate == (None, None):
        fps = DEFAULT_FPS
    from transformers.video_utils import load_video

    # Decode only the frames the processor would sample; it then gets them with their
    # metadata (the sampled fps sets Qwen2.5-VL's temporal positions) and samples no more.
    sample = partial(video_processor.sample_frames, fps=fps, num_frames=num_frames)
    frames, metadata = load_video(str(path), backend="pyav", sample_indices_fn=sample)
    messages = [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": prompt}]}]
    if system_prompt:
        messages.insert(0, {"role": "system", "content": [{"type": "text", "text": system_prompt}]})
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(
        text=[text], videos=[frames], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt"
    )
    return dict(inputs)


def _import_av():
    try:
        import av
    except ImportError as exc:
        raise ImportError("reading a video file needs PyAV: pip install 'vreason-kernels[video]'") from exc
    return av
