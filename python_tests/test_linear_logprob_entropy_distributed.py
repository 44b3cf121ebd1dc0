"""``vk.linear_logprob_entropy(..., process_group=)`` on 2 and 3 gloo processes (CPU).

One spawn of 3 processes runs every check, on the whole group and on the group {0, 1}:
- logp, entropy and the gradients of hidden, each rank's weight and bias shard against the
  unsharded op on the same backend, for every backend; shards of uneven size (V = 101),
  labels on every rank's shard (so most rows' label lives on another rank), ignored rows,
  logits offset by 300 and a masked word; both outputs, logp alone and the entropy alone;
- logp, entropy and grad hidden bitwise equal on every rank, and on a second call;
- bad input (a label past the whole vocabulary, a bad bias on one rank, differing
  temperatures) raises on every rank, after which the group still works.
"""

import os

import pytest
import torch

from python_tests.distributed_utils import run_ranks, shard_bounds

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, DIM, ROWS = 101, 37, 7
BACKENDS = ("torch", "cpp", "triton")
USES = {"both": (True, True), "logp": (True, False), "entropy": (False, True)}


def _shard_bounds(rank: int, world: int):
    return shard_bounds(rank, world, VOCAB)  # uneven: 101 rows over 2 or 3 ranks


def _problem():
    g = torch.Generator().manual_seed(1234)
    hidden = torch.randn(ROWS, DIM, generator=g)
    weight = torch.randn(VOCAB, DIM, generator=g) / DIM**0.5 * 3
    bias = torch.randn(VOCAB, generator=g) + 300.0
    bias[7] = float("-inf")
    labels = torch.tensor([0, 40, 100, -100, 68, 33, 99])  # on every shard of 2 and 3 ranks, and one ignored
    return hidden, weight, bias, labels


def _run(fn, hidden, weight, bias, labels, use):
    h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
    logp, entropy = fn(h, w, labels, b)
    g = torch.Generator().manual_seed(7)
    g_logp, g_entropy = torch.randn(ROWS, generator=g), torch.randn(ROWS, generator=g)
    loss = (logp * g_logp).sum() * USES[use][0] + (entropy * g_entropy).sum() * USES[use][1]
    loss.backward()
    return logp.detach(), entropy.detach(), h.grad, w.grad, b.grad


def _close(name, got, want):
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got)), name
    err = (got[finite].double() - want[finite].double()).abs().max().item()
    scale = want[finite].double().abs().max().item()
    assert err <= 2e-6 * scale + 2e-6, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def _checks(rank, world, out_dir, group):
    import vreason_kernels as vk
    from vreason_kernels.backend import EXTENSION_STATUS

    hidden, weight, bias, labels = _problem()
    lo, hi = _shard_bounds(rank, world)
    results = {}
    for backend in BACKENDS:
        if backend == "cpp" and not EXTENSION_STATUS.loaded and os.environ.get("VREASON_REQUIRE_EXTENSION") != "1":
            continue
        for use in USES:
            def sharded(h, w, y, b):
                return vk.linear_logprob_entropy(h, w, y, b, process_group=group, backend=backend)

            got = _run(sharded, hidden, weight[lo:hi], bias[lo:hi], labels, use)
            want = _run(lambda h, w, y, b: vk.linear_logprob_entropy(h, w, y, b, backend=backend),
                        hidden, weight, bias, labels, use)
            tag = f"{backend}/{use}"
            for name, a, b in zip(("logp", "entropy", "dh", "dW", "db"), got,
                                  (want[0], want[1], want[2], want[3][lo:hi], want[4][lo:hi])):
                _close(f"{tag} {name}", a, b)
            assert bool((got[0] <= 0).all()) and got[0][3].item() == 0.0, tag
            again = _run(sharded, hidden, weight[lo:hi], bias[lo:hi], labels, use)
            assert all(torch.equal(x, y) for x, y in zip(got, again)), f"{tag}: a second call changed bits"
            results[tag] = got[:3]
    torch.save(results, os.path.join(out_dir, f"logprob{world}_{rank}.pt"))


def _bad_input_checks(rank, world, group):
    import vreason_kernels as vk

    hidden, weight, bias, labels = _problem()
    lo, hi = _shard_bounds(rank, world)
    w, b = weight[lo:hi], bias[lo:hi]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 101\)"):
        vk.linear_logprob_entropy(hidden, w, torch.full((ROWS,), VOCAB), b, process_group=group)
    with pytest.raises(ValueError, match="bias must have shape" if rank == 0 else r"rank\(s\) \[0\]"):
        vk.linear_logprob_entropy(hidden, w, labels, b[:-1] if rank == 0 else b, process_group=group)
    with pytest.raises(ValueError, match="same temperature"):
        vk.linear_logprob_entropy(hidden, w, labels, b, temperature=1.0 + rank, process_group=group)
    logp, entropy = vk.linear_logprob_entropy(hidden, w, labels, b, process_group=group)
    assert torch.isfinite(entropy).all() and bool((logp <= 0).all())


def _all_checks(rank, world, out_dir):
    import torch.distributed as dist

    pair = dist.new_group([0, 1])
    if rank < 2:
        _checks(rank, 2, out_dir, pair)
        _bad_input_checks(rank, 2, pair)
    _checks(rank, world, out_dir, dist.group.WORLD)


def test_sharded_vocabulary_matches_the_whole(tmp_path):
    out_dir = run_ranks(_all_checks, 3, tmp_path)
    for world in (2, 3):
        per_rank = [torch.load(os.path.join(out_dir, f"logprob{world}_{r}.pt")) for r in range(world)]
        for tag, first in per_rank[0].items():
            for rank in range(1, world):
                for name, a, b in zip(("logp", "entropy", "dh"), first, per_rank[rank][tag]):
                    assert torch.equal(a, b), f"{tag}: {name} differs between rank 0 and rank {rank}"
