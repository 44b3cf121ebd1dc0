"""Benchmark of ``linear_logprob_entropy`` in an RL training step: forward + backward in
``hidden`` and the LM head ``weight`` of a GRPO-style loss ``-(A * logp).sum() - 0.01 *
entropy.sum()``, so both outputs carry a gradient.

Three paths, in the same run and on the same inputs:
- ``ours``: ``vk.linear_logprob_entropy`` (backend "auto": C++ on CPU, Triton on CUDA);
- ``materialised``: what a trainer writes by default: ``logits = hidden @ W.T`` ->
  ``log_softmax`` -> gather at the labels, and ``Categorical(logits=...).entropy()``,
  through autograd;
- ``chunked``: the usual memory fallback: the same PyTorch code over 512-row chunks, each
  under ``torch.utils.checkpoint`` so that only one chunk's [512, V] tensors live at a
  time (the backward recomputes the chunk).

CPU: ``T=512, D=1024, V=32768`` and SmolLM2-135M's head (``D=576, V=49152``) at T=512,
float32. Times are medians of ``time.perf_counter`` repetitions; each (case, path) runs in
its own subprocess, and its peak memory is the RSS high-water mark above the RSS just
before the timed calls (``harness.PeakMemory``, every allocation counted; a small call
first loads the libraries). GPU (``--device cuda``): the campaign shape ``T=4096, D=4096,
V=131072`` in bf16, timed with ``triton.testing.do_bench``; peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before.

    python benchmarks/bench_linear_logprob_entropy.py                 # CPU, float32
    python benchmarks/bench_linear_logprob_entropy.py --quick         # the smaller CPU shape only
    python benchmarks/bench_linear_logprob_entropy.py --device cuda   # the GPU campaign shape, bf16
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402
from bench_linear_entropy import make_inputs  # noqa: E402

# name: (T, D, V)
CPU_SHAPES = {"T512-D1024-V32k": (512, 1024, 32768), "SmolLM2-135M T512": (512, 576, 49152)}
GPU_SHAPES = {"T4096-D4096-V131k": (4096, 4096, 131072)}
PATHS = ("ours", "materialised", "chunked")
CHUNK_ROWS = 512
CPU_REPS = 3
ENTROPY_WEIGHT = 0.01


def plain_logprob_entropy(hidden, weight, labels):
    """The materialised path: [T, V] logits, log_softmax, gather; Categorical's entropy."""
    logits = hidden @ weight.T
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels[:, None])[:, 0]
    entropy = torch.distributions.Categorical(logits=logits.float()).entropy()
    return logp, entropy


def chunked_logprob_entropy(hidden, weight, labels):
    """``plain_logprob_entropy`` over 512-row chunks, each recomputed in the backward."""
    from torch.utils.checkpoint import checkpoint

    outs = [checkpoint(plain_logprob_entropy, hidden[i:i + CHUNK_ROWS], weight, labels[i:i + CHUNK_ROWS],
                       use_reentrant=False) for i in range(0, hidden.shape[0], CHUNK_ROWS)]
    return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])


def step_fn(path, hidden, weight, labels, advantages):
    """One forward + backward of the GRPO-style loss for ``path``."""
    import vreason_kernels as vk

    fn = {"ours": lambda h, w, y: vk.linear_logprob_entropy(h, w, y), "materialised": plain_logprob_entropy,
          "chunked": chunked_logprob_entropy}[path]

    def run():
        hidden.grad = weight.grad = None
        logp, entropy = fn(hidden, weight, labels)
        (-(advantages * logp).sum() - ENTROPY_WEIGHT * entropy.sum()).backward()
    return run


def inputs(tokens, dim, vocab, dtype, device):
    hidden, weight = make_inputs(dim, vocab, tokens, dtype, device)
    weight.requires_grad_()
    gen = torch.Generator(device="cpu").manual_seed(1)
    labels = torch.randint(0, vocab, (tokens,), generator=gen).to(device)
    advantages = torch.randn(tokens, generator=gen).to(device)
    return hidden, weight, labels, advantages


