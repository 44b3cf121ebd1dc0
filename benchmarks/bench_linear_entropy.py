"""Benchmark of the fused linear entropy: forward + backward in ``hidden`` (weight frozen).

What is timed: ``entropy = linear_entropy(hidden, W); entropy.sum().backward()``, i.e.
the entropy and dH/dhidden of a decode step (T=1), a short burst (T=16) and a
prefill-sized block (T=4096), at the Qwen2.5-VL-3B and -7B lm-head shapes (docs/design.md §6).

CPU: the C++ backend against the PyTorch reference (matmul -> log_softmax -> entropy ->
autograd backward; ``naive.linear_entropy``) in the same run. Times are medians of
``time.perf_counter`` repetitions (``harness.time_cpu``). Each (case, backend) runs in its
own subprocess so that peak memory is that process's RSS high-water mark above its RSS just
before the timed calls (``harness.PeakMemory``; a small call first loads the libraries;
inputs are built in their final dtype, in slices, so building them leaves no higher mark).
This counts every allocation, torch's included, which tracemalloc would not see.

GPU (when CUDA is available): the Triton backend against the same reference and, when
importable, Liger-Kernel's fused linear cross-entropy (the loss, and from 0.8.2 the
scaled variant with an entropy output, whose entropy is what is differentiated) and
ml-cross-entropy (``cut_cross_entropy.linear_cross_entropy``, the loss from its LSE): same
cost class (one lm-head GEMM forward, one backward, no logits kept). Timed with
``triton.testing.do_bench``; time is also given as a multiple of the floor of one read of W
at ``--bandwidth`` (docs/design.md §6: about 3.0 TB/s on an H100). Peak memory is
``torch.cuda.max_memory_allocated`` above what was allocated before the call.

The record (benchmarks/harness.py) goes to ``--out``, by default
``benchmarks/results/linear_entropy_<device>_<dtype>[_quick|_T...].json``.

    python benchmarks/bench_linear_entropy.py                   # full run, fp32 (CPU) / bf16 (CUDA)
    python benchmarks/bench_linear_entropy.py --dtype bfloat16
    python benchmarks/bench_linear_entropy.py --quick           # T=1, 16 at the 3B shape
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

SHAPES = {"3B": (2048, 151936), "7B": (3584, 152064)}  # (D, V), docs/design.md §6
TOKENS = (1, 16, 4096)
DTYPES = ("float32", "bfloat16", "float16")
# CPU repetitions per T: T=4096 runs for tens of seconds per call on 2 cores.
CPU_REPS = {1: 15, 16: 7, 4096: 1}
# Reference peak at large T: logits plus about five more [T, V] fp32 tensors in forward
# and backward (z, exp, p * z, their grads); a case whose estimate exceeds the free
# memory is skipped rather than letting the machine swap or the OOM killer strike.
REFERENCE_TV_COPIES = 6


def make_inputs(dim, vocab, tokens, dtype, device):
    """W ~ N(0, 0.02^2) like an lm head, hidden ~ N(0, 1); built slice by slice in dtype."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    weight = torch.empty(vocab, dim, dtype=dtype, device=device)
    for start in range(0, vocab, 8192):
        block = torch.randn(min(8192, vocab - start), dim, generator=gen) * 0.02
        weight[start : start + block.shape[0]] = block.to(device=device, dtype=dtype)
    hidden = torch.randn(tokens, dim, generator=gen).to(device=device, dtype=dtype).requires_grad_()
    return hidden, weight


def step_fn(backend, hidden, weight):
    """One forward + backward in hidden for `backend`."""
    import vreason_kernels as vk
    from vreason_kernels.ops.linear_entropy import naive

    if backend == "torch":
        def run():
            hidden.grad = None
            naive.linear_entropy(hidden, weight).sum().backward()
    elif backend in ("cpp", "triton"):
        def run():
            hidden.grad = None
            vk.linear_entropy(hidden, weight, backend=backend).sum().backward()
    elif backend == "liger":
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        loss_fn = LigerFusedLinearCrossEntropyLoss()
        target = torch.randint(0, weight.shape[0], (hidden.shape[0],), device=hidden.device)

        def run():
            hidden.grad = None
            loss_fn(weight, hidden, target).backward()
    elif backend == "liger_entropy":
        apply, _ = liger_entropy_apply(hidden.device)
        target = torch.randint(0, weight.shape[0], (hidden.shape[0],), device=hidden.device)

        def run():
            hidden.grad = None
            _, entropy = apply(hidden, weight, target)
            entropy.sum().backward()
    elif backend == "cce":
        from cut_cross_entropy import linear_cross_entropy

        target = torch.randint(0, weight.shape[0], (hidden.shape[0],), device=hidden.device)

        def run():
            hidden.grad = None
            linear_cross_entropy(hidden, weight, target).backward()
    else:
        raise ValueError(f"unknown backend {backend!r}")
    return run


