"""Running a test body in several gloo processes on CPU, robustly.

``run_ranks(fn, world, tmp_path, *args)`` spawns ``world`` processes that each call
``fn(rank, world, out_dir, *args)`` inside an initialised gloo group. The rendezvous is a
``FileStore`` in the test's own ``tmp_path`` (no port to collide with other runs), every
collective times out after ``COLLECTIVE_TIMEOUT_S``, and the whole run is killed and fails
after ``timeout_s``: a hang fails fast instead of stalling CI. A worker's exception fails
the test with its traceback. ``fn`` must be a module-level function (spawn pickles it).
"""

import datetime
import os
import time

import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT_S = 60


def _worker(rank, fn, world, store, out_dir, args):
    import torch.distributed as dist

    # What torchrun sets: transformers' tp_plan="auto" sizes its mesh from WORLD_SIZE.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S),
    )
    try:
        fn(rank, world, out_dir, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(fn, world: int, tmp_path, *args, timeout_s: float = 240.0) -> str:
    """Run ``fn`` on ``world`` gloo ranks; return the output folder the ranks wrote into."""
    out_dir = os.path.join(str(tmp_path), f"ranks{world}")
    os.makedirs(out_dir, exist_ok=True)
    store = os.path.join(str(tmp_path), f"store{world}")
    context = mp.start_processes(_worker, args=(fn, world, store, out_dir, args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{world} ranks did not finish within {timeout_s} s (a hang in a collective?)")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return out_dir


def shard_bounds(rank: int, world: int, vocab: int) -> tuple:
    """transformers' colwise layout: ceil(V / world) rows per rank, the last rank shorter."""
    per = -(-vocab // world)
    start = min(rank * per, vocab)
    return start, min(start + per, vocab)
