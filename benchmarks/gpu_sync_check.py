"""A V-Reason decode loop on CUDA under ``torch.cuda.set_sync_debug_mode("error")``.

Every host-device synchronisation inside the per-token loop raises, except the engine's
designed ones: the periodic EOS check (one sync every ``EOS_CHECK_INTERVAL`` tokens), and
the set-up before and the output after the loop. Model: the random-weight tiny Llama of
the tests (python_tests/tiny_models.py), controller on, an update at every token.

    python benchmarks/gpu_sync_check.py [--tokens 40] [--out FILE.json]

With ``--out`` it also writes a benchmark record (benchmarks/harness.py) of the check.
"""

import argparse
import contextlib
import pathlib
import sys

import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import harness  # noqa: E402
import vreason_kernels as vk  # noqa: E402
from python_tests.tiny_models import tiny_llama  # noqa: E402
from vreason_kernels.engine.recorder import Recorder  # noqa: E402


@contextlib.contextmanager
def sync_debug(mode: str):
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(previous)


def strict_decode_loop(recorder_cls):
    """Patch the recorder so that "error" mode spans the loop, relaxed only for the EOS check."""
    original = (recorder_cls.mark_prefill_done, recorder_cls.all_finished, recorder_cls.output)

    def mark_prefill_done(self):
        original[0](self)
        torch.cuda.set_sync_debug_mode("error")

    def all_finished(self, k):
        with sync_debug("default"):  # the designed sync, every EOS_CHECK_INTERVAL tokens
            return original[1](self, k)

    def output(self, **stats):
        torch.cuda.set_sync_debug_mode("default")
        return original[2](self, **stats)

    recorder_cls.mark_prefill_done, recorder_cls.all_finished, recorder_cls.output = (
        mark_prefill_done, all_finished, output)
    return original


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=40)
    parser.add_argument("--out", type=pathlib.Path, default=None, help="also write a JSON record here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("needs CUDA", file=sys.stderr)
        return 2
    run = harness.Run("gpu_sync_check", "host syncs in the V-Reason decode loop (CUDA)", args, "cuda",
                      argv=None if argv is None else [__file__, *argv])
    model = tiny_llama().cuda()
    ids = torch.randint(0, model.config.vocab_size, (1, 37), device="cuda")
    config = vk.VReasonConfig(every=1)
    vk.generate(model, ids, config=config, max_new_tokens=4)  # warm-up: compiles and autotunes
    original = strict_decode_loop(Recorder)
    try:
        out = vk.generate(model, ids, config=config, max_new_tokens=args.tokens)
    finally:
        Recorder.mark_prefill_done, Recorder.all_finished, Recorder.output = original
        torch.cuda.set_sync_debug_mode("default")
    tokens = out.sequences.shape[1] - ids.shape[1]
    print(f"ok: {tokens} tokens, {out.stats['updates']} updates, "
          "no host sync in the decode loop besides the EOS checks")
    if args.out:
        run.rows.append({"check": "sync_debug_mode error", "result": "ok", "tokens": tokens,
                         "updates": out.stats["updates"]})
        run.write(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
