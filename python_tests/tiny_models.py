"""Tiny random-weight Hugging Face models and synthetic inputs for tests (nothing is downloaded).

- ``tiny_llama(**overrides)``: a ``LlamaForCausalLM`` with small odd sizes and GQA.
- ``tiny_qwen2_5_vl(**text_overrides)``: a ``Qwen2_5_VLForConditionalGeneration`` with a tiny
  vision tower and mRoPE.
- ``synthetic_video_inputs(model, ...)``: ``input_ids`` holding ``video_token_id`` placeholders
  (as many as the video grid gives after the spatial merge), random ``pixel_values_videos`` and
  the matching ``video_grid_thw``, shaped as the Qwen2.5-VL processor would produce them.

Models are float32, in eval mode, with ``requires_grad_(False)``; weights are drawn from a
fixed seed (``seed=``) without touching the global RNG, so tests stay reproducible.
"""

import inspect

import pytest
import torch

TINY_VOCAB = 211
# Special ids of the tiny Qwen2.5-VL vocabulary; ordinary text ids are drawn below them.
VISION_START_ID, VISION_END_ID, IMAGE_TOKEN_ID, VIDEO_TOKEN_ID = 206, 207, 208, 209
TEXT_ID_LIMIT = VISION_START_ID

# Weights a little larger than HF's 0.02 default make next-token logits less flat, so greedy
# argmax is not decided by float rounding when two attention implementations are compared.
_INIT_STD = 0.1


def _build(model_cls, config, seed: int, attn_implementation: str):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation=attn_implementation, dtype=torch.float32)
    return model.eval().requires_grad_(False)

# Text-model sizes shared by both tiny models: GQA 3:1, odd vocabulary.
_TEXT_SIZES = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=48,
    intermediate_size=88,
    num_hidden_layers=3,
    num_attention_heads=6,
    num_key_value_heads=2,
)


def tiny_llama(*, seed: int = 0, attn_implementation: str = "sdpa", **overrides):
    """A random ``LlamaForCausalLM``: 3 layers, hidden 48, 6 query / 2 kv heads (head_dim 8), vocab 211.

    ``overrides`` replace ``LlamaConfig`` fields (e.g. ``num_hidden_layers=2``).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    fields = dict(
        **_TEXT_SIZES,
        max_position_embeddings=512,
        initializer_range=_INIT_STD,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=False,
    )
    fields.update(overrides)
    return _build(LlamaForCausalLM, LlamaConfig(**fields), seed, attn_implementation)


def tiny_qwen2_5_vl(*, seed: int = 0, attn_implementation: str = "sdpa", special_ids: dict = None, **text_overrides):
    """A random ``Qwen2_5_VLForConditionalGeneration`` with mRoPE and a 2-block vision tower.

    Text model: 3 layers, hidden 48, 6 query / 2 kv heads (head_dim 8, mRoPE sections [2, 1, 1]),
    vocab 211. Vision: patch 4, temporal patch 2, spatial merge 2, hidden 32, window attention in
    block 0 and full attention in block 1. ``text_overrides`` replace text-config fields;
    ``special_ids`` replaces the vision token ids (keys ``image_token_id``, ``video_token_id``,
    ``vision_start_token_id``, ``vision_end_token_id``), e.g. with a real tokenizer's.
    """
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(
        **_TEXT_SIZES,
        max_position_embeddings=1024,
        initializer_range=_INIT_STD,
        # mrope_section splits head_dim / 2 rotary frequencies into (time, height, width).
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]},
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    text.update(text_overrides)
    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=40,
        num_heads=2,
        out_hidden_size=text["hidden_size"],
        patch_size=4,
        temporal_patch_size=2,
        spatial_merge_size=2,
        # window_size / spatial_merge_size / patch_size = 2 merged tokens per window side.
        window_size=16,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
        initializer_range=_INIT_STD,
    )
    ids = dict(
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    ids.update(special_ids or {})
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return _build(Qwen2_5_VLForConditionalGeneration, config, seed, attn_implementation)


def synthetic_video_inputs(
    model,
    batch: int = 1,
    frames: int = 4,
    height_patches: int = 4,
    width_patches: int = 6,
    text_before: int = 5,
    text_after: int = 7,
    *,
    seed: int = 0,
) -> dict:
    """Model inputs for one video per batch row: ``text_before`` tokens, ``<vision_start>``, the
    video placeholders, ``<vision_end>``, ``text_after`` tokens.

    ``frames`` must be a multiple of the temporal patch size and ``height_patches`` /
    ``width_patches`` multiples of the spatial merge size. The number of placeholders is
    ``frames / temporal_patch * height_patches * width_patches / merge**2``. Returns
    ``input_ids``, ``attention_mask``, ``pixel_values_videos``, ``video_grid_thw`` and, where the
    installed transformers' forward takes it, ``mm_token_type_ids`` (0 text, 2 video), which
    newer versions need to build mRoPE positions.
    """
    config = model.config
    vision = config.vision_config
    merge, t_patch = vision.spatial_merge_size, vision.temporal_patch_size
    if frames % t_patch:
        raise ValueError(f"frames must be a multiple of temporal_patch_size={t_patch}, got {frames}")
    for name, value in (("height_patches", height_patches), ("width_patches", width_patches)):
        if value % merge:
            raise ValueError(f"{name} must be a multiple of spatial_merge_size={merge}, got {value}")
    grid = (frames // t_patch, height_patches, width_patches)
    n_patches = grid[0] * grid[1] * grid[2]
    n_video = n_patches // merge**2

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(batch):
        before = torch.randint(3, TEXT_ID_LIMIT, (text_before,), generator=gen)
        after = torch.randint(3, TEXT_ID_LIMIT, (text_after,), generator=gen)
        video = torch.full((n_video,), config.video_token_id)
        start = torch.tensor([config.vision_start_token_id])
        end = torch.tensor([config.vision_end_token_id])
        rows.append(torch.cat([before, start, video, end, after]))
    input_ids = torch.stack(rows)
    patch_dim = vision.in_channels * t_patch * vision.patch_size**2
    inputs = dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values_videos=torch.randn(batch * n_patches, patch_dim, generator=gen),
        video_grid_thw=torch.tensor([grid] * batch),
    )
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:
        inputs["mm_token_type_ids"] = (input_ids == config.video_token_id).int() * 2
    return inputs


def video_positions(model, input_ids: torch.Tensor, row: int = 0) -> torch.Tensor:
    """Positions of the video placeholder tokens in ``input_ids[row]`` (int64, sorted)."""
    return (input_ids[row] == model.config.video_token_id).nonzero().flatten()


# --- A saved tiny Qwen2.5-VL checkpoint with a real processor, and real video files ---------

# Qwen's vision special tokens, added to the shipped SmolLM2 tokenizer.
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Our own minimal chat template in the ChatML layout that SmolLM2 and Qwen share: a video or
# image part becomes <|vision_start|><|video_pad|><|vision_end|>, which the processor expands
# to one pad token per merged patch.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Processor sizes that match tiny_qwen2_5_vl's vision tower (patch 4, temporal 2, merge 2);
# the pixel bounds keep a 32x48 video at its size: (32/4)*(48/4)/2**2 = 24 tokens per 2 frames.
_TINY_VISION_PROCESSING = dict(patch_size=4, temporal_patch_size=2, merge_size=2, min_pixels=8 * 8, max_pixels=48 * 48)


def qwen_vision_tokenizer():
    """The shipped SmolLM2 tokenizer plus Qwen's vision special tokens and a chat template (offline)."""
    from transformers import AutoTokenizer

    from vreason_kernels.loading import shipped_smollm2_path

    gguf = shipped_smollm2_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.add_special_tokens({"additional_special_tokens": list(QWEN_VISION_TOKENS)})
    tok.chat_template = TINY_CHAT_TEMPLATE
    return tok


