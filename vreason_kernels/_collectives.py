"""The torch.distributed basics every process-group path shares: which group, where a
collective can run, the all-gather (``vreason_kernels.distributed`` re-exports them), and
the argument check every rank takes part in before the first real collective.

A leaf helper because an op takes a ``process_group`` too (``linear_logprob_entropy``),
and ops sit below ``distributed`` (docs/design.md §11.1).
"""

from typing import Callable, Sequence

import torch
import torch.distributed as dist


def resolve_group(process_group):
    """``process_group``, or the default group (the world); a clear error when torch.distributed is not set up."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialized (call init_process_group first)")
    return dist.group.WORLD if process_group is None else process_group


def collective_device(process_group, device: torch.device) -> torch.device:
    """Where ``process_group`` can communicate: the tensors' own CUDA device under NCCL, else the CPU (gloo)."""
    backend = str(dist.get_backend(process_group))
    if device.type == "cuda" and "nccl" in backend:
        return device
    if "gloo" in backend or "mpi" in backend:
        return torch.device("cpu")
    raise ValueError(f"process_group: backend {backend!r} cannot communicate {device.type} tensors")


def all_gather(x: torch.Tensor, process_group) -> torch.Tensor:
    """``[world, *x.shape]``: every rank's ``x``, in rank order (one collective; exact copies)."""
    device = collective_device(process_group, x.device)
    local = x.to(device).contiguous()
    out = [torch.empty_like(local) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(out, local, group=process_group)
    return torch.stack(out).to(x.device)


def summary_device(x, process_group) -> torch.device:
    """Where a rank's argument summary travels: ``x``'s device, or (``x`` not even a tensor)
    the current CUDA device under NCCL, else the CPU, so that a rank with bad input still
    joins the check."""
    if isinstance(x, torch.Tensor):
        return x.device
    nccl = "nccl" in str(dist.get_backend(process_group)) and torch.cuda.is_available()
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def agree(op: str, check: Callable[[], Sequence[float]], names: Sequence[str], process_group, device, *,
          same: dict, decode: dict = None) -> dict:
    """Every rank's argument summary, after one all-gather of ``len(names) + 1`` floats per rank.

    ``check()`` runs this rank's argument checks and returns its numbers, one per name. A
    mismatch between ranks would otherwise surface inside the first real collective (a
    hang, or an opaque transport error) or as a silently wrong result; so the ranks swap
    their summaries first and all raise: the rank whose check failed raises its own
    error, the others a ``ValueError`` naming that rank. ``same``: ``{name: argument}``,
    numbers every rank must agree on (the error names the argument); ``decode``:
    ``{name: sequence}`` for numbers that index a sequence (dtypes, backends), to show
    the values in the error. Returns ``{name: [value of rank 0, rank 1, ...]}``.
    """
    error, mine = None, [-1.0] * len(names)
    try:
        mine = [float(value) for value in check()]
    except (TypeError, ValueError, RuntimeError) as exc:
        error = exc
    summary = torch.tensor([float(error is None), *mine], dtype=torch.float64, device=device)
    table = all_gather(summary, process_group).tolist()
    if error is not None:
        raise error
    bad = [rank for rank, row in enumerate(table) if row[0] != 1.0]
    if bad:
        raise ValueError(f"{op}: invalid input on rank(s) {bad} (see the error raised there)")
    columns = {name: [row[i] for row in table] for i, name in enumerate(names, start=1)}
    for name, arg in same.items():
        values = columns[name]
        if any(v != values[0] for v in values):
            if decode and name in decode:
                values = [decode[name][int(v)] for v in values]
            raise ValueError(f"{arg}: every rank must pass the same {name}, got {values} by rank")
    return columns