def liger_entropy_apply(device):
    """Liger's fused linear cross-entropy with an entropy output (liger-kernel >= 0.8.2) as
    ``f(hidden, weight, target) -> (nll, entropy)``, and which implementation runs.

    Its dispatcher picks a CuTe DSL kernel on sm_90, which imports nvidia-cutlass-dsl (not on
    the GPU image, and over the device tool's carry limit); where that import fails, Liger's
    portable path (512-token chunks of PyTorch) is called explicitly and named as such.
    """
    from liger_kernel.ops import fused_linear_scaled_cross_entropy as scaled

    try:
        scaled._resolve_implementation(device)
    except ImportError as exc:
        def fallback(hidden, weight, target):
            return scaled._FusedLinearPPOFallbackFunction.apply(hidden, weight, target, 1.0, -100, True)
        return fallback, f"Liger's portable chunked-PyTorch path (its sm_90 CuTe DSL kernel: {exc})"

    def native(hidden, weight, target):
        return scaled.LigerFusedLinearScaledCrossEntropyFunction.apply(hidden, weight, target, return_entropy=True)
    return native, "LigerFusedLinearScaledCrossEntropyFunction (device dispatch)"


# ------------------------------------------------------------------------ CPU


def cpu_case(shape, tokens, dtype_name, backend):
    """Runs in a subprocess: returns timing and peak-RSS delta of one (case, backend)."""
    dim, vocab = SHAPES[shape]
    dtype = getattr(torch, dtype_name)
    # A small call first pages in the libraries and starts the thread pool, so that
    # the RSS delta below is the call's own working memory.
    step_fn(backend, *make_inputs(dim, 4099, min(tokens, 16), dtype, "cpu"))()
    hidden, weight = make_inputs(dim, vocab, tokens, dtype, "cpu")
    run = step_fn(backend, hidden, weight)
    memory = harness.PeakMemory("cpu").start()
    reps = CPU_REPS[tokens]
    # One warm-up unless a single run is all we afford.
    timing = harness.time_cpu(run, reps=reps, warmup=1 if reps > 1 else 0)
    return {"ms": timing["ms"], "reps": timing["reps"], "peak_mb": harness.mib(memory.stop())}



def available_memory():
    """MemAvailable from /proc/meminfo in bytes (inf where it cannot be read)."""
    try:
        with open("/proc/meminfo") as f:
            return 1024 * next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return float("inf")


def reference_fits(dim, vocab, tokens, dtype):
    elem = torch.empty(0, dtype=dtype).element_size()
    need = REFERENCE_TV_COPIES * tokens * vocab * 4 + vocab * dim * elem
    return need < 0.8 * available_memory(), need


def bench_cpu(cases, dtype_name):
    dtype = getattr(torch, dtype_name)
    rows = []
    for shape, tokens in cases:
        dim, vocab = SHAPES[shape]
        row = {"shape": shape, "D": dim, "V": vocab, "T": tokens}
        for backend in ("cpp", "torch"):
            if backend == "torch":
                fits, need = reference_fits(dim, vocab, tokens, dtype)
                if not fits:
                    row["note"] = f"torch reference skipped: needs ~{need / 2**30:.1f} GiB"
                    continue
            res = harness.case_in_subprocess(__file__, shape, tokens, dtype_name, backend)
            if "error" in res:
                row["note"] = f"{backend}: {res['error']}"
                continue
            row[f"{backend}_ms"] = res["ms"]
            row[f"{backend}_peak_mb"] = res["peak_mb"]
            row["reps"] = res["reps"]
        if "cpp_ms" in row and "torch_ms" in row:
            row["speedup"] = row["torch_ms"] / row["cpp_ms"]
        rows.append(row)
        print(harness.format_row(row), flush=True)
    return rows


