"""Every Triton kernel compiled for sm_90 (H100/H200) and sm_80 (A100), without a GPU.

The interpreter accepts code a real compile rejects (tl.dot shapes, layouts, globals that
are not constexpr, register and shared-memory limits, spills). This compiles each kernel at
the configurations its launcher picks for DESIGN.md §6 shapes, every kept autotune config
included, with benchmarks/triton_resources.py (which also writes the resource table), and
checks what the hardware would refuse or run slowly.

The compiles run in a subprocess: under TRITON_INTERPRET=1 (set by conftest on machines
without CUDA) ``@triton.jit`` gives interpreted functions, which cannot be compiled.
"""

import importlib
import inspect
import json
import os
import pathlib
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_resources.py"
TRITON_MODULES = (
    "vreason_kernels.ops.linear_entropy.triton_kernels",
    "vreason_kernels.ops.linear_entropy.triton_decode",
    "vreason_kernels.ops.value_delta_attention.triton_kernels",
)
TARGETS = ("sm_90", "sm_80")


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    """One row per distinct (kernel, configuration, target), compiled once per test run."""
    out = tmp_path_factory.mktemp("triton_compile") / "rows.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, str(SCRIPT), "--json", str(out)], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    if not out.exists():
        pytest.fail(f"triton_resources.py wrote nothing (exit {run.returncode}):\n{run.stderr[-4000:]}")
    return json.loads(out.read_text())


def _kernel_names(module_name: str) -> set:
    """Names of the module's launchable kernels: its own top-level ``*_kernel`` jit functions."""
    source = inspect.getsource(importlib.import_module(module_name))
    return {line.split("(")[0][len("def "):] for line in source.splitlines()
            if line.startswith("def _") and "_kernel(" in line}


def _fmt(row) -> str:
    return f"{row['target']} {row['kernel']} [{row['config']}, warps={row['num_warps']}, stages={row['num_stages']}]"


def test_every_kernel_is_compiled_for_both_targets(compiled):
    expected = set().union(*(_kernel_names(m) for m in TRITON_MODULES))
    assert expected, "no kernels found"
    for target in TARGETS:
        got = {row["kernel"] for row in compiled if row["target"] == target}
        assert expected <= got, f"{target}: kernels never compiled: {sorted(expected - got)}"


def test_every_kernel_compiles(compiled):
    failures = [f"{_fmt(r)}: {r['error'][:500]}" for r in compiled if "error" in r]
    assert not failures, "\n".join(failures)


def test_shared_memory_within_the_per_block_limit(compiled):
    limits = {"sm_90": 227 * 1024, "sm_80": 163 * 1024}
    over = [f"{_fmt(r)}: {r['SHARED']} B" for r in compiled if "error" not in r and r["SHARED"] > limits[r["target"]]]
    assert not over, "\n".join(over)


def test_registers_allow_a_block_per_sm(compiled):
    over = [f"{_fmt(r)}: {r['REG']} x {r['threads']}" for r in compiled
            if "error" not in r and r["REG"] * r["threads"] > 65536]
    assert not over, "\n".join(over)


def test_decode_path_does_not_spill(compiled):
    decode = [r for r in compiled if r["decode"] and "error" not in r]
    assert {r["kernel"] for r in decode} >= {"_decode_partials_kernel", "_forward_kernel", "_backward_dv_kernel"}
    spills = [f"{_fmt(r)}: STACK {r['STACK']} B, LOCAL {r['LOCAL']} B" for r in decode if r["STACK"] or r["LOCAL"]]
    assert not spills, "\n".join(spills)
