"""``vk.linear_logprob_entropy`` (docs/design.md §2.4, §3) on every backend against float64
autograd through plain PyTorch (logits -> log_softmax -> gather, and the entropy), by the
2x rule of docs/design.md §5 (``helpers.check_linear_logprob_entropy``).

Cases from the peers' own tests of fused linear cross-entropy / entropy, in our code:
temperatures, ignore_index, bias or none, bf16/fp16, large logit offsets with a logp > 0
regression, reduction by the caller, non-contiguous inputs, gradients of ``.sum()``,
``.mean()``, random and strided, each output alone and both, and every differentiable
input alone and together.
"""

import re
from pathlib import Path

import pytest
import torch

import vreason_kernels as vk
from python_tests.helpers import (
    BACKENDS, DTYPES, check_linear_logprob_entropy, linear_entropy_inputs, needs_extension, plain_logprob_entropy,
)
from vreason_kernels.ops.linear_logprob_entropy import naive

LEAD, VOCAB, DIM = (3, 5), 301, 33


def _labels(lead, vocab, *, ignore=-100, ignored=2):
    """Random labels with ``ignored`` rows set to ``ignore``."""
    labels = torch.randint(0, vocab, lead)
    flat = labels.view(-1)
    flat[torch.randperm(flat.numel())[:ignored]] = ignore
    return labels


def _grad(form: str, shape):
    """An incoming gradient of ``shape``: as ``.sum()``/``.mean()`` pass it (expanded, stride
    0), strided (every other entry of a longer tensor), or dense random."""
    if form == "sum":
        return torch.ones(()).expand(shape)
    if form == "mean":
        return torch.full((), 1.0 / max(1, torch.Size(shape).numel())).expand(shape)
    if form == "strided":
        return torch.randn(*shape[:-1], 2 * shape[-1])[..., ::2]
    return torch.randn(shape)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_float64(backend, dtype, temperature):
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, dtype, logit_scale=3.0)
    labels = _labels(LEAD, VOCAB)
    check_linear_logprob_entropy(backend, hidden, weight, labels, bias, temperature=temperature,
                                 grad_logp=torch.randn(LEAD), grad_entropy=torch.randn(LEAD))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("used", ["both", "logp", "entropy"])
