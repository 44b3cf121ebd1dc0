"""Compile the package's Triton kernels for a GPU that is not there, as the launchers would.

The launch arguments are not written down here. The launchers' own backend functions
(``ops/*/triton_backend.py``: ``forward``, ``backward``, ``weight_grad``) are called with
``meta`` tensors (shapes and dtypes, no memory) at docs/design.md §6 shapes, while every
``@triton.jit`` kernel and autotuner in their modules is swapped for a recorder that keeps
``kernel[grid](*args, **kwargs)``. The SM count the launchers size their grids by is the
target's. Each recorded launch is then specialised by Triton's own binder (as
``JITFunction.run`` does: a 1 becomes a constant, multiples of 16 and 16-byte aligned
pointers get divisibility hints; meta tensors sit at address 0 plus their view offset,
as a fresh CUDA allocation would) and compiled with ``triton.compile`` for the target;
an autotuner's launch is expanded into every config its prune keeps. So a kernel whose
signature or launch configuration changes needs no edit here.

``cuobjdump --dump-resource-usage`` (shipped in the triton wheel) reads REG, STACK (spill
frame), LOCAL and SHARED back from the cubin.

Needs TRITON_INTERPRET unset (an interpreted ``@triton.jit`` cannot be compiled); it is
dropped here before triton is imported.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import inspect
import json
import os
import pathlib
import re
import subprocess
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is the default

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

import vreason_kernels.ops  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_backend as le  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_chunked as le_chunked  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_decode as le_decode  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_matmul as le_matmul  # noqa: E402
from vreason_kernels.ops.linear_entropy import triton_one_pass as le_one_pass  # noqa: E402
from vreason_kernels.ops.linear_logprob_entropy import triton_backend as lpe  # noqa: E402
from vreason_kernels.ops.value_delta_attention import triton_backend as vda  # noqa: E402


def _triton_modules() -> tuple:
    """Every ``triton_*`` module of the ops: the launchers look their kernels and the SM
    count up in their own module's globals, so each one is patched while recording."""
    root = pathlib.Path(vreason_kernels.ops.__file__).parent
    names = sorted(".".join(("vreason_kernels", "ops", *p.relative_to(root).with_suffix("").parts))
                   for p in root.rglob("triton_*.py"))
    return tuple(importlib.import_module(name) for name in names)


LAUNCHER_MODULES = _triton_modules()

# docs/design.md §6: hidden size D, vocabulary V, q/kv heads, head_dim.
MODELS = {
    "3B": dict(D=2048, V=151936, Hq=16, Hkv=2, head_dim=128),
    "7B": dict(D=3584, V=152064, Hq=28, Hkv=4, head_dim=128),
    "72B": dict(D=8192, V=152064, Hq=64, Hkv=8, head_dim=128),
}
TOKENS = (1, 16, 4096)  # linear_entropy rows
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# (need_grad, return_logits): V-Reason's update step, inference with logits, entropy only.
LINEAR_ENTROPY_MODES = {"grad+logits": (True, True), "grad": (True, False), "entropy": (False, False)}
ATTN_N_DECODE = (2048, 8192, 32768)
ATTN_N_PREFILL = (4096, 32768)
ATTN_HEAD_DIMS = (64, 80, 128)
SPAN_MARGIN = 96  # text rows before and after the video span: S = N - SPAN_MARGIN

# name: (compute capability, SMs, shared memory per block with opt-in, HBM GB/s, dense bf16 TFLOP/s)
TARGETS = {
    "sm_90": (90, 132, 227 * 1024, 3000, 790),  # H100 SXM (HBM as measured on the device tool's H100)
    "sm_80": (80, 108, 163 * 1024, 1900, 312),  # A100 (datasheet)
}
REGISTERS_PER_SM = 65536


# ----------------------------------------------------------------------------------------
# Recording the launchers' launches
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Recorded:
    kernel: object  # JITFunction or Autotuner, as the launcher named it
    grid: tuple
    args: tuple
    kwargs: dict = dataclasses.field(hash=False)


class _Recorder:
    """Stands in for a kernel in its module: ``kernel[grid](*args, **kwargs)`` is recorded."""

    def __init__(self, kernel, sink):
        self.kernel, self.sink = kernel, sink

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.sink.append(Recorded(self.kernel, tuple(grid), args, kwargs))


