"""``vreason generate``: one answer with V-Reason (or ``--base``), as text or as JSON."""

import dataclasses
import json
import math
import sys

from vreason_kernels.cli.console import TokenBar, silenced_stderr, third_party_quiet
from vreason_kernels.cli.parser import LITE_KEEP_RATIO, UsageError
from vreason_kernels.engine.config import VReasonConfig

TRACES = ("entropy", "entropy_ema", "alpha", "delta_norm")


def chat_inputs(tokenizer, prompt: str) -> dict:
    """``input_ids`` and ``attention_mask`` of one user turn, through the chat template when
    the tokenizer has one, else the plain text."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        return dict(tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                  return_dict=True))
    return dict(tokenizer(prompt, return_tensors="pt"))


def ema_peak(out) -> float:
    """The highest EMA entropy of the run (NaN when no token was decoded)."""
    ema = out.entropy_ema[~out.entropy_ema.isnan()]
    return float(ema.max()) if ema.numel() else math.nan


def _config(args) -> VReasonConfig:
    """The run's config from the flags, checked before the (slow) model load."""
    if args.base:
        chosen = [flag for flag, on in (("--lr", args.lr is not None), ("--steps", args.steps is not None),
                                        ("--lite", args.lite)) if on]
        if chosen:
            verb = "applies" if len(chosen) == 1 else "apply"
            raise UsageError(f"--base decodes plainly; {', '.join(chosen)} {verb} to V-Reason only")
        return VReasonConfig(enabled=False)
    if args.lite and args.video is None:
        raise UsageError("--lite prunes video tokens and needs --video (on a text prompt it would prune the "
                         "prompt itself)")
    fields = {name: value for name, value in (("lr", args.lr), ("steps", args.steps)) if value is not None}
    return VReasonConfig(keep_ratio=LITE_KEEP_RATIO if args.lite else 1.0, **fields)


def _check_sampling_flags(args) -> None:
    if args.temperature == 0:
        for flag, value, off in (("--top-k", args.top_k, 0), ("--top-p", args.top_p, 1.0)):
            if value != off:
                raise UsageError(f"{flag} applies to sampling: set --temperature > 0")


def _sampling(args, device) -> dict:
    """``vk.generate``'s sampling arguments: none for greedy decoding (``--temperature 0``)."""
    if args.temperature == 0:
        return {}
    import torch

    return dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                generator=torch.Generator(device=device).manual_seed(args.seed))


def _streamed(model, processor, ids, inputs, config, args, sampling):
    """Decode through ``model.generate`` and the folder form of V-Reason, printing the answer
    through a ``TextStreamer`` as it comes; returns the run's ``VReasonOutput``. ``sampling``:
    ``_sampling``'s arguments, which ``model.generate`` takes but the generator."""
    import torch
    from transformers import TextStreamer

    from vreason_kernels.integrations.transformers_generate import GENERATE_RECIPE

    sampling = {"do_sample": False, **sampling}  # greedy unless asked, whatever the model's generation config says
    if sampling.pop("generator", None) is not None:
        torch.manual_seed(args.seed)  # model.generate samples from the global generator
    streamer = TextStreamer(getattr(processor, "tokenizer", processor), skip_prompt=True, skip_special_tokens=True)
    out = model.generate(ids, custom_generate=GENERATE_RECIPE, trust_remote_code=True, vreason=config,
                         streamer=streamer, max_new_tokens=args.max_new_tokens, return_dict_in_generate=True,
                         **sampling, **inputs)
    return out.vreason


def _model_path(args) -> str:
    if args.model is not None:
        return args.model
    from vreason_kernels.loading import shipped_smollm2_path

    return str(shipped_smollm2_path())


def generate_command(args) -> int:
    import vreason_kernels.loading as loading
    from vreason_kernels.engine import generate

    config = _config(args)
    _check_sampling_flags(args)
    if args.stream and args.json:
        raise UsageError("--stream prints the answer as text while it is decoded; --json prints one object at the end")
    stream = args.stream and args.max_new_tokens > 0  # model.generate refuses to decode no token
    if args.video is not None:
        from vreason_kernels.video import check_video_file

        check_video_file(args.video)  # a bad file fails before the (slow) model load
    path = _model_path(args)
    with third_party_quiet(args.verbose):
        with silenced_stderr(args.verbose):
            model, processor = loading.load_causal_lm(path)
        sampling = _sampling(args, model.device)
        if args.video is not None:
            from vreason_kernels.video import video_chat_inputs

            inputs = video_chat_inputs(processor, args.video, args.prompt, fps=args.fps, num_frames=args.num_frames)
        else:
            inputs = chat_inputs(processor, args.prompt)
        inputs = {k: v.to(model.device) if hasattr(v, "to") else v for k, v in inputs.items()}
        ids = inputs.pop("input_ids")
        if stream:
            out = _streamed(model, processor, ids, inputs, config, args, sampling)
        else:
            with TokenBar(args.max_new_tokens, "V-Reason" if config.enabled else "base") as bar:
                out = generate(model, ids, config=config, max_new_tokens=args.max_new_tokens, progress=bar,
                               **sampling, **inputs)
    decode = processor.batch_decode if hasattr(processor, "batch_decode") else processor.tokenizer.batch_decode
    answer = decode(out.sequences[:, ids.shape[1]:], skip_special_tokens=True)[0]
    if args.json:
        print(json.dumps(_record(args, path, config, ids, answer, out), allow_nan=False, ensure_ascii=False))
    else:
        if not stream:
            print(answer)
        print(_summary(config, out), file=sys.stderr)
    return 0


def _summary(config, out) -> str:
    s = out.stats
    peak = ema_peak(out)
    mode = f"V-Reason, span {s['span_size']} tokens, {s['updates']} updates" if config.enabled else "base"
    return (f"[{mode}: {s['tokens']} tokens, {1e3 * s['time_per_token_s']:.1f} ms/token, "
            f"EMA-entropy peak {'n/a' if math.isnan(peak) else f'{peak:.3f}'}]")


def _finite_or_none(rows):
    """Nested lists of floats with NaN (after EOS) as ``None``, since JSON has no NaN."""
    return [[None if math.isnan(x) else x for x in row] for row in rows]


def _record(args, path, config, ids, answer, out) -> dict:
    """Everything about the run, JSON-ready: strict JSON (no NaN), lists not tensors."""
    new = out.sequences[:, ids.shape[1]:]
    return {
        "model": str(path),
        "prompt": args.prompt,
        "video": args.video,
        "config": {k: v if isinstance(v, (int, float, str, bool, type(None))) else repr(v)
                   for k, v in dataclasses.asdict(config).items()},
        "sampling": {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p, "seed": args.seed},
        "answer": answer,
        "prompt_tokens": ids.shape[1],
        "sequences": out.sequences.tolist(),
        "new_tokens": new.tolist(),
        "stats": out.stats,
        "traces": {name: _finite_or_none(getattr(out, name).tolist()) for name in TRACES},
    }