def test_either_output_alone(backend, used):
    """Only the outputs in the loss get a gradient; the other one adds no term (nothing to
    materialise as zeros) and the result still matches float64."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, logit_scale=3.0)
    labels = _labels(LEAD, VOCAB)
    check_linear_logprob_entropy(backend, hidden, weight, labels, bias,
                                 grad_logp=None if used == "entropy" else torch.randn(LEAD),
                                 grad_entropy=None if used == "logp" else torch.randn(LEAD))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("form", ["sum", "mean", "strided", "random"])
@pytest.mark.parametrize("wanted", ["hidden", "weight", "bias", "all"])
def test_gradient_layouts_for_every_input(backend, form, wanted):
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, logit_scale=2.0)
    labels = _labels(LEAD, VOCAB)
    requires = tuple(wanted in (name, "all") for name in ("hidden", "weight", "bias"))
    check_linear_logprob_entropy(backend, hidden, weight, labels, bias, requires_grad=requires,
                                 grad_logp=_grad(form, LEAD), grad_entropy=_grad(form, LEAD))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("where", ["bias", "weight"])
def test_large_offsets_keep_logp_at_most_zero(backend, dtype, where):
    """A regression test for log-probabilities above 0 (as reported against verl's fused kernel,
    in bf16): logits offset by ~1000 and sharply peaked, labels mostly at the argmax, where
    ``z_y - lse`` formed from two separately rounded values comes out positive. Ours
    subtract relative to the row max, so logp <= 0 and the 2x rule still holds."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, dtype, logit_scale=30.0)
    if where == "bias":
        bias = (bias.float() + 1000.0).to(dtype)
    else:  # a column of W shared by every word: h . w0 = 1000 on every logit
        hidden = hidden.float()
        hidden[..., 0] = 1.0
        weight = weight.float()
        weight[:, 0] = 1000.0
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    labels = torch.nn.functional.linear(hidden.double(), weight.double(), bias.double()).argmax(-1)
    labels.view(-1)[::3] = torch.randint(0, VOCAB, labels.view(-1)[::3].shape)
    check_linear_logprob_entropy(backend, hidden, weight, labels, bias,
                                 grad_logp=torch.randn(LEAD), grad_entropy=torch.randn(LEAD))
    logp, _ = vk.linear_logprob_entropy(hidden, weight, labels, bias, backend=backend)
    assert logp.max().item() <= 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_hot_rows_have_logp_exactly_zero(backend):
    """A label far above the rest: p_y rounds to 1 in float32 and logp must be 0 or just below, never above."""
    hidden, weight, _ = linear_entropy_inputs(4, 37, 17)
    bias = torch.zeros(37)
    bias[5] = 300.0
    logp, entropy = vk.linear_logprob_entropy(hidden, weight, torch.full((4,), 5), bias, backend=backend)
    assert torch.equal(logp, torch.zeros(4)) and bool((entropy >= 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ignore_index", [-100, -1, 0])
def test_ignore_index(backend, ignore_index):
    """Ignored rows: logp exactly 0, no gradient through logp, the entropy still computed
    (equal to ``vk.linear_entropy``'s on the same backend)."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    labels = torch.randint(1, VOCAB, LEAD)
    labels[0] = ignore_index
    check_linear_logprob_entropy(backend, hidden, weight, labels, bias, ignore_index=ignore_index,
                                 grad_logp=torch.randn(LEAD), grad_entropy=torch.randn(LEAD))
    h = hidden.clone().requires_grad_()
    logp, entropy = vk.linear_logprob_entropy(h, weight, labels, bias, ignore_index=ignore_index, backend=backend)
    assert torch.equal(logp[0], torch.zeros(LEAD[1]))
    torch.testing.assert_close(entropy, vk.linear_entropy(hidden, weight, bias, backend=backend))
    logp.sum().backward()
    assert torch.equal(h.grad[0], torch.zeros_like(h.grad[0])) and h.grad[1:].abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_bias_and_all_rows_ignored(backend):
    hidden, weight, _ = linear_entropy_inputs(LEAD, VOCAB, DIM, bias=False)
    check_linear_logprob_entropy(backend, hidden, weight, _labels(LEAD, VOCAB), None,
                                 grad_logp=torch.randn(LEAD), grad_entropy=torch.randn(LEAD))
    check_linear_logprob_entropy(backend, hidden, weight, torch.full(LEAD, -100), None,
                                 grad_logp=torch.randn(LEAD), grad_entropy=None)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    """Transposed hidden, a weight with a row stride, strided labels: the same results as
    their contiguous copies, bit for bit."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    labels = _labels(LEAD, VOCAB)
    h_t = hidden.transpose(0, 1).contiguous().transpose(0, 1)
    w_s = torch.randn(VOCAB, 2 * DIM)[:, ::2].copy_(weight)  # stride(-1) == 2
    w_rows = torch.randn(2 * VOCAB, DIM)[::2].copy_(weight)
    y_s = torch.randint(0, VOCAB, (LEAD[0], 2 * LEAD[1]))[:, ::2].copy_(labels)
    want = vk.linear_logprob_entropy(hidden, weight, labels, bias, backend=backend)
    for h, w, y in ((h_t, weight, labels), (hidden, w_s, labels), (hidden, w_rows, y_s)):
        got = vk.linear_logprob_entropy(h, w, y, bias, backend=backend)
        assert all(torch.equal(a, b) for a, b in zip(got, want))
    check_linear_logprob_entropy(backend, h_t, w_s, y_s, bias, grad_logp=torch.randn(LEAD),
                                 grad_entropy=torch.randn(LEAD))


@pytest.mark.parametrize("backend", BACKENDS)
def test_reduction_by_the_caller(backend):
    """A token-mean loss over the unmasked tokens (what an RL trainer writes), with its
    gradients, against the same loss in float64."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    labels = _labels(LEAD, VOCAB)
    mask = (labels != -100).float()
    advantages = torch.randn(LEAD[0], 1)

    def loss_of(h, w, b, fn, **kw):
        logp, entropy = fn(h, w, labels, b, **kw)
        return (-(advantages.to(logp.dtype) * logp) - 0.01 * entropy).mul(mask.to(logp.dtype)).sum() / mask.sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = loss_of(*leaves, vk.linear_logprob_entropy, backend=backend)
    loss.backward()
    ref = [t.double().requires_grad_() for t in (hidden, weight, bias)]
    loss64 = loss_of(*ref, plain_logprob_entropy)
    loss64.backward()
    torch.testing.assert_close(loss.double(), loss64, rtol=1e-5, atol=1e-6)
    for got, want in zip(leaves, ref):
        torch.testing.assert_close(got.grad.double(), want.grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_deterministic(backend):
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, torch.bfloat16)
    labels = _labels(LEAD, VOCAB)
    g = torch.randn(LEAD), torch.randn(LEAD)

    def run():
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        logp, entropy = vk.linear_logprob_entropy(*leaves[:2], labels, leaves[2], backend=backend)
        torch.autograd.backward([logp, entropy], [g[0], g[1]])
        return [logp, entropy] + [t.grad for t in leaves]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_float64_on_the_torch_backend():
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, torch.float64)
    labels = _labels(LEAD, VOCAB)
    logp, entropy = vk.linear_logprob_entropy(hidden, weight, labels, bias, backend="torch")
    want = plain_logprob_entropy(hidden, weight, labels, bias)
    assert logp.dtype == entropy.dtype == torch.float64
    torch.testing.assert_close((logp, entropy), want, rtol=1e-12, atol=1e-12)


@needs_extension
def test_float64_is_refused_by_the_cpp_backend():
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM, torch.float64)
    with pytest.raises(TypeError, match="hidden"):
        vk.linear_logprob_entropy(hidden, weight, _labels(LEAD, VOCAB), bias, backend="cpp")


def test_the_reference_goes_in_chunks_of_rows(monkeypatch):
    """naive.py never holds [T, V]: with a budget of 3 rows of logits it runs in chunks and
    gives the same values as in one chunk."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    labels = _labels(LEAD, VOCAB)
    g = torch.randn(LEAD), torch.randn(LEAD)

    def run():
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        out = vk.linear_logprob_entropy(*leaves[:2], labels, leaves[2], backend="torch")
        torch.autograd.backward(list(out), list(g))
        return list(out) + [t.grad for t in leaves]

    whole = run()
    monkeypatch.setattr(naive, "LOGIT_BUDGET", 3 * VOCAB)
    assert len(naive.row_chunks(15, VOCAB)) == 5
    for a, b in zip(run(), whole):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)  # dW summed in another order


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_and_single_rows(backend):
    hidden, weight, bias = linear_entropy_inputs((0,), 37, 17)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    logp, entropy = vk.linear_logprob_entropy(h, w, torch.zeros(0, dtype=torch.long), bias, backend=backend)
    assert logp.shape == entropy.shape == (0,)
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(w.grad, torch.zeros_like(w)) and h.grad.shape == (0, 17)
    hidden, weight, bias = linear_entropy_inputs(1, 37, 17)
    check_linear_logprob_entropy(backend, hidden, weight, torch.tensor([36]), bias,
                                 grad_logp=torch.randn(1), grad_entropy=torch.randn(1))


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend):
    """-inf bias entries mask words: a label there has logp = -inf; other rows are exact."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    bias[::7] = float("-inf")
    labels = _labels(LEAD, VOCAB)
    labels = torch.where(labels % 7 == 0, labels + 1, labels)
    check_linear_logprob_entropy(backend, hidden, weight, labels, bias,
                                 grad_logp=torch.randn(LEAD), grad_entropy=torch.randn(LEAD))
    labels[0, 0] = 14
    logp, _ = vk.linear_logprob_entropy(hidden, weight, labels, bias, backend=backend)
    assert logp[0, 0].item() == float("-inf") and bool(torch.isfinite(logp.view(-1)[1:]).all())


def test_bad_input():
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    labels = _labels(LEAD, VOCAB)
    op = vk.linear_logprob_entropy
    for bad, match in ((VOCAB, r"labels must lie in \[0, 301\)"), (-5, "labels must lie")):
        wrong = labels.clone()
        wrong[1, 2] = bad
        with pytest.raises(ValueError, match=match):
            op(hidden, weight, wrong, bias)
    with pytest.raises(TypeError, match="labels"):
        op(hidden, weight, labels.float(), bias)
    with pytest.raises(TypeError, match="labels"):
        op(hidden, weight, [1, 2], bias)
    with pytest.raises(ValueError, match="labels must have hidden's leading shape"):
        op(hidden, weight, labels[0], bias)
    with pytest.raises(TypeError, match="ignore_index"):
        op(hidden, weight, labels, bias, ignore_index=1.5)
    with pytest.raises(ValueError, match="temperature"):
        op(hidden, weight, labels, bias, temperature=0.0)
    with pytest.raises(ValueError, match="backend"):
        op(hidden, weight, labels, bias, backend="cuda")
    with pytest.raises(ValueError, match="weight"):
        op(hidden, weight[:, :-1], labels, bias)
    with pytest.raises(ValueError, match="process_group"):
        op(hidden, weight, labels, bias, process_group=object())  # torch.distributed not initialised
    # int32 labels are taken as they are.
    want = op(hidden, weight, labels, bias)
    assert all(torch.equal(a, b) for a, b in zip(op(hidden, weight, labels.int(), bias), want))


def test_torch_compile_fullgraph():
    """The custom ops trace without a graph break (the labels' host check steps aside)."""
    hidden, weight, bias = linear_entropy_inputs(LEAD, VOCAB, DIM)
    labels = _labels(LEAD, VOCAB)

    def loss(h, w, b):
        logp, entropy = vk.linear_logprob_entropy(h, w, labels, b, backend="torch")
        return (logp + 0.1 * entropy).sum()

    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    torch.compile(loss, fullgraph=True, backend="eager")(*leaves).backward()
    ref = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    loss(*ref).backward()
    for a, b in zip(leaves, ref):
        torch.testing.assert_close(a.grad, b.grad)


def test_the_rl_training_example_runs():
    """docs/rl-training.md's loss block runs as written."""
    page = (Path(__file__).resolve().parents[1] / "docs" / "rl-training.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", page, re.S | re.M)
    assert blocks
    for code in blocks:
        exec(compile(code, "docs/rl-training.md", "exec"), {"__name__": "__docs__"})
