"""The V-Reason controller state, all on device (no ``.item()``):

- ``EntropySwitch``: EMA of the entropy, its running peak and the switch ``α_k``.
- ``DeltaV``: the value-cache delta ``ΔV [B, Hkv, S, D]`` (float32 master copy), its
  optimizer, the per-row norm bound and the NaN/Inf reset. Shared with the reference.
- ``LayerRerun``: captures the controlled layer's input during the main forward and
  re-runs it (and any later layers) for the current token against the cached K/V, with
  the final norm and the fused entropy, to get ``dH/dΔV`` (engine only).
"""

import math
from typing import Optional

import torch

from vreason_kernels.engine.config import VReasonConfig
from vreason_kernels.distributed.collectives import all_gather, all_max
from vreason_kernels.engine.hf_cache import replace_cache_kwarg


class EntropySwitch:
    """``H_ema_k = β H_ema_{k-1} + (1 - β) H_k``, its running peak, and ``α_k = -1`` if
    ``H_ema_k < peak_k`` else ``+1``, per sample. The EMA starts at ``H_1`` (``init="first"``)
    or at ``H_ema_0 = 0`` (``init="zero"``, no bias correction: it climbs before it peaks).
    The defaults are ``VReasonConfig``'s ``ema_beta`` and ``ema_init``."""

    def __init__(self, beta: float = VReasonConfig.ema_beta, init: str = VReasonConfig.ema_init):
        self.beta = beta
        self.init = init
        self.ema = None
        self.peak = None

    def observe(self, entropy: torch.Tensor):
        """Feed ``H_k [B]``; return ``(H_ema_k, α_k)``, both ``[B]`` float32."""
        entropy = entropy.detach().float()
        if self.ema is None:
            self.ema = entropy.clone() if self.init == "first" else torch.zeros_like(entropy)
        self.ema = torch.lerp(entropy, self.ema, self.beta)
        self.peak = self.ema.clone() if self.peak is None else torch.maximum(self.peak, self.ema)
        alpha = torch.where(self.ema < self.peak, -1.0, 1.0)
        return self.ema, alpha


class DeltaV:
    """``ΔV`` with its optimizer. Rows are independent: the optimizers act elementwise and
    the loss is a sum over samples, so a batch behaves like its samples run one by one.

    ``member [B, S]`` (optional, see engine/spans.py): the span positions each row owns.
    Entries outside it get no gradient and are held at exactly zero.

    ``process_group``: under tensor parallelism each rank holds the ΔV of its own kv heads. The
    elementwise step is local; the per-sample quantities (non-finite reset, reported
    norm) are reduced over the group so that every rank agrees.
    """

    def __init__(self, config: VReasonConfig, shape, device, member: Optional[torch.Tensor] = None,
                 process_group=None):
        self.process_group = process_group
        self.delta = torch.zeros(shape, dtype=torch.float32, device=device, requires_grad=True)
        self.optimizer = config.make_optimizer(self.delta)
        self.max_norm = config.max_delta_norm
        self.nan_resets = torch.zeros((), dtype=torch.long, device=device)
        self.foreign = None if member is None else ~member[:, None, :, None]  # [B, 1, S, 1]

    def step(self, loss: torch.Tensor) -> None:
        """Backpropagate ``loss`` into ``ΔV``, step, reset non-finite samples, bound the rows."""
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.foreign is not None and self.delta.grad is not None:
            # Zero gradient keeps Adam/SGD moments at zero, so these entries stay 0 exactly;
            # the fill after the step holds them there for any other optimizer as well.
            self.delta.grad.masked_fill_(self.foreign, 0.0)
        self.optimizer.step()
        with torch.no_grad():
            if self.foreign is not None:
                self.delta.masked_fill_(self.foreign, 0.0)
            self._reset_non_finite()
            if self.max_norm is not None:
                norms = torch.linalg.vector_norm(self.delta, dim=-1, keepdim=True)
                self.delta.mul_((self.max_norm / norms).clamp(max=1.0))  # norm 0 -> inf -> 1

    def _reset_non_finite(self) -> None:
        # A sample whose ΔV (or optimizer state) went NaN/Inf restarts from zero; the
        # others continue. Counted on device and reported at the end (no sync here).
        bad = ~torch.isfinite(self.delta).flatten(1).all(1)
        if self.process_group is not None:
            bad = all_max(bad.int(), self.process_group).bool()
        self.nan_resets += bad.sum()
        view = bad.view(-1, *([1] * (self.delta.dim() - 1)))
        for t in [self.delta, *self._state_tensors()]:
            t.copy_(torch.where(view, torch.zeros_like(t), t))

    def _state_tensors(self):
        state = self.optimizer.state.get(self.delta, {})
        return [t for t in state.values() if isinstance(t, torch.Tensor) and t.shape == self.delta.shape]

    def norms(self) -> torch.Tensor:
        """``||ΔV||`` per sample, ``[B]`` (over every rank's shard, summed in rank order)."""
        return sample_norms(self.delta.detach(), self.process_group)


