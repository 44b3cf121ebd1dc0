"""Two builds of the C++ extension side by side: are the outputs the same bits, and is one slower?

    python tools/compare_extension_builds.py OLD_C.so NEW_C.so [--reps 7] [--threads 1]

For a change to how csrc/ is built or bound (compiler flags, torch's ABI layer) that must
leave every number and the speed alone. Each build is loaded into a long-lived process of
its own (both register the namespace vreason_C, so one process cannot hold both), and the
calls alternate between the two, so that other load on the machine hits both alike. The
shapes are CPU-sized versions of the benchmarks' (docs/design.md): linear_entropy's
decode and GEMM paths at D = 2048, V = 32000, and value_delta_attention's decode at
28/4 heads, D = 128, N = 8192 with a span of 300 keys; fp32, bf16 and fp16.
"""

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from functools import partial


def cases():
    """[(name, fn)], each fn one call of an op on fixed random inputs."""
    import torch

    ops = torch.ops.vreason_C
    gen = torch.Generator().manual_seed(0)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=gen).to(dtype)

    built = []
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tag = str(dtype).removeprefix("torch.")
        dim, vocab = 2048, 32000
        weight, bias = randn(vocab, dim, dtype=dtype) * 0.05, randn(vocab, dtype=dtype)
        for rows in (1, 16, 64):  # the direct path (<= 16 rows) and the GEMM path
            hidden = randn(rows, dim, dtype=dtype)
            forward = partial(ops.linear_entropy_fwd, hidden, weight, bias, 0.7, True, True)
            entropy, _, row_max, log_sum, _ = forward()
            weight_grad = partial(ops.linear_entropy_weight_grad, hidden, weight, bias, 0.7, row_max, log_sum,
                                  entropy, randn(rows), True)
            built += [(f"linear_entropy_fwd {tag} T={rows}", forward),
                      (f"linear_entropy_weight_grad {tag} T={rows}", weight_grad)]
        heads, kv_heads, keys, head_dim, span = 28, 4, 8192, 128, 300
        key, value = randn(1, kv_heads, keys, head_dim, dtype=dtype), randn(1, kv_heads, keys, head_dim, dtype=dtype)
        delta = randn(1, kv_heads, span, head_dim, dtype=dtype) * 0.3
        span_index = torch.full((keys,), -1, dtype=torch.int32)
        span_index[1000:1000 + span] = torch.arange(span, dtype=torch.int32)
        for queries in (1, 16):
            query, attn_bias = randn(1, heads, queries, head_dim, dtype=dtype), randn(1, 1, queries, keys)
            args = (query, key, value, delta, span_index, attn_bias, head_dim**-0.5, True)
            forward = partial(ops.value_delta_attention_fwd, *args)
            _, lse = forward()
            backward = partial(ops.value_delta_attention_bwd, randn(1, heads, queries, head_dim, dtype=dtype), *args,
                               lse)
            built += [(f"value_delta_attention_fwd {tag} T={queries}", forward),
                      (f"value_delta_attention_bwd {tag} T={queries}", backward)]
    return built


def serve(library: str, threads: int) -> None:
    """One build's process: prints the case count, then answers each case index read from
    stdin with "name<TAB>digest of the outputs<TAB>seconds" of one call."""
    import torch

    torch.set_num_threads(threads)
    torch.ops.load_library(library)
    built = cases()
    print(len(built), flush=True)
    for line in sys.stdin:
        name, fn = built[int(line)]
        start = time.perf_counter()
        outputs = fn()
        seconds = time.perf_counter() - start
        digest = hashlib.sha256(b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in outputs))
        print(f"{name}\t{digest.hexdigest()}\t{seconds}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("old", help="the reference build's shared library")
    parser.add_argument("new", help="the build to compare")
    parser.add_argument("--reps", type=int, default=7, help="timed calls per case and build (after one warm-up)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process")
    parser.add_argument("--serve", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve, args.threads)

    import torch

    procs = {
        label: subprocess.Popen(
            [sys.executable, __file__, args.old, args.new, "--threads", str(args.threads), "--serve", library],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for label, library in (("old", args.old), ("new", args.new))
    }
    count = [int(proc.stdout.readline()) for proc in procs.values()][0]
    print(f"torch {torch.__version__}, {args.threads} thread(s); medians of {args.reps} calls per build, "
          "interleaved call by call")
    print(f"{'case':40s} {'old ms':>9s} {'new ms':>9s} {'new/old':>8s}  outputs")
    ratios = []
    for case in range(count):
        times, digests = {"old": [], "new": []}, set()
        for rep in range(args.reps + 1):
            for label in ("old", "new") if rep % 2 else ("new", "old"):
                procs[label].stdin.write(f"{case}\n")
                procs[label].stdin.flush()
                name, digest, seconds = procs[label].stdout.readline().rstrip("\n").split("\t")
                digests.add(digest)
                if rep:
                    times[label].append(float(seconds))
        old, new = (statistics.median(times[label]) * 1e3 for label in ("old", "new"))
        ratios.append(new / old)
        same = "identical" if len(digests) == 1 else "DIFFERENT"
        print(f"{name:40s} {old:9.2f} {new:9.2f} {new / old:8.3f}  {same}", flush=True)
    print(f"geometric mean new/old: {statistics.geometric_mean(ratios):.3f}")
    for proc in procs.values():
        proc.stdin.close()
        proc.wait()


if __name__ == "__main__":
    main()
