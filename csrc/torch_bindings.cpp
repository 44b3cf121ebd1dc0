// One registry for every op the extension provides (namespace `vreason_C`).
// Schemas live here; each backend file adds its kernels with STABLE_TORCH_LIBRARY_IMPL.
// The Python layer (vreason_kernels/ops/*/op.py) wraps these in the public
// `torch.library` custom ops with autograd, so nothing here handles gradients.
#include <Python.h>
#include <torch/csrc/stable/library.h>

STABLE_TORCH_LIBRARY(vreason_C, m) {
  // Fused linear entropy over rows of `hidden [R, D]` against `weight [V, D]`.
  // Returns (entropy f32 [R], dH/dhidden f32 [R, D] (empty unless need_grad),
  //          row_max f32 [R], log_sum f32 [R], logits [R, V] in hidden's dtype (empty
  //          unless return_logits)). row_max m = max_j z_j and log_sum = log sum_j e^{z_j - m},
  //          in units of z = (W h + b) / temperature (so lse = m + log_sum).
  m.def(
      "linear_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, float temperature, "
      "bool need_grad, bool return_logits) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Second pass for dW = sum_r g_r dH_r/dz (x) h_r / temperature and db likewise.
  // Returns (grad_weight f32 [V, D], grad_bias f32 [V] (empty unless need_bias)).
  m.def(
      "linear_entropy_weight_grad(Tensor hidden, Tensor weight, Tensor? bias, float temperature, "
      "Tensor row_max, Tensor log_sum, Tensor entropy, Tensor grad_entropy, bool need_bias) -> (Tensor, Tensor)");
  // The label log-probability with the entropy (docs/design.md §2.4). labels [R] int64: a
  // row's label in [0, V), or any other value for none (its logp is 0). Returns (logp,
  // entropy, row_max, log_sum, mean) f32 [R], mean = t/s = mu - row_max.
  m.def(
      "linear_logprob_entropy_fwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // From the forward's row statistics and the incoming gradients (None: that output got
  // none, its term is skipped): (grad_hidden f32 [R, D], grad_weight f32 [V, D], grad_bias
  // f32 [V]), each empty unless asked for. Labels outside [0, V) add no one-hot term.
  m.def(
      "linear_logprob_entropy_bwd(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, float temperature, "
      "Tensor row_max, Tensor log_sum, Tensor mean, Tensor? grad_logp, Tensor? grad_entropy, bool need_hidden, "
      "bool need_weight, bool need_bias) -> (Tensor, Tensor, Tensor)");
  // Attention whose value rows at span positions are replaced by the norm-preserving
  // map v' = (v + delta) ||v|| / max(||v + delta||, eps). span_index [N] int32 maps a
  // position to its row in delta_v, or -1. attn_bias is additive f32, broadcastable
  // to [B, Hq, T, N]. Returns (out [B, Hq, T, D] in query's dtype, lse f32 [B, Hq, T]).
  m.def(
      "value_delta_attention_fwd(Tensor query, Tensor key, Tensor value, Tensor? delta_v, "
      "Tensor span_index, Tensor? attn_bias, float scale, bool causal) -> (Tensor, Tensor)");
  // Returns (grad_query, grad_delta_v) in f32; grad_delta_v is empty when delta_v is None.
  // P is recomputed from lse, and FA's rowsum(dO * O) from P and the fp32 dO V'^T.
  m.def(
      "value_delta_attention_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, "
      "Tensor? delta_v, Tensor span_index, Tensor? attn_bias, float scale, bool causal, "
      "Tensor lse) -> (Tensor, Tensor)");
}

// Importing `vreason_kernels._C` runs the static registrations above; the module
// itself exposes nothing to Python. Built against the limited API (Py_LIMITED_API),
// so one binary serves every CPython from 3.10 on.
static struct PyModuleDef vreason_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&vreason_module); }
