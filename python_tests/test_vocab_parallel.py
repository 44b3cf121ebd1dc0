"""``vocab_parallel_linear_entropy`` and sharded token choice on 2 and 3 gloo processes (CPU).

One spawn of 3 processes runs every check, on the whole group and on a group of ranks
{0, 1} (spawning costs seconds, the checks do not):
- entropy, dH/dh, dW and db of each rank's shard against the unsharded ``vk.linear_entropy``
  on the same backend, for every backend, with V not divisible by the world size, logits
  offset by 300, and a summed (expanded), a strided and a random output gradient;
- the entropy and dH/dh bitwise equal on every rank (compared in the parent), and every
  result bitwise equal on a second call;
- greedy and sampled tokens (temperature, min-p) equal to the unsharded
  ``select_next_token`` with an equally seeded generator, ties across a shard boundary;
- bad input (a shard of the wrong size, D differing between ranks, a bad bias or a
  non-tensor hidden on one rank, hidden.requires_grad or the row count differing, top-p
  with a sharded vocabulary) raises a clear
  error on every rank, after which the group still works.
"""

import os

import pytest
import torch

from python_tests.distributed_utils import run_ranks, shard_bounds

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

VOCAB, DIM, ROWS = 101, 37, 5
BACKENDS = ("torch", "cpp", "triton")


def _shard_bounds(rank: int, world: int, vocab: int = VOCAB):
    return shard_bounds(rank, world, vocab)


def _problem():
    g = torch.Generator().manual_seed(1234)
    hidden = torch.randn(ROWS, DIM, generator=g)
    weight = torch.randn(VOCAB, DIM, generator=g) / DIM**0.5
    bias = torch.randn(VOCAB, generator=g) + 300.0  # a large common offset
    bias[7] = float("-inf")  # a masked vocabulary entry
    return hidden, weight, bias


def _output_grads():
    g = torch.Generator().manual_seed(99)
    return {
        "sum": None,  # .sum(): an expanded (stride 0) gradient
        "strided": torch.randn(2 * ROWS, generator=g)[::2],
        "random": torch.randn(ROWS, generator=g),
    }


def _run(fn, hidden, weight, bias, grad):
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    entropy = fn(h, w, b)
    (entropy.sum() if grad is None else (entropy * grad).sum()).backward()
    return entropy.detach(), h.grad, w.grad, b.grad


def _close(name, got, want):
    err = (got.double() - want.double()).abs().max().item()
    scale = want.double().abs().max().item()
    assert err <= 2e-6 * scale + 1e-6, f"{name}: max error {err:.3g} (scale {scale:.3g})"


def _entropy_checks(rank, world, out_dir, group, grad_kinds):
    import vreason_kernels as vk
    from vreason_kernels.distributed import vocab_parallel_linear_entropy

    hidden, weight, bias = _problem()
    lo, hi = _shard_bounds(rank, world)
    results = {}
    from vreason_kernels.backend import EXTENSION_STATUS

    for backend in BACKENDS:
        if backend == "cpp" and not EXTENSION_STATUS.loaded and os.environ.get("VREASON_REQUIRE_EXTENSION") != "1":
            continue  # no C++ extension here: the C++ cases of the single-process tests skip with the reason
        for kind in grad_kinds:
            grad = _output_grads()[kind]
            sharded = _run(
                lambda h, w, b: vocab_parallel_linear_entropy(h, w, b, process_group=group, vocab_size=VOCAB,
                                                              backend=backend),
                hidden, weight[lo:hi], bias[lo:hi], grad,
            )
            whole = _run(lambda h, w, b: vk.linear_entropy(h, w, b, backend=backend), hidden, weight, bias, grad)
            tag = f"{backend}/{kind}"
            _close(f"{tag} entropy", sharded[0], whole[0])
            _close(f"{tag} dH/dh", sharded[1], whole[1])
            _close(f"{tag} dW", sharded[2], whole[2][lo:hi])
            _close(f"{tag} db", sharded[3][torch.isfinite(sharded[3])], whole[3][lo:hi][torch.isfinite(sharded[3])])
            results[tag] = (sharded[0], sharded[1])
            again = _run(
                lambda h, w, b: vocab_parallel_linear_entropy(h, w, b, process_group=group, backend=backend),
                hidden, weight[lo:hi], bias[lo:hi], grad,
            )
            assert all(torch.equal(x, y) for x, y in zip(sharded, again)), f"{tag}: a second call changed bits"
    # No gradient wanted: only (m, s, t) travel; lead dims and returned shard logits.
    entropy, logits = vocab_parallel_linear_entropy(hidden.view(1, ROWS, DIM), weight[lo:hi], bias[lo:hi],
                                                    process_group=group, return_logits=True)
    _close("no-grad entropy", entropy[0], vk.linear_entropy(hidden, weight, bias))
    assert torch.equal(logits[0], torch.nn.functional.linear(hidden, weight[lo:hi], bias[lo:hi]))
    torch.save(results, os.path.join(out_dir, f"entropy{world}_{rank}.pt"))


