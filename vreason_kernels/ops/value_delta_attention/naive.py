"""Pure-PyTorch reference for value-delta attention: the spec the kernels must match.

Value rows at the span positions are replaced by the norm-preserving map (docs/design.md §2.2)

    u = v + delta,   n = max(||u||, eps),   v' = u ||v|| / n        (eps = 1e-6)

with the norm taken per (batch, kv-head, position) vector of length D, and then

    out[t] = sum_i p[t, i] v'[i],   p[t] = softmax_i(scale q[t].k[i] + bias[t, i])

with GQA (q-head h reads kv-head h // (Hq / Hkv)), ``bias`` the additive mask and a
bottom-right aligned causal mask (query t sees key i iff i <= t + N - T, as in
flash-attn). A query row that sees no key outputs 0 and gets zero gradients.

Two things live here:
- ``value_delta_attention``: the differentiable reference with the public signature,
  materialising v' and using an explicit softmax; it runs in the inputs' dtype, so it is
  both the float64 reference and the same-dtype baseline of the tests.
- ``forward``/``backward``: the ``"torch"`` backend of the custom op (op.py), with the
  contract every backend shares. Custom-op bodies run below autograd, so the backward
  is in closed form (docs/design.md §2.3 chained through §2.2).
"""

from typing import Optional

import torch

from vreason_kernels.ops.value_delta_attention.contract import EPS, mask_to_bias


def row_norm(x: torch.Tensor) -> torch.Tensor:
    """||x|| over the last dim (keepdim). Where the plain sum of squares overflows although
    the entries are finite (fp32/bf16 rows past ~1.8e19), the row is first divided by its
    largest |x_d|: vector_norm alone gives inf there, and v' = u ||v|| / inf = 0."""
    norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
    big = x.abs().amax(-1, keepdim=True)
    scaled = big * torch.linalg.vector_norm(x / torch.where(big > 0, big, torch.ones_like(big)), dim=-1, keepdim=True)
    return torch.where(torch.isinf(norm), scaled, norm)


