"""benchmarks/gpu_campaign.py on CPU: its arguments, its step list, and its stop-at-the-first-failure runner.

The GPU steps themselves run only on a CUDA machine (docs/design.md §9.4); here every script
and test option a step names must exist, every benchmark must accept the flags a step passes
(the harness's command line, benchmarks/harness.py), and the runner must keep what earlier
steps wrote.
"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("gpu_campaign", ROOT / "benchmarks" / "gpu_campaign.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


campaign = _load()
NAMES = ["env", "peers", "build", "tests", "sync", "sanitize", "bench-linear-entropy", "bench-logprob",
         "bench-attention", "bench-generate", "summary"]


def test_dry_run_lists_every_step_in_order(capsys, tmp_path):
    (tmp_path / "liger_kernel-0.8.5-py3-none-any.whl").write_bytes(b"")
    assert campaign.main(["--dry-run", "--wheels", str(tmp_path)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("      ")]
    assert [line.split(":")[0].split(". ")[1] for line in lines] == NAMES


def test_every_script_and_file_a_step_names_exists():
    for step in campaign.steps(wheels=None):
        named = [arg for argv in step.commands for arg in argv if arg.endswith(".py")] + list(step.needs)
        for path in named:
            assert (ROOT / path).is_file(), f"step {step.name}: {path} does not exist"


def test_test_options_the_tests_step_passes_are_registered(pytestconfig):
    (tests,) = [s for s in campaign.steps(wheels=None) if s.name == "tests"]
    options = [arg for argv in tests.commands for arg in argv if arg.startswith("--vk-")]
    assert options
    for option in options:
        pytestconfig.getoption(option)  # raises ValueError when conftest does not register it


def _benchmark_module(script: str):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        return importlib.import_module(pathlib.Path(script).stem)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


def test_benchmark_steps_follow_the_harness_command_line(tmp_path):
    """Every bench step's arguments parse with its script's own parser (the harness's
    ``--device``/``--dtype``/``--out`` plus the script's options), run on CUDA, and write
    their record into the campaign folder; every ``benchmarks/bench_*.py`` has its step."""
    benches = set()
    for step in campaign.steps(wheels=None):
        for argv in step.commands:
            argv = [a.format(out=tmp_path, site=tmp_path / "site") for a in argv]
            scripts = [i for i, arg in enumerate(argv) if arg.startswith("benchmarks/bench_")]
            if not scripts:
                continue
            benches.add(argv[scripts[0]])
            args = _benchmark_module(argv[scripts[0]]).build_parser().parse_args(argv[scripts[0] + 1:])
            assert args.device == "cuda", f"step {step.name} does not ask for CUDA"
            assert args.out is not None and args.out.parent == tmp_path / "results", step.name
    assert benches == {f"benchmarks/{p.name}" for p in (campaign.ROOT / "benchmarks").glob("bench_*.py")}


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--dry-run", "--only", "tests,nope"], "unknown step 'nope'"),
        (["--dry-run", "--skip", "benchmark"], "unknown step 'benchmark'"),
    ],
)
def test_unknown_steps_are_rejected(argv, message):
    with pytest.raises(SystemExit, match=message):
        campaign.main(argv)


def test_output_folder_is_required_and_wheels_must_exist(tmp_path, capsys):
    with pytest.raises(SystemExit):
        campaign.main([])
    assert "output folder is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        campaign.main([str(tmp_path / "out"), "--wheels", str(tmp_path)])
    assert "no .whl files" in capsys.readouterr().err


def test_only_and_skip_select_steps(capsys):
    assert campaign.main(["--dry-run", "--only", "build,tests", "--skip", "tests"]) == 0
    out = capsys.readouterr().out
    assert "build:" in out and "tests:" not in out and "env:" not in out


def _step(name, code):
    script = f"print('{name} ran'); raise SystemExit({code})"
    return campaign.Step(name, f"exit {code}", ([sys.executable, "-c", script],), 30)


def test_stops_at_the_first_failure_and_keeps_earlier_results(tmp_path):
    steps = [_step("first", 0), _step("broken", 3), _step("never", 0)]
    assert campaign.run(steps, tmp_path, keep_going=False) == 1
    assert (tmp_path / "steps" / "01-first.log").read_text().endswith("first ran\n")
    assert "broken ran" in (tmp_path / "steps" / "02-broken.log").read_text()
    assert not (tmp_path / "steps" / "03-never.log").exists()
    summary = (tmp_path / "summary.md").read_text()
    assert "| first | ok |" in summary and "| broken | exit 3 |" in summary and "never" not in summary
    assert (tmp_path / "campaign.tar.gz").stat().st_size > 0


def test_keep_going_runs_every_step_and_still_fails(tmp_path):
    steps = [_step("broken", 1), _step("after", 0)]
    assert campaign.run(steps, tmp_path, keep_going=True) == 1
    assert "| after | ok |" in (tmp_path / "summary.md").read_text()


def test_a_step_past_its_limit_fails(tmp_path):
    slow = campaign.Step("slow", "sleeps", ([sys.executable, "-c", "import time; time.sleep(5)"],), 1)
    assert campaign.run([slow], tmp_path, keep_going=False) == 1
    assert "timed out after 1 s" in (tmp_path / "summary.md").read_text()


def test_linear_entropy_benchmark_has_every_peer():
    """The GPU benchmark's peers (docs/design.md §9.3: Liger with its entropy output, CCE, the
    unfused reference) each have a step; here, without their packages, a peer fails on its
    import, never as an unknown backend."""
    bench = _benchmark_module("benchmarks/bench_linear_entropy.py")
    import torch

    hidden, weight = torch.zeros(1, 8, requires_grad=True), torch.zeros(16, 8)
    assert callable(bench.step_fn("torch", hidden, weight))
    for peer in ("liger", "liger_entropy", "cce"):
        try:
            bench.step_fn(peer, hidden, weight)
        except ImportError:
            pass  # the peer package is not installed here
    with pytest.raises(ValueError, match="unknown backend"):
        bench.step_fn("nope", hidden, weight)