def sample_norms(x: torch.Tensor, process_group=None) -> torch.Tensor:
    """Frobenius norm of each sample of ``x [B, ...]``, ``[B]`` float32; with ``process_group``,
    over every rank's shard of ``x`` (squares summed in rank order, so ranks agree)."""
    x = x.float().flatten(1)
    if process_group is None:
        return torch.linalg.vector_norm(x, dim=1)
    return all_gather(x.square().sum(1), process_group).sum(0).sqrt()


class LayerRerun:
    """Re-runs decoder layers ``first..last`` for the current token with the gradient on.

    Forward pre-hooks on those layers record each one's inputs (hidden state, mask, RoPE
    ``position_embeddings``, ...) during the main forward. The controlled layer is re-run
    with no cache and attends over its cached K/V through the context's ``kv_override``/
    ``mask_override`` (its own current-token K/V do not depend on ``ΔV``). Later layers,
    re-run when the controlled layer is not the last one, do depend on ``ΔV`` through
    their current-token K/V: they attend over their cached prefix plus freshly computed
    K/V (``_PrefixCache``), so the gradient has every path. The cache itself is never
    touched.
    """

    def __init__(self, layers, first: int):
        self.layers = layers
        self.first = first
        self.captured = {}
        self.handles = [
            layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True) for i in range(first, len(layers))
        ]

    def _hook(self, index: int):
        def capture(module, args, kwargs):
            self.captured[index] = (args, kwargs)

        return capture

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def forward(self, context, cache, norm: torch.nn.Module) -> torch.Tensor:
        """Final-normed hidden state ``[B, D]`` of the current token, re-computed with the
        context's current ``delta_v`` (which may require grad)."""
        args, kwargs = self.captured[self.first]
        hidden = args[0] if args else kwargs["hidden_states"]
        prefix = _PrefixCache(cache)
        for i in range(self.first, len(self.layers)):
            kw = {k: v for k, v in self.captured[i][1].items() if k != "hidden_states"}
            kw = replace_cache_kwarg(kw, None if i == self.first else prefix)
            kw["use_cache"] = False
            if i == self.first:
                context.kv_override[i] = (cache.layers[i].keys, cache.layers[i].values)
                if kw.get("attention_mask") is not None:
                    context.mask_override[i] = kw["attention_mask"]
            hidden = self.layers[i](hidden, **kw)
            hidden = hidden[0] if isinstance(hidden, tuple) else hidden
        return norm(hidden)[:, -1]

    def clear(self, context) -> None:
        context.kv_override.pop(self.first, None)
        context.mask_override.pop(self.first, None)
        self.captured.clear()


class _PrefixCache:
    """Read-only view of a cache without its last (current-token) entry: ``update``
    returns the prefix with the freshly computed K/V appended and stores nothing."""

    def __init__(self, cache):
        self.cache = cache

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.cache.layers[layer_idx]
        return (
            torch.cat([layer.keys[..., :-1, :], key_states], dim=-2),
            torch.cat([layer.values[..., :-1, :], value_states], dim=-2),
        )


def kl_to_uniform_loss(entropy: torch.Tensor, alpha: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """``Σ_b α_b (log|V| - H_b)``: the switch loss ``α KL(p || U)`` summed over samples."""
    return (alpha * (math.log(vocab_size) - entropy)).sum()


def fused_update(config: VReasonConfig, delta: DeltaV, rerun: LayerRerun, context, cache, parts, alpha,
                 entropy: Optional[torch.Tensor] = None) -> None:
    """``config.steps`` optimizer steps on ``ΔV`` for the current token (grad only through
    the controlled layer onwards, the final norm and the fused entropy).

    ``entropy``: ``H_k`` already differentiable in ``ΔV`` (the token's forward built the
    graph), which spares the first step its re-run; ``None`` re-runs for every step.
    """
    layer = rerun.first
    try:
        for step in range(config.steps):
            with torch.enable_grad():
                if step > 0 or entropy is None:
                    context.delta_v[layer] = delta.delta.to(cache.layers[layer].values.dtype)
                    hidden = rerun.forward(context, cache, parts.norm)
                    entropy = parts.entropy(hidden, backend=config.backend)
                loss = kl_to_uniform_loss(entropy, alpha, parts.vocab_size)
            delta.step(loss)
    finally:
        rerun.clear(context)
        context.delta_v[layer] = delta.delta.detach().to(cache.layers[layer].values.dtype)
