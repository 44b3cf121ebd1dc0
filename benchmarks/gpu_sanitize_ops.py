"""One call of each op's every Triton kernel on CUDA, small and odd-sized, for compute-sanitizer.

    compute-sanitizer --tool memcheck python benchmarks/gpu_sanitize_ops.py [--dtype bfloat16]

linear_entropy: T=1 (decode kernel + merge), T=19 (partials + merge), and the weight
gradient; value_delta_attention: decode (split forward, merge, fused dQ backward) and
prefill with a mask (forward, dV and dQ kernels); prune_kv. Outputs are checked finite.
"""

import argparse
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import vreason_kernels as vk  # noqa: E402


def linear_entropy_calls(dtype):
    vocab, dim = 4099, 200
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5).to(dtype)
    for rows in (1, 19):
        hidden = torch.randn(rows, dim, device="cuda", dtype=dtype, requires_grad=True)
        entropy, logits = vk.linear_entropy(hidden, weight, return_logits=True, backend="triton")
        entropy.sum().backward()
        yield f"linear_entropy T={rows}", (entropy, logits, hidden.grad)
    hidden = torch.randn(7, dim, device="cuda", dtype=dtype)
    trainable = weight.detach().clone().requires_grad_()
    vk.linear_entropy(hidden, trainable, backend="triton").sum().backward()
    yield "linear_entropy weight grad", (trainable.grad,)


def attention_calls(dtype):
    hq, hkv, d, n = 7, 1, 128, 1237
    key = torch.randn(1, hkv, n, d, device="cuda", dtype=dtype)
    value = torch.randn(1, hkv, n, d, device="cuda", dtype=dtype)
    span = torch.arange(100, 1100, device="cuda")
    for t, mask in ((1, None), (61, torch.rand(1, 1, 61, n, device="cuda") > 0.1)):
        query = torch.randn(1, hq, t, d, device="cuda", dtype=dtype, requires_grad=True)
        delta = torch.randn(1, hkv, span.numel(), d, device="cuda", dtype=dtype, requires_grad=True)
        out = vk.value_delta_attention(query, key, value, delta, span, attention_mask=mask, backend="triton")
        out.float().square().sum().backward()
        yield f"value_delta_attention T={t}", (out, query.grad, delta.grad)
    kept = vk.prune_kv(key, value, span, keep_ratio=0.5)
    yield "prune_kv", kept[:2]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    for calls in (linear_entropy_calls, attention_calls):
        for name, outputs in calls(getattr(torch, args.dtype)):
            torch.cuda.synchronize()
            bad = [i for i, x in enumerate(outputs) if not torch.isfinite(x.float()).all()]
            print(f"{name}: {'non-finite output ' + str(bad) if bad else 'ok'}")
            if bad:
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
