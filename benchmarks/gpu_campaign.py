"""The GPU campaign in one call (docs/design.md §9.3-§9.4): build, test, sanitize and benchmark on a CUDA machine.

    python benchmarks/gpu_campaign.py OUT [--wheels .whl] [--only STEP,...] [--skip STEP,...]
                                          [--keep-going] [--dry-run]

Runs the steps below in order from the repository root, each a subprocess whose output goes
to ``OUT/steps/NN-name.log``. It stops at the first step that fails (exit status 1) unless
``--keep-going``; whatever earlier steps wrote stays. After every step ``OUT/summary.md``
(step, status, seconds) and ``OUT/campaign.tar.gz`` (all logs and result files so far) are
rewritten, so an outer time limit still leaves the finished steps' results behind. The
benchmarks follow the harness's command line (benchmarks/harness.py: ``--device cuda
--dtype ... --out OUT/results/NAME.json``), so their JSON records (device, versions, date,
git commit, exact command) land in ``OUT/results/``; the last step renders them to
``OUT/results/SUMMARY.md`` with benchmarks/summarize.py. Any other file a step writes to
``benchmarks/results/`` is copied there as well.

Peer packages (liger-kernel, cut-cross-entropy) are not on the GPU image: carry their wheels
(benchmarks/GPU_CAMPAIGN.md) and name the folder with ``--wheels``; the ``peers`` step
installs them into ``OUT/site`` and puts that on PYTHONPATH for every later step.
"""

import argparse
import dataclasses
import datetime
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
PY = sys.executable


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    purpose: str
    commands: tuple  # argv lists, run in order from ROOT
    timeout_s: int
    needs: tuple = ()  # paths (relative to ROOT) the commands run


def _pytest(*args):
    return [PY, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *args]


def steps(wheels) -> list:
    """Every step of the campaign, in order. Each limit is a cap, not an estimate; the plan
    (unmeasured, see GPU_CAMPAIGN.md) is about 9 minutes for the whole list on an H100."""
    sanitize = [["compute-sanitizer", "--tool", tool, "--error-exitcode", "1", PY, "benchmarks/gpu_sanitize_ops.py"]
                for tool in ("memcheck", "racecheck")]
    return [
        Step("env", "record the device, driver and package versions", (
            ["nvidia-smi"],
            [PY, "-c", "import sys, torch, triton, transformers; print(sys.version); print('torch', torch.__version__, "
                       "torch.version.cuda, torch.cuda.get_device_name()); print('triton', triton.__version__); "
                       "print('transformers', transformers.__version__)"],
        ), 30),
        Step("peers", "install the carried peer wheels (liger-kernel, cut-cross-entropy) into OUT/site", (
            [PY, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--no-cache-dir",
             "--upgrade", "--target", "{site}", *sorted(str(w) for w in pathlib.Path(wheels).glob("*.whl"))],
            [PY, "-c", "import liger_kernel, cut_cross_entropy; print('peers import')"],
        ) if wheels else (), 60),
        Step("build", "build the C++ extension from source and import it from outside the tree", (
            [PY, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "."],
            [PY, "benchmarks/gpu_campaign.py", "--copy-extension"],
        ), 150),
        Step("tests", "the test suite on CUDA, backends triton and auto (and every test without a backend)", (
            _pytest("python_tests", "--vk-device", "cuda", "--vk-backends", "triton,auto",
                    "--ignore", "python_tests/test_value_delta_attention_cpp.py", "--junitxml", "{out}/tests.xml"),
        ), 240, ("python_tests/conftest.py",)),
        Step("sync", 'a V-Reason decode loop under torch.cuda.set_sync_debug_mode("error")', (
            [PY, "benchmarks/gpu_sync_check.py"],
        ), 60, ("benchmarks/gpu_sync_check.py",)),
        Step("sanitize", "compute-sanitizer memcheck and racecheck on one call of each op's kernels",
             tuple(sanitize), 150, ("benchmarks/gpu_sanitize_ops.py",)),
        Step("bench-linear-entropy", "linear_entropy fwd+bwd(hidden), bf16, T=1/16/4096, vs torch, Liger, CCE, floor", (
            [PY, "benchmarks/bench_linear_entropy.py", "--device", "cuda", "--dtype", "bfloat16",
             "--out", "{out}/results/linear_entropy_cuda_bfloat16.json"],
        ), 180, ("benchmarks/bench_linear_entropy.py", "benchmarks/harness.py")),
        Step("bench-logprob", "linear_logprob_entropy fwd+bwd, bf16, T=4096 D=4096 V=131072, vs materialised and chunked", (
            [PY, "benchmarks/bench_linear_logprob_entropy.py", "--device", "cuda", "--dtype", "bfloat16",
             "--out", "{out}/results/linear_logprob_entropy_cuda_bfloat16.json"],
        ), 120, ("benchmarks/bench_linear_logprob_entropy.py", "benchmarks/harness.py")),
        Step("bench-attention", "value_delta_attention decode fwd+bwd and prefill vs SDPA paths, floor", (
            [PY, "benchmarks/bench_value_delta_attention.py", "--device", "cuda", "--dtype", "bfloat16",
             "--out", "{out}/results/value_delta_attention_cuda_bfloat16.json"],
        ), 120, ("benchmarks/bench_value_delta_attention.py", "benchmarks/harness.py")),
        Step("bench-generate", "per-token latency and memory: plain vs vk.generate vs reference, 7B-shaped", (
            [PY, "benchmarks/bench_generate.py", "--device", "cuda", "--dtype", "bfloat16", "--span", "4096",
             "--out", "{out}/results/generate_cuda_bfloat16.json"],
        ), 180, ("benchmarks/bench_generate.py", "benchmarks/harness.py")),
        Step("summary", "markdown tables of every benchmark record in OUT/results", (
            [PY, "benchmarks/summarize.py", "{out}/results", "--out", "{out}/results/SUMMARY.md"],
        ), 30, ("benchmarks/summarize.py",)),
    ]