def _token_checks(rank, world, group):
    from vreason_kernels.distributed.collectives import VocabRows
    from vreason_kernels.engine.sampling import select_next_token

    lo, hi = _shard_bounds(rank, world)
    vocab = VocabRows(hi - lo, "cpu", group)  # one per layout, as the engine keeps it
    g = torch.Generator().manual_seed(5)
    logits = torch.randn(4, VOCAB, generator=g) * 3
    top = logits[1].max() + 1
    for r in range(1, world):  # ties inside shards and across shard boundaries (not in rank 0's)
        r_lo, r_hi = _shard_bounds(r, world)
        logits[1, r_lo] = logits[1, r_hi - 1] = top
    logits[2] = 0.0  # ... and across all shards: the lowest index must win
    logits[3, 3] = float("-inf")
    settings = [dict(do_sample=False, temperature=1.0, top_p=1.0, min_p=0.0)]
    settings += [dict(do_sample=True, temperature=t, top_p=1.0, min_p=p) for t in (1.0, 0.7) for p in (0.0, 0.05)]
    for sampling in settings:
        for seed in range(12):
            kw = dict(sampling)
            want = select_next_token(logits, **kw, generator=torch.Generator().manual_seed(seed))
            got = select_next_token(logits[:, lo:hi], **kw, generator=torch.Generator().manual_seed(seed),
                                    vocab=vocab)
            assert torch.equal(got, want), (sampling, seed, got, want)
    with pytest.raises(ValueError, match="top_p"):
        select_next_token(logits[:, lo:hi], do_sample=True, temperature=1.0, top_p=0.9, min_p=0.0, generator=None,
                          vocab=vocab)


def _bad_input_checks(rank, world, group):
    from vreason_kernels.distributed import vocab_parallel_linear_entropy

    hidden, weight, bias = _problem()
    lo, hi = _shard_bounds(rank, world)
    w, b = weight[lo:hi], bias[lo:hi]
    last = rank == world - 1

    with pytest.raises(ValueError, match="wrong size"):  # the last rank's shard lacks a row
        vocab_parallel_linear_entropy(hidden, w[:-1] if last else w, b[:-1] if last else b, vocab_size=VOCAB,
                                      process_group=group)
    with pytest.raises(ValueError, match="same D"):
        h2 = torch.randn(ROWS, DIM + 1) if last else hidden
        w2 = torch.randn(hi - lo, DIM + 1) if last else w
        vocab_parallel_linear_entropy(h2, w2, b, process_group=group)
    with pytest.raises(ValueError, match="bias must have shape" if rank == 0 else r"rank\(s\) \[0\]"):
        vocab_parallel_linear_entropy(hidden, w, b[:-1] if rank == 0 else b, process_group=group)
    with pytest.raises(TypeError if rank == 0 else ValueError, match="hidden" if rank == 0 else r"rank\(s\) \[0\]"):
        vocab_parallel_linear_entropy(hidden.tolist() if rank == 0 else hidden, w, b, process_group=group)
    with pytest.raises(ValueError, match="requires_grad"):
        vocab_parallel_linear_entropy(hidden.clone().requires_grad_(last), w, b, process_group=group)
    with pytest.raises(ValueError, match="rows"):
        vocab_parallel_linear_entropy(hidden[:-1] if last else hidden, w, b, process_group=group)
    # The group is still in step after every refusal.
    assert torch.isfinite(vocab_parallel_linear_entropy(hidden, w, b, process_group=group)).all()


def _all_checks(rank, world, out_dir):
    import torch.distributed as dist

    pair = dist.new_group([0, 1])  # every rank takes part in creating it
    if rank < 2:  # 2 ranks: every backend with every kind of output gradient, and bad input
        _entropy_checks(rank, 2, out_dir, pair, grad_kinds=tuple(_output_grads()))
        _token_checks(rank, 2, pair)
        _bad_input_checks(rank, 2, pair)
    _entropy_checks(rank, world, out_dir, dist.group.WORLD, grad_kinds=("random",))
    _token_checks(rank, world, dist.group.WORLD)


def test_vocab_parallel_matches_unsharded(tmp_path):
    out_dir = run_ranks(_all_checks, 3, tmp_path)
    for world in (2, 3):
        _check_same_bits(out_dir, world)


def _check_same_bits(out_dir, world):
    per_rank = [torch.load(os.path.join(out_dir, f"entropy{world}_{r}.pt")) for r in range(world)]
    for tag, (entropy, dh) in per_rank[0].items():
        for rank in range(1, world):
            other_entropy, other_dh = per_rank[rank][tag]
            assert torch.equal(entropy, other_entropy), f"{tag}: entropy differs between rank 0 and rank {rank}"
            assert torch.equal(dh, other_dh), f"{tag}: dH/dh differs between rank 0 and rank {rank}"
