"""The lmms-eval model ``--model vreason`` against the real lmms-eval package.

A local task (a YAML, a local JSON dataset and a ``utils.py``, written in the test) runs
through lmms-eval's own command line on tiny random-weight checkpoints; nothing is fetched.
The text task runs everywhere; the video task needs transformers' Qwen2-VL video processor
(torchvision, see test_video.py) and skips without it.
"""

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lmms_eval", reason="the eval extra (lmms-eval) is not installed")
pytestmark = pytest.mark.slow  # each case starts lmms-eval in a subprocess

from python_tests.tiny_models import (  # noqa: E402
    needs_video_processor,
    save_tiny_qwen2_5_vl_checkpoint,
    save_tiny_text_checkpoint,
    write_moving_shapes_video,
)
from python_tests.utils import repo_env  # noqa: E402

TASK_UTILS = '''
def doc_to_visual(doc):
    return [doc["video"]] if doc.get("video") else []


def doc_to_text(doc):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(results[0].strip() == doc["answer"])}
'''
TASK_YAML = '''task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 5
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
'''


def write_local_task(folder: Path, name: str, docs: list) -> Path:
    """An lmms-eval task folder for ``--include_path``: ``name.yaml``, ``data.json``, ``utils.py``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "data.json").write_text(json.dumps(docs))
    (folder / "utils.py").write_text(TASK_UTILS)
    (folder / f"{name}.yaml").write_text(TASK_YAML.format(name=name, data=folder / "data.json"))
    return folder


def run_lmms_eval(tmp_path: Path, checkpoint: Path, task: str, include: Path, **model_args):
    """``python -m lmms_eval --model vreason`` offline; returns (results, samples, per-sample stats)."""
    out, stats = tmp_path / "out", tmp_path / "stats.jsonl"
    args = ",".join(f"{k}={v}" for k, v in dict(pretrained=checkpoint, dtype="float32", device="cpu",
                                                stats_path=stats, **model_args).items())
    env = repo_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    cmd = [sys.executable, "-m", "lmms_eval", "--model", "vreason", "--model_args", args, "--tasks", task,
           "--include_path", str(include), "--batch_size", "1", "--output_path", str(out), "--log_samples"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = [json.loads(line) for line in next(out.rglob(f"*_samples_{task}.jsonl")).read_text().splitlines()]
    return results, samples, [json.loads(line) for line in stats.read_text().splitlines()]


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory):
    return save_tiny_text_checkpoint(tmp_path_factory.mktemp("tiny_text"))


def test_importing_the_package_does_not_import_lmms_eval():
    code = ("import sys, vreason_kernels, vreason_kernels.integrations, vreason_kernels.integrations.lmms_eval; "
            "print([m for m in sys.modules if m.split('.')[0] == 'lmms_eval'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=repo_env(), timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_entry_point_registers_model_vreason():
    names = [ep.name for ep in importlib.metadata.entry_points(group="lmms_eval.models")]
    if "vreason" not in names:
        pytest.skip("vreason-kernels is not installed with its entry points here (pip install -e .)")
    from lmms_eval.models import get_model

    from vreason_kernels.integrations.lmms_eval.model import VReasonLMM

    assert get_model("vreason") is VReasonLMM


def test_model_args_become_a_vreason_config():
    from vreason_kernels.integrations.lmms_eval.model import vreason_config

    # lmms-eval's own parser gives these types: "-1" -> -1.0, "2" -> 2, "False" -> False, "None" -> "None".
    from lmms_eval.utils import simple_parse_args_string

    config = vreason_config(simple_parse_args_string("enabled=False,layer=-1,steps=2,lr=0.01,max_delta_norm=None"))
    assert (config.enabled, config.layer, config.steps, config.lr, config.max_delta_norm) == (False, -1, 2, 0.01, None)
    assert isinstance(config.layer, int) and isinstance(config.steps, int)
    with pytest.raises(ValueError, match="unknown \\['learning_rate'\\]"):
        vreason_config({"learning_rate": 0.1})
    with pytest.raises(ValueError, match="lr"):
        vreason_config({"lr": -1.0})
    with pytest.raises(TypeError, match="steps must be an int"):
        vreason_config({"steps": 1.5})


def test_text_task_through_the_lmms_eval_command_line(text_checkpoint, tmp_path):
    docs = [{"id": 0, "question": "What is 2 + 2?", "answer": "4"},
            {"id": 1, "question": "Name a colour.", "answer": "blue"},
            {"id": 2, "question": "Count to three.", "answer": "1 2 3"}]
    tasks = write_local_task(tmp_path / "tasks", "vreason_local_text", docs)
    results, samples, stats = run_lmms_eval(tmp_path, text_checkpoint, "vreason_local_text", tasks, lr=0.05)
    assert "accuracy,none" in results["results"]["vreason_local_text"]
    assert sorted(s["doc_id"] for s in samples) == [0, 1, 2]
    assert sorted(s["doc_id"] for s in stats) == [0, 1, 2]
    for s in stats:
        assert s["vreason"] and 1 <= s["tokens"] <= 5 and s["updates"] == s["tokens"] - 1
        assert s["span_size"] == s["input_tokens"]  # no video: the whole prompt is the span
        assert s["time_per_token_s"] > 0 and 1 <= s["entropy_ema_peak_token"] <= s["tokens"]
        assert s["entropy_max"] >= s["entropy_mean"] > 0


def test_base_model_is_plain_greedy_decoding(text_checkpoint):
    """``enabled=False`` through lmms-eval's request API gives what ``model.generate`` gives."""
    from lmms_eval.api.instance import Instance

    from vreason_kernels.integrations.lmms_eval.model import VReasonLMM

    lmm = VReasonLMM(pretrained=str(text_checkpoint), dtype="float32", device="cpu", enabled=False)
    docs = [{"question": "What is 2 + 2?"}, {"question": "Name a colour."}]
    lmm.task_dict = {"local": {"test": docs}}
    requests = [
        Instance("generate_until", (d["question"], {"max_new_tokens": 7}, lambda doc: [], i, "local", "test"), i,
                 metadata={"task": "local", "doc_id": i, "repeats": 1})
        for i, d in enumerate(docs)
    ]
    answers = lmm.generate_until(requests)
    for doc, answer, stats in zip(docs, answers, lmm.sample_stats):
        assert stats["updates"] == 0 and stats["span_size"] == 0 and not stats["vreason"]
        inputs = lmm.inputs(doc["question"], [])
        plain = lmm.model.generate(**inputs, max_new_tokens=7, do_sample=False)
        expected = lmm.tokenizer.decode(plain[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer.text == expected
        assert answer.token_counts.output_tokens == stats["tokens"] == plain.shape[1] - inputs["input_ids"].shape[1]
        # The task's stop strings cut the answer, except a blank line.
        stop = expected[2:4]
        cut, _ = lmm.answer(doc["question"], [], {"max_new_tokens": 7, "until": [stop, "\n\n"]})
        assert len(stop) == 2 and cut == expected.split(stop)[0] and cut != expected


def test_a_request_with_an_image_is_a_clear_error(text_checkpoint):
    from vreason_kernels.integrations.lmms_eval.model import VReasonLMM

    lmm = VReasonLMM(pretrained=str(text_checkpoint), dtype="float32", device="cpu")
    with pytest.raises(ValueError, match="one video file per request"):
        lmm.inputs("What is shown?", [torch.zeros(3, 4, 4)])


@pytest.mark.video
@needs_video_processor
def test_video_task_through_the_lmms_eval_command_line(tmp_path):
    checkpoint = save_tiny_qwen2_5_vl_checkpoint(tmp_path / "tiny_qwen2_5_vl")
    video = write_moving_shapes_video(tmp_path / "shapes.mp4", frames=8, fps=4)
    docs = [{"id": 0, "question": "Which way does the square move?", "answer": "right", "video": str(video)}]
    tasks = write_local_task(tmp_path / "tasks", "vreason_local_video", docs)
    results, samples, stats = run_lmms_eval(tmp_path, checkpoint, "vreason_local_video", tasks, num_frames=4)
    assert "accuracy,none" in results["results"]["vreason_local_video"] and len(samples) == 1
    (s,) = stats
    assert s["span_size"] == 48 and s["updates"] == s["tokens"] - 1  # 2 x (32/4)(48/4)/4 video tokens