def copy_extension() -> int:
    """Put the installed ``vreason_kernels/_C`` beside the source package, which the tests import."""
    probe = "import importlib.util; print(importlib.util.find_spec('vreason_kernels._C').origin)"
    origin = subprocess.run([PY, "-c", probe], cwd="/", capture_output=True, text=True, check=True).stdout.strip()
    shutil.copy2(origin, ROOT / "vreason_kernels" / pathlib.Path(origin).name)
    check = "from vreason_kernels.backend import EXTENSION_STATUS as s; assert s.loaded, s.reason; print('extension ok')"
    return subprocess.run([PY, "-c", check], cwd=ROOT).returncode


def select(all_steps, only, skip) -> list:
    names = [s.name for s in all_steps]
    for name in (only or []) + (skip or []):
        if name not in names:
            raise SystemExit(f"unknown step {name!r}; the steps are: {', '.join(names)}")
    return [s for s in all_steps if (not only or s.name in only) and s.name not in (skip or [])]


def _write_summary(out: pathlib.Path, rows, started) -> None:
    lines = [f"# GPU campaign {started:%Y-%m-%d %H:%M} UTC", "", "| step | status | seconds | purpose |",
             "|---|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} | {purpose} |" for name, status, seconds, purpose in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    with tarfile.open(out / "campaign.tar.gz", "w:gz") as tar:
        for sub in ("summary.md", "steps", "results", "tests.xml"):
            if (out / sub).exists():
                tar.add(out / sub, arcname=sub)


def _collect_results(out: pathlib.Path, since: float) -> None:
    results = ROOT / "benchmarks" / "results"
    for path in results.glob("*"):
        if path.is_file() and path.stat().st_mtime >= since:
            (out / "results").mkdir(exist_ok=True)
            shutil.copy2(path, out / "results" / path.name)


def run(selected, out: pathlib.Path, keep_going: bool) -> int:
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.time()
    (out / "steps").mkdir(parents=True, exist_ok=True)
    # VREASON_AOT_ALL: the AOT compile test compiles every launch (16 cores), not CI's cover.
    env = dict(os.environ, PYTHONUNBUFFERED="1", VREASON_AOT_ALL="1")
    env.pop("TRITON_INTERPRET", None)
    site = out / "site"
    rows, failed = [], []
    for number, step in enumerate(selected, 1):
        if step.name == "peers":
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
        log = out / "steps" / f"{number:02d}-{step.name}.log"
        begin = time.time()
        status = "ok" if step.commands else "skipped (no --wheels given)"
        with log.open("w") as sink:
            for argv in step.commands:
                argv = [a.format(out=out, site=site) for a in argv]
                sink.write(f"$ {' '.join(argv)}\n")
                sink.flush()
                try:
                    code = subprocess.run(argv, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                          timeout=step.timeout_s).returncode
                except subprocess.TimeoutExpired:
                    code, status = 124, f"timed out after {step.timeout_s} s"
                except FileNotFoundError as exc:
                    code, status = 127, f"not found: {exc.filename}"
                if code:
                    status = status if status != "ok" else f"exit {code}"
                    break
        _collect_results(out, t0)
        rows.append((step.name, status, time.time() - begin, step.purpose))
        _write_summary(out, rows, started)
        print(f"[{time.time() - t0:6.0f} s] {step.name}: {status}", flush=True)
        if status != "ok" and step.commands:
            failed.append(step.name)
            print(f"FAILED: {step.name} ({status}); see {log}", file=sys.stderr)
            for line in log.read_text(errors="replace").splitlines()[-30:]:
                print("    " + line, file=sys.stderr)
            if not keep_going:
                return 1
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=pathlib.Path, help="folder for every result (created)")
    parser.add_argument("--wheels", type=pathlib.Path, help="folder of carried peer wheels (default: none)")
    parser.add_argument("--only", type=lambda s: s.split(","), help="comma-separated steps to run")
    parser.add_argument("--skip", type=lambda s: s.split(","), help="comma-separated steps to leave out")
    parser.add_argument("--keep-going", action="store_true", help="run every step even after a failure")
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their commands, run nothing")
    parser.add_argument("--copy-extension", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.copy_extension:
        return copy_extension()
    if args.wheels is not None and not any(args.wheels.glob("*.whl")):
        parser.error(f"--wheels {args.wheels}: no .whl files there")
    selected = select(steps(args.wheels), args.only, args.skip)
    if args.dry_run:
        for number, step in enumerate(selected, 1):
            print(f"{number:2d}. {step.name}: {step.purpose} (limit {step.timeout_s} s)")
            for argv in step.commands or (["(nothing: no --wheels given)"],):
                print("      $ " + " ".join(argv))
        return 0
    if args.out is None:
        parser.error("the output folder is required (except with --dry-run)")
    args.out.mkdir(parents=True, exist_ok=True)
    return run(selected, args.out.resolve(), args.keep_going)


if __name__ == "__main__":
    sys.exit(main())
