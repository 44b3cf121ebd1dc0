"""``VReasonLMM``: the lmms-eval model behind ``--model vreason``.

One request is decoded at a time by :func:`vreason_kernels.generate` (every video has its
own span: the positions of its video tokens). lmms-eval shards the requests over the
processes of its ``accelerate launch``; each process holds a full model copy on its own
GPU, so no model wrapping is needed for inference.

Per sample it reports the answer and its token counts through lmms-eval's own
``GenerationResult``, and logs the output tokens, entropy statistics and per-token
latency (a JSON line per sample in ``stats_path`` when given, and loguru at INFO).
"""

import dataclasses
import json
from pathlib import Path
from typing import List, Optional

import torch
from accelerate import Accelerator
from loguru import logger
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from vreason_kernels.engine import VReasonConfig, VReasonOutput, generate
from vreason_kernels.loading import load_causal_lm
from vreason_kernels.video import video_chat_inputs

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
CONFIG_FIELDS = {f.name: f for f in dataclasses.fields(VReasonConfig)}
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class VReasonLMM(lmms):
    """V-Reason decoding of a local or cached Hugging Face checkpoint (Qwen2.5-VL for videos).

    Model args (``--model_args key=value,...``):
        pretrained: checkpoint folder (or ``.gguf`` file), as :func:`load_causal_lm` takes.
        dtype: ``bfloat16`` (default), ``float16`` or ``float32``.
        device: default ``cuda`` where available, else ``cpu``; under a multi-process
            ``accelerate launch`` each process takes ``cuda:<local rank>``.
        batch_size: must be 1 (one request per :func:`vk.generate` call).
        fps, num_frames: frame sampling of the processor (default: the processor's, else 2 fps).
        max_new_tokens: default answer budget where the task gives none (default 1024).
        system_prompt: optional system turn.
        stats_path: JSON-lines file the per-sample statistics are appended to (per
            process: ``.rank<r>`` is added to the name when ``accelerate`` runs several).
        every other key: a :class:`vk.VReasonConfig` field (``enabled=False`` is the base
            model; ``lr``, ``steps``, ``every``, ``ema_beta``, ``keep_ratio``, ...).
    """

    def __init__(
        self,
        pretrained: str,
        dtype: str = "bfloat16",
        device: Optional[str] = None,
        batch_size: int = 1,
        fps: Optional[float] = None,
        num_frames: Optional[int] = None,
        max_new_tokens: int = 1024,
        system_prompt: Optional[str] = None,
        stats_path: Optional[str] = None,
        **config_args,
    ) -> None:
        super().__init__()
        if int(batch_size) != 1:
            raise ValueError(f"batch_size: vreason decodes one request at a time, got {batch_size}")
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.config = vreason_config(config_args)
        accelerator = Accelerator()
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if self._world_size > 1:
            device = f"cuda:{accelerator.local_process_index}"
        elif device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model, self.processor = load_causal_lm(pretrained, dtype=DTYPES[dtype], device=str(self._device))
        self.tokenizer = getattr(self.processor, "tokenizer", self.processor)
        self.fps, self.num_frames = fps, num_frames
        self.max_new_tokens = int(max_new_tokens)
        self.system_prompt = system_prompt
        self.stats_path = None
        if stats_path:
            suffix = f".rank{self._rank}" if self._world_size > 1 else ""
            self.stats_path = Path(f"{stats_path}{suffix}")
            self.stats_path.parent.mkdir(parents=True, exist_ok=True)
        self.sample_stats: List[dict] = []

    @property
    def batch_size(self) -> int:
        return 1

    @property
    def device(self) -> torch.device:
        return self._device

    def loglikelihood(self, requests):
        raise NotImplementedError("vreason generates answers; loglikelihood tasks are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("vreason answers single-round tasks (generate_until)")

    def generate_until(self, requests: List[Instance]) -> List[GenerationResult]:
        results = []
        for request in tqdm(requests, disable=self._rank != 0, desc="V-Reason decoding"):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
            text, stats = self.answer(context, visuals, dict(gen_kwargs or {}))
            stats.update(task=task, doc_id=doc_id)
            self.log_sample(stats)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(GenerationResult(
                text=text, token_counts=TokenCounts(input_tokens=stats["input_tokens"], output_tokens=stats["tokens"])
            ))
        return results

    def answer(self, context: str, visuals, gen_kwargs: dict):
        """Decode one request; returns ``(answer, statistics)``."""
        inputs = self.inputs(context, visuals)
        inputs = {k: v.to(self._device) if hasattr(v, "to") else v for k, v in inputs.items()}
        ids = inputs.pop("input_ids")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) and temperature > 0
        sampling = dict(temperature=temperature, top_p=float(gen_kwargs.get("top_p") or 1.0)) if do_sample else {}
        out = generate(
            self.model, ids, config=self.config, do_sample=do_sample,
            max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens), **sampling, **inputs,
        )
        text = self.tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
        until = gen_kwargs.get("until") or []
        for stop in [until] if isinstance(until, str) else until:
            # A blank line is not a stop: reasoning answers have paragraphs (lmms-eval's own
            # Qwen2.5-VL model drops it too, so base runs stay comparable with it).
            if stop and stop != "\n\n":
                text = text.split(stop)[0]
        return text, sample_statistics(out, input_tokens=ids.shape[1], enabled=self.config.enabled)

    def inputs(self, context: str, visuals) -> dict:
        """Processor inputs for the request: one video and the context, or the context alone."""
        visuals = [v for v in (visuals or []) if v is not None]
        videos = [v for v in visuals if isinstance(v, (str, Path)) and str(v).lower().endswith(VIDEO_SUFFIXES)]
        if len(videos) != len(visuals) or len(videos) > 1:
            raise ValueError(f"vreason takes one video file per request (or none), got {visuals!r}")
        if videos:
            return video_chat_inputs(self.processor, videos[0], context, fps=self.fps, num_frames=self.num_frames,
                                     system_prompt=self.system_prompt)
        messages = [{"role": "user", "content": context}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return dict(self.processor.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ))

    def log_sample(self, stats: dict):
        self.sample_stats.append(stats)
        logger.info(f"vreason sample {stats['task']}/{stats['doc_id']}: {stats['tokens']} tokens, "
                    f"{1e3 * stats['time_per_token_s']:.1f} ms/token, EMA peak {stats['entropy_ema_peak']:.3f} "
                    f"at token {stats['entropy_ema_peak_token']}")
        if self.stats_path is not None:
            with self.stats_path.open("a") as f:
                f.write(json.dumps(stats) + "\n")


