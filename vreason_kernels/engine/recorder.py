"""``Recorder``: the preallocated tokens and traces of one call, the bookkeeping of
finished rows on device, the timings, and the ``VReasonOutput`` they make.
"""

import time
from typing import Callable, Optional

import torch

from vreason_kernels.engine.output import VReasonOutput
from vreason_kernels.engine.request import DecodeRequest

# Finished samples are checked on the host once every this many tokens: the only
# host-device sync of the decode loop. Up to this many - 1 extra steps may run after
# the last sample finished; their tokens are padding and are trimmed.
EOS_CHECK_INTERVAL = 8


class Recorder:
    """Preallocated tokens and traces; the bookkeeping of finished rows on device.

    By default (``vk.generate``) a row ends at one of the request's EOS ids, its later
    tokens are the pad id, and the host looks at the finished rows every
    ``EOS_CHECK_INTERVAL`` tokens. ``model.generate``'s stopping rules differ, so its
    integration passes its own: ``row_end(token [B]) -> bool [B] or None`` (the rows that
    this token ends; it sees every recorded token, in order), ``check_every`` and
    ``pad_finished`` (whether finished rows get the pad id).
    """

    def __init__(self, request: DecodeRequest, *, row_end: Optional[Callable] = None,
                 check_every: int = EOS_CHECK_INTERVAL, pad_finished: bool = True):
        b, n = request.batch, request.max_new_tokens
        device = request.input_ids.device
        self.request = request
        self.row_end = row_end if row_end is not None else self._eos_row_end
        self.check_every = check_every
        self.pad_finished = pad_finished
        self.tokens = torch.full((b, n), request.pad_id, dtype=torch.long, device=device)
        self.traces = {
            name: torch.full((b, n), float("nan"), dtype=torch.float32, device=device)
            for name in ("entropy", "entropy_ema", "alpha", "delta_norm")
        }
        self.finished = torch.zeros(b, dtype=torch.bool, device=device)
        self.alive = torch.zeros((b, n), dtype=torch.bool, device=device)  # unfinished before token k
        self.steps = 0
        self.device = device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.sync()
        self.start = time.perf_counter()
        self.prefill_end = None

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def mark_prefill_done(self):
        self.sync()
        self.prefill_end = time.perf_counter()

    def _eos_row_end(self, token: torch.Tensor) -> Optional[torch.Tensor]:
        eos_ids = self.request.eos_ids
        return None if eos_ids is None else torch.isin(token, eos_ids)

    def record(self, k: int, token: torch.Tensor, **traces: torch.Tensor) -> torch.Tensor:
        """Store step ``k`` (0-based); return the token to feed next (pad once finished)."""
        if self.pad_finished:
            token = torch.where(self.finished, torch.full_like(token, self.request.pad_id), token)
        self.alive[:, k] = ~self.finished
        self.tokens[:, k] = token
        for name, value in traces.items():
            self.traces[name][:, k] = value.float()
        ended = self.row_end(token)
        if ended is not None:
            self.finished |= ended
        self.steps = k + 1
        if self.request.progress is not None:
            self.request.progress(self.steps)
        return token

    def all_finished(self, k: int) -> bool:
        """The periodic check of finished rows (a host sync only every ``check_every`` tokens)."""
        return (k + 1) % self.check_every == 0 and bool(self.finished.all())

    def output(self, **stats) -> VReasonOutput:
        self.sync()
        end = time.perf_counter()
        keep = int(self.alive[:, : self.steps].any(0).sum())  # columns up to the last EOS
        alive = self.alive[:, :keep]
        traces = {name: t[:, :keep].masked_fill(~alive, float("nan")) for name, t in self.traces.items()}
        prefill_end = self.prefill_end if self.prefill_end is not None else end
        decode_s = end - prefill_end
        device = self.device
        stats = {
            "tokens": int(alive.sum()),
            "steps": self.steps,
            "prefill_s": prefill_end - self.start,
            "decode_s": decode_s,
            "wall_s": end - self.start,
            # The first token comes from the prefill: steps - 1 decode forwards follow it.
            "time_per_token_s": decode_s / max(self.steps - 1, 1),
            "peak_memory_bytes": torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None,
            **stats,
        }
        sequences = torch.cat([self.request.input_ids, self.tokens[:, :keep]], dim=1)
        return VReasonOutput(sequences=sequences, stats=stats, **traces)