@contextlib.contextmanager
def recording(sm_count: int):
    """Within: the launcher modules' kernels record instead of launching, and grids are
    sized for ``sm_count`` SMs. Yields the list the launches are appended to."""
    sink, saved = [], []
    for module in LAUNCHER_MODULES:
        for name, value in list(vars(module).items()):
            if isinstance(value, (JITFunction, Autotuner)):
                saved.append((module, name, value))
                setattr(module, name, _Recorder(value, sink))
        if hasattr(module, "sm_count_or_none"):
            saved.append((module, "sm_count_or_none", module.sm_count_or_none))
            module.sm_count_or_none = lambda device: sm_count
    try:
        yield sink
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


@contextlib.contextmanager
def _env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def linear_entropy_calls():
    """(label, decode path?, call): the forward (every mode) and the weight gradient."""
    for model, spec in MODELS.items():
        D, V = spec["D"], spec["V"]
        for rows in TOKENS:
            for dname, dtype in DTYPES.items():
                hidden, weight = _meta(rows, D, dtype=dtype), _meta(V, D, dtype=dtype)
                label = f"{model} T={rows} {dname}"
                for mode, (need_grad, logits) in LINEAR_ENTROPY_MODES.items():
                    yield f"{label} {mode}", rows == 1, lambda h=hidden, w=weight, g=need_grad, lg=logits: (
                        le.forward(h, w, None, 1.0, g, lg))
                if rows == 1:  # the many-rows path, kept behind a switch for A/B timing at T=1
                    def general(h=hidden, w=weight):
                        with _env("VREASON_LINEAR_ENTROPY_DECODE_KERNEL", "0"):
                            le.forward(h, w, None, 1.0, True, False)
                    yield f"{label} grad (many-rows path)", False, general
                else:  # the one-pass kernel with A/B, as the vocabulary-parallel op runs it per slice
                    yield f"{label} slice partials", False, lambda h=hidden, w=weight: (
                        le.forward_partials(h, w, None, 1.0, True, False))
                stats = _meta(rows)
                yield f"{label} weight grad", False, lambda h=hidden, w=weight, s=stats: (
                    le.weight_grad(h, w, None, 1.0, s, s, s, s, False))


# linear_logprob_entropy (RL training): the §6 heads and the GPU campaign's T=4096, D=4096, V=131072.
LOGPROB_SHAPES = {**{model: (spec["D"], spec["V"]) for model, spec in MODELS.items()}, "D4096-V131k": (4096, 131072)}
LOGPROB_TOKENS = (16, 4096)
# Which outputs get a gradient and which inputs want one: (grad_logp, grad_entropy, hidden, weight, bias).
LOGPROB_GRADS = {"both, all inputs": (True, True, True, True, True), "logp, hidden": (True, False, True, False, False),
                 "entropy, weight": (False, True, False, True, False)}


def linear_logprob_entropy_calls():
    """(label, decode path?, call): the forward (statistics and the label's logit) and the
    backward with each mix of incoming gradients."""
    for name, (D, V) in LOGPROB_SHAPES.items():
        for rows in LOGPROB_TOKENS:
            for dname, dtype in DTYPES.items():
                hidden, weight = _meta(rows, D, dtype=dtype), _meta(V, D, dtype=dtype)
                labels, stat = _meta(rows, dtype=torch.int64), _meta(rows)
                label = f"logprob {name} T={rows} {dname}"
                yield f"{label} forward", False, lambda h=hidden, w=weight, y=labels: lpe.forward(h, w, None, y, 1.0)
                for mode, (g_lp, g_ent, *needs) in LOGPROB_GRADS.items():
                    yield f"{label} grads ({mode})", False, lambda h=hidden, w=weight, y=labels, s=stat, a=g_lp, \
                        b=g_ent, n=needs: lpe.grads(h, w, None, y, 1.0, s, s, s, s if a else None, s if b else None,
                                                    *n)


def attention_shapes():
    """(label, B, Hkv, G, T, N, D): decode and prefill, every §6 GQA group, D in {64, 80, 128}."""
    for model, spec in MODELS.items():
        g = spec["Hq"] // spec["Hkv"]
        for head_dim in ATTN_HEAD_DIMS if model == "7B" else (spec["head_dim"],):
            for n in ATTN_N_DECODE:
                yield f"{model} decode N={n} D={head_dim}", 1, spec["Hkv"], g, 1, n, head_dim
            for n in ATTN_N_PREFILL:
                yield f"{model} prefill N={n} D={head_dim}", 1, spec["Hkv"], g, n, n, head_dim