def vreason_config(args: dict) -> VReasonConfig:
    """A :class:`vk.VReasonConfig` from lmms-eval model args, whose parser turns ``-1`` and
    ``2`` into floats and ints and leaves ``None`` a string."""
    unknown = sorted(set(args) - set(CONFIG_FIELDS))
    if unknown:
        raise ValueError(f"vreason model_args: unknown {unknown}; VReasonConfig fields are {sorted(CONFIG_FIELDS)}")
    fields = {}
    for name, value in args.items():
        if isinstance(value, str) and value.lower() == "none":
            value = None
        elif isinstance(value, float) and value.is_integer() and name in ("steps", "every", "layer"):
            value = int(value)
        fields[name] = value
    return VReasonConfig(**fields)


def sample_statistics(out: VReasonOutput, *, input_tokens: int, enabled: bool) -> dict:
    """Output tokens, entropy statistics and latency of a one-sample :class:`vk.VReasonOutput`."""
    tokens = int(out.stats["tokens"])
    entropy, ema = out.entropy[0, :tokens].double(), out.entropy_ema[0, :tokens].double()
    peak = int(ema.argmax()) if tokens else -1
    return dict(
        vreason=enabled,
        input_tokens=int(input_tokens),
        tokens=tokens,
        span_size=int(out.stats["span_size"]),
        updates=int(out.stats["updates"]),
        prefill_s=float(out.stats["prefill_s"]),
        time_per_token_s=float(out.stats["time_per_token_s"]),
        wall_s=float(out.stats["wall_s"]),
        peak_memory_bytes=out.stats["peak_memory_bytes"],
        entropy_mean=float(entropy.mean()) if tokens else float("nan"),
        entropy_max=float(entropy.max()) if tokens else float("nan"),
        entropy_ema_peak=float(ema[peak]) if tokens else float("nan"),
        entropy_ema_peak_token=peak + 1,
        entropy_ema_last=float(ema[-1]) if tokens else float("nan"),
    )
