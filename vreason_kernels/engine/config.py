"""``VReasonConfig``: the controller's hyper-parameters, validated on construction."""

from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

from vreason_kernels._checks import check_bool, check_int, check_number
from vreason_kernels.backend import check_backend

OPTIMIZERS = ("adam", "adamw", "sgd")
EMA_INITS = ("first", "zero")

OptimizerSpec = Union[str, Callable[[list, float], torch.optim.Optimizer]]


@dataclass
class VReasonConfig:
    """Hyper-parameters of V-Reason decoding. ``VReasonConfig()`` is what ``vk.generate``
    runs when given no config; ``VReasonConfig(enabled=False)`` is the plain-decoding baseline.

    Attributes:
        enabled: run the entropy controller (default ``True``). ``False`` decodes plainly
            through the same loop: the baseline.
        lr: learning rate of the optimizer on ``ΔV`` (default ``5e-2``: the fewest output
            tokens at base accuracy in benchmarks/results/tune_defaults.md, a margin within
            noise on SmolLM2-135M; see docs/tuning.md). Sane range: 1e-3 to 2e-1, the range
            the benchmarks tried. Adam moves each entry of ``ΔV`` by up to about ``lr`` per
            update, so ``ΔV`` grows roughly like ``lr`` times the number of updates; at
            the default, 256 tokens on SmolLM2 end near 0.3× ``‖V‖`` at the span. Far
            larger rates let ``ΔV`` swamp the values it modulates: ``generate`` then warns
            once per call, when ``‖ΔV‖`` exceeds 10× ``‖V‖`` at the span
            (``engine.guard.RUNAWAY_RATIO``).
        steps: optimizer steps per update (default ``1``). Steps after the first re-run
            only the controlled layer(s) and the head, never the cache.
        every: run an update every ``every`` decode forwards (default ``1``, the most
            accurate and most costly setting).
        ema_beta: ``H_ema_k = β H_ema_{k-1} + (1 - β) H_k`` (default ``0.9``).
        ema_init: how the EMA starts (default ``"zero"``; docs/tuning.md has the
            evidence). ``"zero"``: ``H_ema_0 = 0`` with no bias correction, so the EMA
            climbs for about ``1 / (1 - β)`` tokens (``α = +1``, exploration) before it
            can peak. ``"first"``: ``H_ema_1 = H_1``, so when the first token is the most
            uncertain one the peak is at token 1 and ``α = -1`` from then on.
        optimizer: ``"adam"`` (default), ``"adamw"``, ``"sgd"``, or a callable
            ``(params, lr) -> torch.optim.Optimizer``. Optimizers must act elementwise
            (all of these do) so that the samples of a batch stay independent.
        layer: index of the decoder layer whose value cache gets ``ΔV`` (default
            ``None``: the last one, as in the paper; negative indices count from the end).
        keep_ratio: "Lite" mode: after prefill keep only this fraction of the span's
            positions (largest value norm) in every layer's cache (default ``1.0``: off).
        max_delta_norm: bound on the L2 norm of every ``ΔV`` row (one (batch, kv-head,
            position) vector), applied after each optimizer step (default ``None``: no
            bound). The norm-preserving map already keeps ``||V'|| = ||V||``; the bound
            only limits how far a row can turn.
        backend: backend of the fused ops (default ``"auto"``: Triton on CUDA, C++ on CPU).
    """

    enabled: bool = True
    lr: float = 5e-2
    steps: int = 1
    every: int = 1
    ema_beta: float = 0.9
    ema_init: str = "zero"
    optimizer: OptimizerSpec = "adam"
    layer: Optional[int] = None
    keep_ratio: float = 1.0
    max_delta_norm: Optional[float] = None
    backend: str = "auto"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field (errors name it); ``generate`` calls it again on each run."""
        check_bool("enabled", self.enabled)
        check_number("lr", self.lr, low=0.0, low_open=True)
        check_int("steps", self.steps, low=1)
        check_int("every", self.every, low=1)
        check_number("ema_beta", self.ema_beta, low=0.0, high=1.0, high_open=True)
        if self.ema_init not in EMA_INITS:
            raise ValueError(f"ema_init must be one of {EMA_INITS}, got {self.ema_init!r}")
        if not (callable(self.optimizer) or self.optimizer in OPTIMIZERS):
            raise ValueError(f"optimizer must be one of {OPTIMIZERS} or a callable (params, lr), got {self.optimizer!r}")
        if self.layer is not None:
            check_int("layer", self.layer)
        check_number("keep_ratio", self.keep_ratio, low=0.0, high=1.0, low_open=True)
        if self.max_delta_norm is not None:
            check_number("max_delta_norm", self.max_delta_norm, low=0.0, low_open=True)
        check_backend(self.backend)

    def make_optimizer(self, delta: torch.Tensor) -> torch.optim.Optimizer:
        """The optimizer over the single leaf tensor ``delta``."""
        if callable(self.optimizer):
            optimizer = self.optimizer([delta], self.lr)
            if not isinstance(optimizer, torch.optim.Optimizer):
                raise TypeError(
                    f"optimizer: the callable must return a torch.optim.Optimizer, got {type(optimizer).__name__}"
                )
            return optimizer
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}[self.optimizer]
        # foreach=False: one tensor, and the single-tensor path has no host syncs on CPU or CUDA.
        return cls([delta], lr=self.lr, foreach=False)

    def layer_index(self, num_layers: int) -> int:
        """The controlled layer as an index in ``[0, num_layers)``."""
        layer = num_layers - 1 if self.layer is None else self.layer
        if not -num_layers <= layer < num_layers:
            raise ValueError(f"layer must lie in [-{num_layers}, {num_layers}) for this model, got {self.layer}")
        return layer % num_layers

