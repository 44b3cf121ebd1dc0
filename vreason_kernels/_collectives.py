"""The torch.distributed basics every process-group path shares: which group, where a
collective can run, and the all-gather (``vreason_kernels.distributed`` re-exports them).

A leaf helper because an op takes a ``process_group`` too (``linear_logprob_entropy``),
and ops sit below ``distributed`` (docs/design.md §11.1).
"""

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