def modulate_rows(value: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """v' = (v + delta) ||v|| / max(||v + delta||, eps) row-wise over the last dim."""
    u = value + delta
    return u * (row_norm(value) / row_norm(u).clamp_min(EPS))


def causal_bias(t: int, n: int, device, dtype: torch.dtype) -> torch.Tensor:
    """[T, N] additive causal mask, bottom-right aligned: row t sees key i iff i <= t + N - T."""
    rows = torch.arange(t, device=device).unsqueeze(1) + (n - t)
    keep = torch.arange(n, device=device).unsqueeze(0) <= rows
    return torch.zeros((), dtype=dtype, device=device).where(keep, float("-inf"))


def _scores(query, key, attn_bias, scale: float, causal: bool) -> torch.Tensor:
    """Masked scores grouped by kv-head: [B, Hkv, G, T, N] (G = Hq / Hkv) in query's dtype."""
    b, hq, t, d = query.shape
    hkv, n = key.shape[1], key.shape[2]
    # The G q-heads of a kv-head share its keys: one [G T, N] product per kv-head, no
    # broadcast copies of K (or of V below).
    s = (query.reshape(b, hkv, hq // hkv * t, d) @ key.transpose(-1, -2)).view(b, hkv, hq // hkv, t, n) * scale
    if attn_bias is not None:
        s = s + attn_bias.to(s.dtype).expand(b, hq, t, n).reshape(b, hkv, hq // hkv, t, n)
    if causal:
        s = s + causal_bias(t, n, s.device, s.dtype)
    return s


def _softmax(s: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim that gives 0 (not NaN) on rows with every entry -inf."""
    m = s.detach().amax(-1, keepdim=True)
    e = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
    total = e.sum(-1, keepdim=True)
    return e / torch.where(total > 0, total, torch.ones_like(total))


def value_delta_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    delta_v: Optional[torch.Tensor] = None,
    span: Optional[torch.Tensor] = None,
    *,
    attention_mask: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    causal: bool = True,
) -> torch.Tensor:
    """Differentiable reference with the public signature, computed in the inputs' dtype."""
    if delta_v is not None:
        span = span.long()
        value = value.index_copy(2, span, modulate_rows(value.index_select(2, span), delta_v))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = _scores(query, key, mask_to_bias(attention_mask, query.dtype), scale, causal)
    return (_softmax(s).flatten(2, 3) @ value).view(query.shape)


# ---- the "torch" backend of the custom op: same contract as the fused backends ----


def _acc(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _span_rows(delta_v, span_index):
    """(in_span [N, 1] bool, delta gathered onto positions [B, Hkv, N, D], 0 off the span)."""
    in_span = (span_index >= 0).unsqueeze(-1)
    delta = _acc(delta_v).index_select(2, span_index.clamp_min(0).long())
    return in_span, delta * in_span


def _modulated_values(value, delta_v, span_index) -> torch.Tensor:
    v = _acc(value)
    if delta_v is None or delta_v.shape[2] == 0:
        return v
    in_span, delta = _span_rows(delta_v, span_index)
    return torch.where(in_span, modulate_rows(v, delta), v)


def _probs(query, key, attn_bias, scale: float, causal: bool, lse: Optional[torch.Tensor] = None):
    """(P [B, Hkv, G, T, N], lse [B, Hkv, G, T]); rows that see no key have P = 0, lse = -inf.

    Without ``lse`` (the forward) P is ``e^{s - max} / sum``, normalised by its own sum:
    ``e^{s - lse}`` would carry lse's rounding, an ulp of |s| (2.4e-4 at |s| = 4000), into
    every P, and the output would sit far from plain softmax's. The backward recomputes P
    from the saved lse, as the fused kernels do.
    """
    s = _scores(_acc(query), _acc(key), attn_bias, scale, causal)
    # Only max / lse = -inf means "sees no key"; NaN (NaN input) must give NaN, not 0.
    if lse is None:
        m = s.amax(-1, keepdim=True)
        seen = m != float("-inf")
        e = torch.exp(s - torch.where(seen, m, 0.0))  # 0 at every key of an unseen row
        total = e.sum(-1, keepdim=True)
        p = e / torch.where(seen, total, 1.0)
        lse = torch.where(seen, m + torch.log(total), float("-inf")).squeeze(-1)
        return p, lse
    seen = (lse != float("-inf")).unsqueeze(-1)
    p = torch.where(seen, torch.exp(s - torch.where(seen, lse.unsqueeze(-1), 0.0)), 0.0)
    return p, lse


def p_weighted_mean(p: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """sum_j p_j x_j / sum_j p_j over the last dim (keepdim), 0 where every p_j is 0."""
    mass = p.sum(-1, keepdim=True)
    return (p * x).sum(-1, keepdim=True) / torch.where(mass > 0, mass, torch.ones_like(mass))


def forward(query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool):
    """Backend contract: (out [B, Hq, T, D] in query's dtype, lse f32 [B, Hq, T])."""
    p, lse = _probs(query, key, attn_bias, scale, causal)
    out = p.flatten(2, 3) @ _modulated_values(value, delta_v, span_index)
    return out.view(query.shape).to(query.dtype), lse.flatten(1, 2)


def backward(grad_out, query, key, value, delta_v, span_index, attn_bias, scale: float, causal: bool, lse):
    """Backend contract: (grad_query f32 [B, Hq, T, D], grad_delta_v f32 [B, Hkv, S, D] | [0]).

    FA2 backward with P recomputed from lse:
        dV' = P^T dO summed over the q-heads of each kv group,
        dS  = P * (dP - D),  dP = dO V'^T,  D = sum_j P_j dP_j / sum_j P_j,   dQ = scale dS K,
    and at span rows dV' goes through §2.2: d delta = (||v||/n) (g - (g.u_hat) u_hat).

    D is rowsum(dO * O) taken from the very dP values that dS subtracts it from, not from
    the output rounded to fp16/bf16 (whose V' rounding differs from the fp32 V' of dP): a
    row whose P is one-hot then gets dS = 0 and dQ = 0 exactly, as its softmax is constant.
    """
    b, hq, t, d = query.shape
    hkv = key.shape[1]
    p, _ = _probs(query, key, attn_bias, scale, causal, lse.reshape(b, hkv, hq // hkv, t))
    p = p.flatten(2, 3)  # [B, Hkv, G T, N]: the group's rows share K and V'
    v_mod = _modulated_values(value, delta_v, span_index)
    do = _acc(grad_out).reshape(p.shape[:-1] + (d,))
    dp = do @ v_mod.transpose(-1, -2)
    ds = p * (dp - p_weighted_mean(p, dp))
    grad_query = (scale * (ds @ _acc(key))).view(query.shape)
    if delta_v is None:
        return grad_query, query.new_empty(0, dtype=grad_query.dtype)
    if delta_v.shape[2] == 0:
        return grad_query, grad_query.new_zeros(delta_v.shape)
    grad_v = p.transpose(-1, -2) @ do  # [B, Hkv, N, D], summed over the group's rows
    v = _acc(value)
    in_span, delta = _span_rows(delta_v, span_index)
    u = v + delta
    n = row_norm(u).clamp_min(EPS)
    u_hat = u / n
    grad_pos = row_norm(v) / n
    grad_pos = grad_pos * (grad_v - (grad_v * u_hat).sum(-1, keepdim=True) * u_hat)
    # Row j of delta_v sits at the position whose span_index is j.
    positions = in_span.squeeze(-1).nonzero().squeeze(-1)
    grad_delta = grad_query.new_zeros(delta_v.shape)
    grad_delta.index_copy_(2, span_index[positions].long(), grad_pos.index_select(2, positions))
    return grad_query, grad_delta
