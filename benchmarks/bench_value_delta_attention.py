"""Benchmark ``value_delta_attention`` at the Qwen2.5-VL-7B last-layer head layout (docs/design.md §6).

Shapes: 28 q-heads / 4 kv-heads, head_dim 128, batch 1, the delta on a span of 90% of N
(the video tokens, one contiguous run as in a real prompt).

GPU (bf16 by default, ``triton.testing.do_bench`` medians):
- decode (T = 1) forward + backward for delta_v at N = 2k, 8k, 32k: the fused Triton op vs
  the unfused path (materialise v', SDPA with GQA, autograd) and vs plain SDPA forward.
  Time is also given as a multiple of the floor: reading K, V and delta_v once at 3.0 TB/s.
- prefill forward at N = 8k (T = N, causal) vs SDPA; the floor there is compute:
  4 Hq N^2 D / 2 flops (causal) at 989 TFLOP/s dense bf16.
- peak memory above the inputs, per call (``torch.cuda.max_memory_allocated``).

CPU (fp32 by default, ``perf_counter`` medians after one warm-up call): the decode path of
backend "cpp" vs "torch" (the reference backend) vs the unfused path, at N = 2k and 8k
(32k is left out: the 2-core CI machine would take minutes per point). Peak memory is the
RSS high-water mark above the RSS before one extra call. Rows for "cpp" are skipped while
ops/value_delta_attention/cpp.py is not there.

The record (benchmarks/harness.py) goes to ``--out``, by default
``benchmarks/results/value_delta_attention_<device>[_quick].json``.

    python benchmarks/bench_value_delta_attention.py [--quick] [--device cpu] [--n 128 512]
"""

import argparse
import importlib.util
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

import vreason_kernels as vk
from vreason_kernels.ops.value_delta_attention import naive

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

HQ, HKV, D = 28, 4, 128
SPAN_FRACTION = 0.9
HBM_BYTES_PER_S = 3.0e12  # H100, measured (docs/design.md §6)
BF16_FLOPS = 989e12
DTYPES = ("float32", "bfloat16", "float16")
CPU_REPS = 15


def _inputs(n: int, t: int, dtype, device):
    q = torch.randn(1, HQ, t, D, dtype=dtype, device=device)
    k = torch.randn(1, HKV, n, D, dtype=dtype, device=device)
    v = torch.randn(1, HKV, n, D, dtype=dtype, device=device)
    start = int(n * (1 - SPAN_FRACTION) / 2)
    span = torch.arange(start, start + int(n * SPAN_FRACTION), dtype=torch.int32, device=device)
    delta = 0.01 * torch.randn(1, HKV, span.numel(), D, dtype=dtype, device=device)
    return q, k, v, delta, span


def _unfused(q, k, v, delta, span):
    """What a plain PyTorch V-Reason step does: materialise v', then SDPA (autograd for the rest)."""
    v_mod = v.index_copy(2, span.long(), naive.modulate_rows(v.index_select(2, span.long()), delta))
    return F.scaled_dot_product_attention(q, k, v_mod, is_causal=q.shape[2] > 1, enable_gqa=True)


def _fwd_bwd(attention):
    """A closure running forward + backward to delta_v (the V-Reason update's attention part)."""

    def run(q, k, v, delta, span):
        delta = delta.detach().requires_grad_()
        out = attention(q, k, v, delta, span)
        (grad,) = torch.autograd.grad(out, delta, torch.ones_like(out))
        return grad

    return run


def _timer(device, reps=CPU_REPS):
    if device.type == "cuda":
        return lambda fn: harness.time_cuda(fn)["ms"]
    return lambda fn: harness.time_cpu(fn, reps=reps, warmup=1)["ms"]


def _peak_mb(fn, device) -> float:
    return harness.mib(harness.peak_memory(fn, device.type))


def _read_floor_ms(k, v, delta) -> float:
    return sum(x.numel() * x.element_size() for x in (k, v, delta)) / HBM_BYTES_PER_S * 1e3


def _bench_case(rows, timer, device, regime, n, t, dtype, impls, floor_ms, peer):
    inputs = _inputs(n, t, dtype, device)
    times = {}
    for name, fn in impls.items():
        call = lambda fn=fn: fn(*inputs)  # noqa: E731
        times[name] = timer(call)
        rows.append(dict(
            regime=regime, N=n, T=t, dtype=str(dtype).removeprefix("torch."), impl=name,
            time_ms=times[name], peak_mem_mb=_peak_mb(call, device),
            floor_ms=floor_ms(inputs) if floor_ms else float("nan"),
        ))  # fmt: skip
    for row in rows[-len(impls):]:
        row["vs_" + peer] = row["time_ms"] / times[peer]
        row["x_floor"] = row["time_ms"] / row["floor_ms"] if floor_ms else float("nan")
        print(harness.format_row(row), flush=True)


