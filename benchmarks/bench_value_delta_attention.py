"""Benchmark ``value_delta_attention`` at the Qwen2.5-VL-7B last-layer head layout (DESIGN.md §6).

Shapes: 28 q-heads / 4 kv-heads, head_dim 128, batch 1, the delta on a span of 90% of N
(the video tokens, one contiguous run as in a real prompt).

GPU (bf16, ``triton.testing.do_bench`` medians):
- decode (T = 1) forward + backward for delta_v at N = 2k, 8k, 32k: the fused Triton op vs
  the unfused path (materialise v', SDPA with GQA, autograd) and vs plain SDPA forward.
  Time is also given as a multiple of the floor: reading K, V and delta_v once at 3.0 TB/s.
- prefill forward at N = 8k (T = N, causal) vs SDPA; the floor there is compute:
  4 Hq N^2 D / 2 flops (causal) at 989 TFLOP/s dense bf16.
- peak memory above the inputs, per call.

CPU (fp32, ``perf_counter`` medians): the decode path of backend "cpp" vs "torch" (the
reference backend) vs the unfused path, at N = 2k and 8k (32k is left out: the 2-core CI
machine would take minutes per point). Rows for "cpp" are skipped while
ops/value_delta_attention/cpp.py is not there.

Writes benchmarks/results/value_delta_attention_{cpu,cuda}.{csv,md} with device, versions
and date. Run: ``python benchmarks/bench_value_delta_attention.py [--quick]``.
"""

import argparse
import csv
import datetime
import importlib.util
import pathlib
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import vreason_kernels as vk
from vreason_kernels.ops.value_delta_attention import naive

HQ, HKV, D = 28, 4, 128
SPAN_FRACTION = 0.9
HBM_BYTES_PER_S = 3.0e12  # H100, measured (DESIGN.md §6)
BF16_FLOPS = 989e12
RESULTS = pathlib.Path(__file__).resolve().parent / "results"


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


def _timer(device):
    if device.type == "cuda":
        import triton

        return lambda fn: triton.testing.do_bench(fn, warmup=25, rep=100)

    def cpu_median(fn, reps=15):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
        return statistics.median(times)

    return cpu_median


def _peak_mb(fn, device) -> float:
    if device.type != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


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
        print({key: (f"{val:.4g}" if isinstance(val, float) else val) for key, val in row.items()}, flush=True)


def _gpu(rows, quick):
    device = torch.device("cuda")
    timer = _timer(device)
    fused = lambda q, k, v, dv, s: vk.value_delta_attention(q, k, v, dv, s, backend="triton")  # noqa: E731
    sdpa = lambda q, k, v, dv, s: F.scaled_dot_product_attention(q, k, v, enable_gqa=True)  # noqa: E731
    for n in (2048, 8192) if quick else (2048, 8192, 32768):
        impls = {"triton fwd+bwd": _fwd_bwd(fused), "unfused fwd+bwd": _fwd_bwd(_unfused),
                 "triton fwd": fused, "unfused fwd": _unfused, "sdpa fwd (no delta)": sdpa}  # fmt: skip
        floor = lambda x: _read_floor_ms(x[1], x[2], x[3])  # noqa: E731
        _bench_case(rows, timer, device, "decode", n, 1, torch.bfloat16, impls, floor, "unfused fwd+bwd")
    n = 8192
    with torch.no_grad():
        prefill = {
            "triton fwd": fused,
            "sdpa fwd (no delta)": lambda q, k, v, dv, s: F.scaled_dot_product_attention(
                q, k, v, is_causal=True, enable_gqa=True
            ),
        }
        floor = lambda x: 2 * HQ * n * n * D / BF16_FLOPS * 1e3  # noqa: E731  (4 Hq N^2 D / 2 flops)
        _bench_case(rows, timer, device, "prefill", n, n, torch.bfloat16, prefill, floor, "sdpa fwd (no delta)")


def _cpu(rows, quick):
    device = torch.device("cpu")
    timer = _timer(device)
    backends = ["torch"] + (["cpp"] if importlib.util.find_spec(f"{naive.__package__}.cpp") else [])
    if "cpp" not in backends:
        print("ops/value_delta_attention/cpp.py is missing: skipping the cpp rows")
    for n in (2048,) if quick else (2048, 8192):
        impls = {}
        for name in backends:
            op = lambda q, k, v, dv, s, name=name: vk.value_delta_attention(q, k, v, dv, s, backend=name)  # noqa: E731
            impls[f"{name} fwd+bwd"] = _fwd_bwd(op)
            impls[f"{name} fwd"] = op
        impls["unfused fwd+bwd"] = _fwd_bwd(_unfused)
        _bench_case(rows, timer, device, "decode", n, 1, torch.float32, impls, None, "unfused fwd+bwd")


def _environment(device: str) -> dict:
    env = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               torch=torch.__version__, python=platform.python_version(), threads=torch.get_num_threads())  # fmt: skip
    if device == "cuda":
        import triton

        env.update(device=torch.cuda.get_device_name(), triton=triton.__version__)
    else:
        env.update(device=platform.processor() or platform.machine(), cores=len(__import__("os").sched_getaffinity(0)))
    return env


def _write(rows, device: str) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    env = _environment(device)
    fields = list(dict.fromkeys(key for row in rows for key in row))
    stem = RESULTS / f"value_delta_attention_{device}"
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        f.write("".join(f"# {key}: {val}\n" for key, val in env.items()))
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda val: f"{val:.4g}" if isinstance(val, float) else str(val)  # noqa: E731
    lines = [f"# value_delta_attention benchmark ({device})", ""]
    lines += [f"- {key}: {val}" for key, val in env.items()]
    lines += ["", "Qwen2.5-VL-7B last layer: 28 q / 4 kv heads, D = 128, B = 1, span = 90% of N.", ""]
    lines += ["| " + " | ".join(fields) + " |", "|" + "---|" * len(fields)]
    lines += ["| " + " | ".join(fmt(row.get(key, "")) for key in fields) + " |" for row in rows]
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem}.csv and .md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sizes (a smoke run)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    rows: list = []
    (_gpu if device == "cuda" else _cpu)(rows, args.quick)
    _write(rows, device)


if __name__ == "__main__":
    main()
