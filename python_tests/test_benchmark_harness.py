"""The benchmark harness (benchmarks/harness.py): one benchmark at a tiny --quick shape on CPU
writes a JSON record with every provenance field, and benchmarks/summarize.py renders it."""

import json
import subprocess
import sys

import pytest

from python_tests.utils import REPO, repo_env

sys.path.insert(0, str(REPO / "benchmarks"))
import harness  # noqa: E402
import summarize  # noqa: E402

sys.path.remove(str(REPO / "benchmarks"))


@pytest.mark.slow  # runs a benchmark in a subprocess
def test_a_quick_cpu_run_writes_a_complete_record(tmp_path):
    out = tmp_path / "attention.json"
    argv = ["benchmarks/bench_value_delta_attention.py", "--device", "cpu", "--quick", "--n", "48",
            "--reps", "2", "--out", str(out)]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, env=repo_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads(out.read_text())

    for field in harness.REQUIRED_FIELDS:
        assert field in record, f"record lacks {field!r}"
    assert record["schema"] == harness.SCHEMA and record["benchmark"] == "value_delta_attention"
    assert record["command"] == "python " + " ".join(argv) and record["argv"] == ["python", *argv]
    assert record["device"]["type"] == "cpu" and record["device"]["cores"] >= 1 and record["device"]["name"]
    for package in ("python", "torch", "triton", "transformers"):
        assert record["versions"][package], f"no {package} version"
    assert len(record["git"]["commit"]) == 40 and isinstance(record["git"]["dirty"], bool)
    assert record["date"].endswith("+00:00")
    assert record["settings"]["device"] == "cpu" and record["settings"]["dtype"] == "float32"
    assert record["settings"]["quick"] is True

    impls = {row["impl"] for row in record["rows"]}
    assert {"torch fwd+bwd", "unfused fwd+bwd"} <= impls
    for row in record["rows"]:
        assert row["N"] == 48 and row["time_ms"] > 0
        assert set(row) <= set(record["columns"])

    text = summarize.render(record)
    assert record["command"] in text and "| torch fwd+bwd |" in text


def test_summarize_reads_a_folder_and_skips_other_json(tmp_path, capsys):
    good = {field: None for field in harness.REQUIRED_FIELDS}
    good.update(schema=harness.SCHEMA, benchmark="b", title="T", command="python x.py", date="2026-01-01",
                git={"commit": "0" * 40, "dirty": False}, device={"type": "cpu", "name": "c", "cores": 1},
                versions={"torch": "2"}, environment={}, settings={}, load_average={}, elapsed_s=1.0, notes=["n"],
                columns=["a", "b"], rows=[{"a": 1, "b": 0.5}])
    (tmp_path / "good.json").write_text(json.dumps(good))
    (tmp_path / "other.json").write_text("{}")
    assert summarize.main([str(tmp_path), "--out", str(tmp_path / "s.md")]) == 0
    text = (tmp_path / "s.md").read_text()
    assert "## T" in text and "| 1 | 0.5 |" in text and "`good.json`" in text
    assert "skipped" in capsys.readouterr().err


def test_timing_and_memory_helpers():
    calls = []
    timing = harness.time_cpu(lambda: calls.append(1), reps=5, warmup=2)
    assert len(calls) == 7 and timing["reps"] == 5 and timing["ms"] >= timing["min_ms"] >= 0
    peak = harness.peak_memory(lambda: b"x" * (64 * 2**20), "cpu")
    assert peak is None or peak >= 32 * 2**20  # None only where /proc cannot reset the high-water mark