def attention_calls():
    """(label, decode path?, call): forward and backward, with and without delta and mask."""
    for label, b, hkv, g, t, n, d in attention_shapes():
        for dname, dtype in DTYPES.items():
            query, grad_out = _meta(b, hkv * g, t, d, dtype=dtype), _meta(b, hkv * g, t, d, dtype=dtype)
            key, value = _meta(b, hkv, n, d, dtype=dtype), _meta(b, hkv, n, d, dtype=dtype)
            span_index = _meta(n, dtype=torch.int32)
            lse = _meta(b, hkv * g, t)
            for delta in (_meta(b, hkv, n - SPAN_MARGIN, d, dtype=dtype), None):
                # op.py's additive mask: [B, 1, T, N] fp32 expanded over the heads, or none.
                for bias in (_meta(b, 1, t, n).expand(b, hkv * g, t, n), None):
                    tensors = dict(grad_out=grad_out, query=query, key=key, value=value, delta_v=delta,
                                   span_index=span_index, attn_bias=bias, scale=d**-0.5, causal=True,
                                   out=query, lse=lse)
                    flags = f"{dname}{' delta' if delta is not None else ''}{' mask' if bias is not None else ''}"
                    # V-Reason's per-token path: every forward at T=1, and the backward for delta.
                    yield f"{label} {flags} forward", t == 1, lambda x=tensors: _call(vda.forward, x)
                    yield (f"{label} {flags} backward", t == 1 and delta is not None,
                           lambda x=tensors: _call(vda.backward, x))


def _call(function, named: dict):
    """Call a backend function with the inputs its own parameter names ask for."""
    params = [p for p in inspect.signature(function).parameters.values() if p.default is p.empty]
    missing = [p.name for p in params if p.name not in named]
    if missing:
        raise TypeError(f"{function.__module__}.{function.__name__} takes {missing}: teach triton_aot.py their shapes")
    return function(**{p.name: named[p.name] for p in params})


def _expand_configs(launch: Recorded):
    """(JITFunction, kwargs) per config: an autotuner launches every config its prune keeps."""
    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return [(kernel, launch.kwargs)]
    configs = kernel.configs
    if kernel.early_config_prune:
        configs = kernel.early_config_prune(configs, dict(zip(kernel.arg_names, launch.args)), **launch.kwargs)
    return [(kernel.fn, {**launch.kwargs, **config.all_kwargs()}) for config in configs]


# ----------------------------------------------------------------------------------------
# Specialising and compiling
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Compile:
    """One distinct compile: everything ``triton.compile`` needs, in picklable form."""

    module: str
    kernel: str
    target: str
    spec: str  # JSON: signature, constexprs, attrs, options

    def config(self) -> str:
        """The constexpr values, for the table."""
        spec = json.loads(self.spec)
        return ", ".join(f"{name}={value}" for name, value in spec["constexprs"].items() if name.isupper())


@functools.lru_cache(maxsize=None)
def _binder(target: str, fn: JITFunction):
    backend = make_backend(GPUTarget("cuda", TARGETS[target][0], 32))
    return backend, create_function_from_signature(fn.signature, fn.params, backend)


def specialise(target: str, fn: JITFunction, args: tuple, kwargs: dict) -> Compile:
    """What ``fn[grid](*args, **kwargs)`` would compile on ``target`` (Triton's own binder)."""
    backend, binder = _binder(target, fn)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    names = [p.name for p in fn.params]
    spec = dict(signature=signature, constexprs={names[path[0]]: value for path, value in constexprs.items()},
                attrs={names[path[0]]: value for path, value in attrs.items()},
                options={k: v for k, v in vars(options).items() if k in ("num_warps", "num_stages", "num_ctas")})
    return Compile(fn.fn.__module__, fn.fn.__name__, target, json.dumps(spec, sort_keys=True))


def recorded_compiles(target: str):
    """{Compile: [(label, decode), ...]} for every launch the launchers make at the §6 shapes."""
    out = {}
    for calls in (linear_entropy_calls(), linear_logprob_entropy_calls(), attention_calls()):
        for label, decode, call in calls:
            with recording(TARGETS[target][1]) as launches:
                call()
            for launch in launches:
                for fn, kwargs in _expand_configs(launch):
                    out.setdefault(specialise(target, fn, launch.args, kwargs), []).append((label, decode))
    return out


_CUOBJDUMP = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