def _gpu(rows, quick, dtype, sizes=None, reps=None):
    device = torch.device("cuda")
    timer = _timer(device)
    fused = lambda q, k, v, dv, s: vk.value_delta_attention(q, k, v, dv, s, backend="triton")  # noqa: E731
    sdpa = lambda q, k, v, dv, s: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    for n in sizes or ((2048, 8192) if quick else (2048, 8192, 32768)):
        impls = {"triton fwd+bwd": _fwd_bwd(fused), "unfused fwd+bwd": _fwd_bwd(_unfused),
                 "triton fwd": fused, "unfused fwd": _unfused, "sdpa fwd (no delta)": sdpa}  # fmt: skip
        floor = lambda x: _read_floor_ms(x[1], x[2], x[3])  # noqa: E731
        _bench_case(rows, timer, device, "decode", n, 1, dtype, impls, floor, "unfused fwd+bwd")
    n = max(sizes) if sizes else 8192
    with torch.no_grad():
        prefill = {
            "triton fwd": fused,
            "sdpa fwd (no delta)": lambda q, k, v, dv, s: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            ),
        }
        floor = lambda x: 2 * HQ * n * n * D / BF16_FLOPS * 1e3  # noqa: E731  (4 Hq N^2 D / 2 flops)
        _bench_case(rows, timer, device, "prefill", n, n, dtype, prefill, floor, "sdpa fwd (no delta)")


def _cpu(rows, quick, dtype, sizes=None, reps=CPU_REPS):
    device = torch.device("cpu")
    timer = _timer(device, reps)
    backends = ["torch"] + (["cpp"] if importlib.util.find_spec(f"{naive.__package__}.cpp") else [])
    if "cpp" not in backends:
        print("ops/value_delta_attention/cpp.py is missing: skipping the cpp rows")
    for n in sizes or ((2048,) if quick else (2048, 8192)):
        impls = {}
        for name in backends:
            op = lambda q, k, v, dv, s, name=name: vk.value_delta_attention(q, k, v, dv, s, backend=name)  # noqa: E731
            impls[f"{name} fwd+bwd"] = _fwd_bwd(op)
            impls[f"{name} fwd"] = op
        impls["unfused fwd+bwd"] = _fwd_bwd(_unfused)
        _bench_case(rows, timer, device, "decode", n, 1, dtype, impls, None, "unfused fwd+bwd")


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    harness.add_common_args(parser, dtypes=DTYPES, default_dtype=harness.DEVICE_DTYPES,
                            quick_help="fewer sizes (a smoke run)")
    parser.add_argument("--n", type=int, nargs="+", default=None,
                        help="cache lengths N to run instead of the defaults (prefill: the largest)")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    parser.add_argument("--reps", type=int, default=CPU_REPS, help=f"CPU timed calls per point (default {CPU_REPS})")
    return parser


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = harness.resolve_device_and_dtype(args)
    run = harness.Run("value_delta_attention", f"value_delta_attention ({device}, {dtype})", args, device,
                      argv=None if argv is None else [__file__, *argv])
    (_gpu if device == "cuda" else _cpu)(run.rows, args.quick, getattr(torch, dtype), args.n, args.reps)
    run.notes.append(f"Qwen2.5-VL-7B last layer: {HQ} q / {HKV} kv heads, D = {D}, B = 1, "
                     f"span = {SPAN_FRACTION:.0%} of N")
    run.notes.append("time_ms: " + ("triton.testing.do_bench" if device == "cuda" else
                                    f"median of {args.reps} time.perf_counter calls after 1 warm-up")
                     + "; vs_*: time over that peer's; x_floor: time over the floor (GPU)")
    run.notes.append("peak_mem_mb: " + ("torch.cuda.max_memory_allocated above the inputs" if device == "cuda"
                                        else "RSS high-water mark above the RSS before one extra call"))
    run.write(args.out or harness.RESULTS / f"value_delta_attention_{device}{'_quick' if args.quick else ''}.json")


if __name__ == "__main__":
    main()
