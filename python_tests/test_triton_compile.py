"""Every Triton kernel compiled for sm_90 (H100/H200) and sm_80 (A100), without a GPU.

The interpreter accepts code a real compile rejects (tl.dot shapes, layouts, globals that
are not constexpr, register and shared-memory limits, spills). ``benchmarks/triton_aot.py``
records the launches the launchers make at docs/design.md §6 shapes (every dtype, every kept
autotune config) and compiles them; this checks what the hardware would refuse or run
slowly. In CI it compiles ``triton_aot.cover`` (every kernel, tile configuration, warps and
stages per target once, each flag value and dtype of each kernel at least once);
``VREASON_AOT_ALL=1`` (set by the GPU campaign, 16 cores) compiles all of them, as
``benchmarks/triton_resources.py`` does for the committed table.

The compiles run in a subprocess: under TRITON_INTERPRET=1 (set by conftest on machines
without CUDA) ``@triton.jit`` gives interpreted functions, which cannot be compiled.
"""

import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_resources.py"
TARGETS = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}  # shared memory per block, opt-in maximum
REGISTERS_PER_SM = 65536

pytestmark = pytest.mark.slow  # compiling every kernel for two targets takes ~45 s


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One row per distinct compile, all compiled once per test run."""
    out = tmp_path_factory.mktemp("triton_compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cover = [] if os.environ.get("VREASON_AOT_ALL") == "1" else ["--cover"]
    run = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out), *cover], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    if not out.exists():
        pytest.fail(f"triton_resources.py wrote nothing (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())


def _launchable_kernels() -> dict:
    """{module: kernel names}: every top-level ``@triton.jit`` function named ``*_kernel`` in the package."""
    found = {}
    for path in sorted((ROOT / "vreason_kernels").rglob("*.py")):
        names = re.findall(r"^@triton\.jit\b[^\n]*\n(?:@[^\n]*\n)*def (\w+_kernel)\(", path.read_text(), flags=re.M)
        if names:
            module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[module] = set(names)
    return found


def _fmt(row) -> str:
    return f"{row['target']} {row['kernel']} [{row['config']}, warps={row['num_warps']}, stages={row['num_stages']}]"


def test_every_kernel_is_compiled_for_both_targets(compiled):
    expected = _launchable_kernels()
    assert len(expected) >= 3, expected
    for target in TARGETS:
        got = {(r["module"], r["kernel"]) for r in compiled if r["target"] == target}
        missing = [(m, k) for m, names in expected.items() for k in names if (m, k) not in got]
        assert not missing, f"{target}: kernels never compiled (add their launcher to triton_aot.py): {missing}"


def test_every_kernel_compiles(compiled):
    failures = [f"{_fmt(r)}: {r['error'][:500]}" for r in compiled if "error" in r]
    assert not failures, "\n".join(failures)


def test_shared_memory_within_the_per_block_limit(compiled):
    over = [f"{_fmt(r)}: {r['SHARED']} B" for r in compiled if "error" not in r and r["SHARED"] > TARGETS[r["target"]]]
    assert not over, "\n".join(over)


def test_registers_allow_a_block_per_sm(compiled):
    over = [f"{_fmt(r)}: {r['REG']} x {r['threads']}" for r in compiled
            if "error" not in r and r["REG"] * r["threads"] > REGISTERS_PER_SM]
    assert not over, "\n".join(over)


def test_decode_path_does_not_spill(compiled):
    """V-Reason's per-token kernels: no local memory and no spill stack (Triton makes no calls,
    so a stack frame is spilled registers)."""
    decode = [r for r in compiled if r["decode"] and "error" not in r]
    assert {r["kernel"] for r in decode} >= {"_decode_partials_kernel", "_merge_kernel", "_forward_kernel",
                                               "_backward_dv_kernel"}
    assert {r["target"] for r in decode} == set(TARGETS)
    spills = [f"{_fmt(r)}: STACK {r['STACK']} B, LOCAL {r['LOCAL']} B" for r in decode if r["STACK"] or r["LOCAL"]]
    assert not spills, "\n".join(spills)