def compile_one(job: Compile) -> dict:
    """Compile and return REG, STACK, LOCAL and SHARED per thread / block; or the error."""
    fn = getattr(importlib.import_module(job.module), job.kernel)
    spec = json.loads(job.spec)
    names = [p.name for p in fn.params]
    gpu = GPUTarget("cuda", TARGETS[job.target][0], 32)
    options = make_backend(gpu).parse_options(spec["options"])
    source = ASTSource(fn=fn, signature=spec["signature"],
                       constexprs={(names.index(k),): v for k, v in spec["constexprs"].items()},
                       attrs={(names.index(k),): v for k, v in spec["attrs"].items()})
    row = dict(target=job.target, module=job.module, kernel=job.kernel, config=job.config(),
               num_warps=options.num_warps, num_stages=options.num_stages, threads=32 * options.num_warps)
    start = time.perf_counter()
    try:
        compiled = triton.compile(source, target=gpu, options=vars(options))
    except Exception as exc:  # reported per compile; the test fails on any
        return dict(row, error=f"{type(exc).__name__}: {exc}"[:2000])
    row["seconds"] = round(time.perf_counter() - start, 2)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = pathlib.Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(_CUOBJDUMP), "--dump-resource-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", usage)}
    return dict(row, REG=fields["REG"], STACK=fields["STACK"], LOCAL=fields["LOCAL"],
                SHARED=fields["SHARED"] + compiled.metadata.shared)


def _tiles(job: Compile) -> tuple:
    spec = json.loads(job.spec)
    tiles = tuple((k, v) for k, v in spec["constexprs"].items() if k.startswith("BLOCK_"))
    return job.target, job.module, job.kernel, tiles, tuple(sorted(spec["options"].items()))


def _variant(job: Compile) -> set:
    """What a compile varies in besides its tiles: flags, precision and pointer dtypes."""
    spec = json.loads(job.spec)
    flags = {(k, v) for k, v in spec["constexprs"].items() if not k.startswith("BLOCK_")}
    return flags | {(k, v) for k, v in spec["signature"].items() if v.startswith("*")}


def cover(recorded: dict) -> dict:
    """A subset in which every (target, kernel, tiles, warps, stages), on and off the decode
    path, is compiled once, and every flag value and pointer dtype of each (target, kernel)
    at least once (greedy; the variant with the most still-missing values first, then the
    most flags set, as the variant with the most code). The CI test compiles this;
    ``--all`` (and the GPU machine) compiles everything."""
    groups, kernels = {}, {}
    for job, uses in recorded.items():
        groups.setdefault((_tiles(job), any(d for _, d in uses)), []).append(job)
        kernels.setdefault(_tiles(job)[:3], set()).update(_variant(job))
    chosen = {}

    def take(jobs):
        missing = kernels[_tiles(jobs[0])[:3]]
        best = max(jobs, key=lambda j: (len(_variant(j) & missing), sum(v is True for _, v in _variant(j))))
        missing -= _variant(best)
        chosen[best] = recorded[best]

    for jobs in groups.values():
        take(jobs)
    for key, missing in kernels.items():
        jobs = [job for job in recorded if _tiles(job)[:3] == key]
        while missing:
            take(jobs)
    return chosen


def compile_all(targets=tuple(TARGETS), jobs: int = 1, everything: bool = True) -> list:
    """One row per distinct compile, with the shape labels that launch it and whether any
    of them is on V-Reason's per-token (decode) path; ``everything=False``: the ``cover``."""
    recorded = {}
    for target in targets:
        recorded.update(recorded_compiles(target))
    if not everything:
        recorded = cover(recorded)
    work = list(recorded)
    if jobs > 1:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(compile_one, work))
    else:
        results = [compile_one(job) for job in work]
    return [dict(result, shapes=[label for label, _ in recorded[job]], decode=any(d for _, d in recorded[job]))
            for job, result in zip(work, results)]


def check(row: dict) -> list:
    """What is wrong with one compiled kernel (empty when fine)."""
    if "error" in row:
        return [f"does not compile: {row['error']}"]
    problems = []
    limit = TARGETS[row["target"]][2]
    if row["SHARED"] > limit:
        problems.append(f"shared memory {row['SHARED']} B > {limit} B per block")
    if row["REG"] * row["threads"] > REGISTERS_PER_SM:
        problems.append(f"{row['REG']} registers x {row['threads']} threads > {REGISTERS_PER_SM} per SM")
    if row["decode"] and (row["LOCAL"] or row["STACK"]):
        problems.append(f"decode-path kernel spills: STACK {row['STACK']} B, LOCAL {row['LOCAL']} B per thread")
    return problems