# ------------------------------------------------------------------------ GPU


def bench_gpu(cases, dtype_name, bandwidth):
    import importlib.util

    dtype = getattr(torch, dtype_name)
    peers = ["triton", "torch"]
    notes = []
    for name, module in (("liger", "liger_kernel"), ("cce", "cut_cross_entropy")):
        if importlib.util.find_spec(module) is None:
            notes.append(f"{name} skipped: {module} is not importable")
        else:
            peers.append(name)
    if "liger" in peers:
        try:
            notes.append(f"liger_entropy: {liger_entropy_apply(torch.device('cuda'))[1]}; entropy.sum() backward")
            peers.append("liger_entropy")
        except ImportError as exc:  # liger-kernel older than 0.8.2
            notes.append(f"liger_entropy skipped: {exc}")
    notes.append("liger: LigerFusedLinearCrossEntropyLoss (loss only); cce: cut_cross_entropy.linear_cross_entropy "
                 "(loss from its LSE); both backward in hidden")
    rows = []
    for shape, tokens in cases:
        dim, vocab = SHAPES[shape]
        hidden, weight = make_inputs(dim, vocab, tokens, dtype, "cuda")
        floor_ms = 1e3 * weight.numel() * weight.element_size() / bandwidth
        row = {"shape": shape, "D": dim, "V": vocab, "T": tokens, "floor_ms": floor_ms}
        for backend in peers:
            try:
                run = step_fn(backend, hidden, weight)
                run()  # compile / autotune outside the timing and the memory peak
                row[f"{backend}_peak_mb"] = harness.mib(harness.peak_memory(run, "cuda"))
                row[f"{backend}_ms"] = harness.time_cuda(run)["ms"]
                row[f"{backend}_x_floor"] = row[f"{backend}_ms"] / floor_ms
            except torch.cuda.OutOfMemoryError:
                row["note"] = (row.get("note", "") + f" {backend}: out of memory").strip()
                torch.cuda.empty_cache()
            except Exception as exc:  # a peer's failure is reported; ours stops the run
                if backend in ("triton", "torch"):
                    raise
                row["note"] = (row.get("note", "") + f" {backend}: {type(exc).__name__}: {exc}"[:200]).strip()
        if "triton_ms" in row and "torch_ms" in row:
            row["speedup"] = row["torch_ms"] / row["triton_ms"]
        rows.append(row)
        print(harness.format_row(row), flush=True)
        del hidden, weight
        torch.cuda.empty_cache()
    return rows, notes


# ------------------------------------------------------------------------ command line


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    harness.add_common_args(parser, dtypes=DTYPES, default_dtype=harness.DEVICE_DTYPES,
                            quick_help="T=1 and 16 at the 3B shape only", cases=True)
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help=f"subset of {TOKENS}")
    parser.add_argument("--bandwidth", type=float, default=3.0e12, help="GPU memory bandwidth for the floor, B/s")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    if harness.serve_case(args, cpu_case):  # a worker of the CPU benchmark
        return

    device, dtype = harness.resolve_device_and_dtype(args)
    tokens = (1, 16) if args.quick else tuple(args.tokens or TOKENS)
    shapes = ("3B",) if args.quick else tuple(SHAPES)
    cases = [(shape, t) for shape in shapes for t in tokens]
    run = harness.Run("linear_entropy", f"linear_entropy forward + backward in hidden ({device}, {dtype})",
                      args, device, argv=None if argv is None else [__file__, *argv])
    if device == "cuda":
        run.rows, notes = bench_gpu(cases, dtype, args.bandwidth)
        run.notes += notes
        run.notes.append(f"floor: one read of W at {args.bandwidth / 1e12:.2f} TB/s; times from triton.testing.do_bench")
    else:
        run.rows = bench_cpu(cases, dtype)
        run.notes += [
            "time: median of time.perf_counter repetitions (column reps; T=4096 runs once, no warm-up)",
            "peak_mb: RSS high-water mark (VmHWM, reset after setup) minus RSS before the timed calls, "
            "one subprocess per backend",
        ]
    tag = "_quick" if args.quick else "_T" + "-".join(map(str, tokens)) if args.tokens else ""
    run.write(args.out or harness.RESULTS / f"linear_entropy_{device}_{dtype}{tag}.json")


if __name__ == "__main__":
    main()