def cpu_case(name, path, dtype_name):
    """Runs in a subprocess: the timing and peak-RSS delta of one (shape, path)."""
    tokens, dim, vocab = CPU_SHAPES[name]
    dtype = getattr(torch, dtype_name)
    step_fn(path, *inputs(16, dim, 4099, dtype, "cpu"))()  # loads libraries, starts the thread pool
    run = step_fn(path, *inputs(tokens, dim, vocab, dtype, "cpu"))
    memory = harness.PeakMemory("cpu").start()
    timing = harness.time_cpu(run, reps=CPU_REPS, warmup=1)
    return {"ms": timing["ms"], "reps": timing["reps"], "peak_mb": harness.mib(memory.stop())}



def _ratios(row):
    for peer in ("materialised", "chunked"):
        if "ours_ms" in row and f"{peer}_ms" in row:
            row[f"time_vs_{peer}"] = row["ours_ms"] / row[f"{peer}_ms"]
        if row.get("ours_peak_mb") and row.get(f"{peer}_peak_mb"):
            row[f"memory_vs_{peer}"] = row["ours_peak_mb"] / row[f"{peer}_peak_mb"]


def bench_cpu(names, dtype_name):
    rows = []
    for name in names:
        tokens, dim, vocab = CPU_SHAPES[name]
        row = {"shape": name, "T": tokens, "D": dim, "V": vocab}
        for path in PATHS:
            res = harness.case_in_subprocess(__file__, name, path, dtype_name)
            if "error" in res:
                row["note"] = (row.get("note", "") + f" {path}: {res['error']}").strip()
                continue
            row[f"{path}_ms"], row[f"{path}_peak_mb"], row["reps"] = res["ms"], res["peak_mb"], res["reps"]
        _ratios(row)
        rows.append(row)
        print(harness.format_row(row), flush=True)
    return rows


def bench_gpu(names, dtype_name):
    dtype = getattr(torch, dtype_name)
    rows = []
    for name in names:
        tokens, dim, vocab = GPU_SHAPES[name]
        data = inputs(tokens, dim, vocab, dtype, "cuda")
        row = {"shape": name, "T": tokens, "D": dim, "V": vocab}
        for path in PATHS:
            try:
                run = step_fn(path, *data)
                run()  # compile / autotune outside the timing and the memory peak
                row[f"{path}_peak_mb"] = harness.mib(harness.peak_memory(run, "cuda"))
                row[f"{path}_ms"] = harness.time_cuda(run)["ms"]
            except torch.cuda.OutOfMemoryError:
                row["note"] = (row.get("note", "") + f" {path}: out of memory").strip()
                torch.cuda.empty_cache()
        _ratios(row)
        rows.append(row)
        print(harness.format_row(row), flush=True)
    return rows


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, dtypes=("float32", "bfloat16", "float16"), default_dtype=harness.DEVICE_DTYPES,
                            quick_help=f"only {next(iter(CPU_SHAPES))} on CPU", cases=True)
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if harness.serve_case(args, cpu_case):  # a worker of the CPU benchmark
        return
    device, dtype = harness.resolve_device_and_dtype(args)
    run = harness.Run("linear_logprob_entropy",
                      f"linear_logprob_entropy: GRPO-style loss, forward + backward in hidden and W ({device}, {dtype})",
                      args, device, argv=None if argv is None else [__file__, *argv])
    run.notes.append("paths: ours = vk.linear_logprob_entropy (backend auto); materialised = logits -> log_softmax -> "
                     "gather + Categorical entropy; chunked = the same over 512-row chunks under "
                     "torch.utils.checkpoint. time_vs_* / memory_vs_*: ours divided by the peer (below 1: ours is "
                     "faster / smaller)")
    if device == "cuda":
        run.rows = bench_gpu(list(GPU_SHAPES), dtype)
        run.notes.append("time: triton.testing.do_bench; peak_mb: torch.cuda.max_memory_allocated above the start")
    else:
        names = list(CPU_SHAPES)[:1] if args.quick else list(CPU_SHAPES)
        run.rows = bench_cpu(names, dtype)
        run.notes += [f"time: median of {CPU_REPS} time.perf_counter repetitions after one warm-up",
                      "peak_mb: RSS high-water mark (VmHWM, reset after setup) minus RSS before the timed calls, "
                      "one subprocess per path; it includes the gradients of hidden and W (the same in every path)"]
    tag = "_quick" if args.quick else ""
    run.write(args.out or harness.RESULTS / f"linear_logprob_entropy_{device}_{dtype}{tag}.json")


if __name__ == "__main__":
    main()