def save_tiny_qwen2_5_vl_checkpoint(folder, *, seed: int = 0):
    """Save a random tiny Qwen2.5-VL (:func:`tiny_qwen2_5_vl`) with a real processor into ``folder``.

    The processor is transformers' own ``Qwen2_5_VLProcessor``: the Qwen2-VL image and video
    processors sized for the tiny vision tower, and :func:`qwen_vision_tokenizer`. The video
    processor needs a working torchvision; without one this raises ``ImportError``. Returns
    the folder as a ``Path``.
    """
    from pathlib import Path

    from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    folder = Path(folder)
    tok = qwen_vision_tokenizer()
    ids = dict(zip(("vision_start_token_id", "vision_end_token_id", "image_token_id", "video_token_id"),
                   tok.convert_tokens_to_ids(list(QWEN_VISION_TOKENS))))
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = tiny_qwen2_5_vl(seed=seed, special_ids=ids, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=eos, pad_token_id=eos)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    processor = Qwen2_5_VLProcessor(
        image_processor=Qwen2VLImageProcessor(**_TINY_VISION_PROCESSING),
        video_processor=Qwen2VLVideoProcessor(**_TINY_VISION_PROCESSING),
        tokenizer=tok,
        chat_template=TINY_CHAT_TEMPLATE,
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def write_moving_shapes_video(path, *, frames: int = 8, height: int = 32, width: int = 48, fps: int = 4):
    """Write a short MPEG-4 video with PyAV: a bright square crossing a dark frame while a
    colour bar grows (a few kB). Returns the path."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i in range(frames):
            image = np.full((height, width, 3), 20, dtype=np.uint8)
            x = (i * (width - 8)) // max(frames - 1, 1)
            image[height // 2 - 4 : height // 2 + 4, x : x + 8] = (250, 240, 30)
            image[-4:, : (i + 1) * width // frames] = (30, 90, 250)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_frameless_video(path):
    """Write a container with a video stream but no frames (AVI keeps the stream header
    without packets; MP4 drops it). ``path`` should end in ``.avi``. Returns the path."""
    import av

    with av.open(str(path), mode="w", format="avi") as container:
        stream = container.add_stream("mpeg4", rate=4)
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        container.start_encoding()
    return path


def save_tiny_text_checkpoint(folder, *, seed: int = 0):
    """Save a random :func:`tiny_llama` with :func:`qwen_vision_tokenizer` (chat template
    included) into ``folder``: a text-only checkpoint that needs no vision packages. Returns
    the folder as a ``Path``."""
    from pathlib import Path

    folder = Path(folder)
    tok = qwen_vision_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")
    model = tiny_llama(seed=seed, vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=eos,
                       pad_token_id=eos)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = eos
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _torchvision_error():
    try:
        import torchvision  # noqa: F401
    except Exception as exc:  # a CUDA-only build raises RuntimeError against a CPU torch
        return f"{type(exc).__name__}: {exc}"
    return None


_TORCHVISION_ERROR = _torchvision_error()
# For tests that need transformers' Qwen2-VL video processor (save_tiny_qwen2_5_vl_checkpoint).
needs_video_processor = pytest.mark.skipif(
    _TORCHVISION_ERROR is not None,
    reason=f"transformers' Qwen2-VL video processor needs torchvision, which does not import here ({_TORCHVISION_ERROR})",
)
