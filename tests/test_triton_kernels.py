"""The Triton head kernels (fdiv_align/kernels/triton_logprobs.py) against the fp64 reference, on CPU tensors under
Triton's interpreter: log-probs and both gradients at awkward shapes, the weighted-sum form, bf16 against the
naive bf16 computation, and the custom operators traced by torch.compile without a graph break.

Marker ``triton``: deselected by default (the interpreter is slow), run by ``make test-triton`` (which sets
``TRITON_INTERPRET=1``) and by .ci/run. The same tolerance policy as tests/test_kernels.py: fp32 within atol 1e-5,
rtol 1e-4 of fp64; bf16 no worse than the naive bf16 computation + 1e-2·scale (Cut Cross-Entropy's criterion)."""

import os

import pytest
import torch
from kernel_cases import make

pytestmark = pytest.mark.triton


def head_logprobs(*args, **kwargs):
    from fdiv_align.kernels.triton_logprobs import head_logprobs

    return head_logprobs(*args, **kwargs)


def weighted_head_logprob_sum(*args, **kwargs):
    from fdiv_align.kernels.triton_logprobs import weighted_head_logprob_sum

    return weighted_head_logprob_sum(*args, **kwargs)


@pytest.fixture(autouse=True)
def _interpreted():
    """Imported only when these tests run (selected by their marker): triton, and its interpreter, are needed."""
    assert os.environ.get("TRITON_INTERPRET") == "1", \
        "tests/test_triton_kernels.py runs Triton on CPU tensors: set TRITON_INTERPRET=1 (make test-triton)"

#: (N, H, V, blocks): N, V, H not multiples of their blocks, N = 1, one block of each, several of each
SHAPES = [
    (37, 24, 101, (16, 32, 16)),
    (1, 8, 50, (16, 16, 16)),
    (64, 32, 96, (64, 128, 64)),
    (45, 40, 257, (16, 64, 16)),
]


def _grads(fn, h, w, y, g, dtype, temperature, b=None):
    leaves = [t.to(dtype).clone().requires_grad_(True) for t in (h, w) + (() if b is None else (b,))]
    lp = fn(*leaves[:2], y, temperature, *leaves[2:])
    (lp.double() * g).sum().backward()
    return lp.detach().double(), [t.grad.double() for t in leaves]


def _reference(h, w, y, temperature, b=None):
    """log softmax((h Wᵀ + b) / τ)[y] in the inputs' dtype (fp64: the reference; bf16: the naive bf16 computation)."""
    z = h @ w.t() if b is None else h @ w.t() + b
    return torch.log_softmax(z / temperature, dim=-1).gather(-1, y[:, None]).squeeze(-1)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
def test_fp32_log_probs_and_gradients_match_fp64(shape, temperature, bias):
    N, H, V, blocks = shape
    h, w, b, y, g, _ = make(N, H, V, seed=N + V, bias=bias)
    g[::3] = 0.0  # masked (padding) rows: no gradient from them
    r_lp, r_grads = _grads(_reference, h, w, y, g, torch.float64, temperature, b)
    lp, grads = _grads(lambda *a: head_logprobs(*a, blocks=blocks), h, w, y, g, torch.float32, temperature, b)
    for got, want, name in zip([lp, *grads], [r_lp, *r_grads], ["logprob", "hidden", "weight", "bias"]):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, float((got - want).abs().max()))
    assert torch.equal(grads[0][::3], torch.zeros_like(grads[0][::3]))


@pytest.mark.parametrize("shape", SHAPES[:2], ids=str)
def test_weighted_sum_gives_the_gradients_of_the_weighted_log_probs(shape):
    N, H, V, blocks = shape
    h, w, b, y, g, _ = make(N, H, V, seed=7)
    r_lp, r_grads = _grads(_reference, h, w, y, 2.5 * g, torch.float64, 0.8, b)
    leaves = [t.float().clone().requires_grad_(True) for t in (h, w, b)]
    total, lp = weighted_head_logprob_sum(leaves[0], leaves[1], y, g.float(), 0.8, bias=leaves[2], blocks=blocks)
    (2.5 * total).backward()
    assert torch.allclose(total.double(), (g * r_lp).sum(), atol=1e-5, rtol=1e-4)
    assert torch.allclose(lp.double(), r_lp, atol=1e-5, rtol=1e-4) and not lp.requires_grad
    for got, want in zip([t.grad.double() for t in leaves], r_grads):
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())


def test_bf16_no_worse_than_naive_bf16():
    N, H, V, blocks = SHAPES[0]
    h, w, _, y, g, _ = make(N, H, V, seed=1, bias=False)
    r_lp, r_grads = _grads(_reference, h, w, y, g, torch.float64, 1.0)
    n_lp, n_grads = _grads(_reference, h, w, y, g, torch.bfloat16, 1.0)
    lp, grads = _grads(lambda *a: head_logprobs(*a, blocks=blocks), h, w, y, g, torch.bfloat16, 1.0)
    for got, naive, want, name in [(lp, n_lp, r_lp, "logprob"), (grads[0], n_grads[0], r_grads[0], "hidden"),
                                   (grads[1], n_grads[1], r_grads[1], "weight")]:
        err, naive_err = (got - want).abs().max(), (naive - want).abs().max()
        assert err <= naive_err + 1e-2 * want.abs().max(), (name, float(err), float(naive_err))


def test_torch_compile_traces_the_operators_as_single_nodes():
    """fullgraph=True: no graph break; the captured graph calls the custom operator, not the kernel's Python."""
    graphs = []

    def capture(gm, inputs):
        graphs.append(gm)
        return gm.forward

    h, w, _, y, _, _ = make(9, 16, 40, seed=3, bias=False)
    h, w = h.float(), w.float()
    fn = torch.compile(lambda a, b: head_logprobs(a, b, y, 1.0, blocks=(16, 16, 16)).exp().sum(), backend=capture,
                       fullgraph=True)
    assert torch.allclose(fn(h, w).double(), _reference(h.double(), w.double(), y, 1.0).exp().sum(), atol=1e-5)
    targets = [str(n.target) for n in graphs[0].graph.nodes if n.op == "call_function"]
    assert "fdiv_align.head_logprobs.default" in targets, targets


def test_bad_inputs_are_refused_by_name():
    h, w, _, y, _, _ = make(4, 8, 10, seed=0, bias=False)
    with pytest.raises(ValueError, match="share one of float32/bfloat16/float16, got torch.float64"):
        head_logprobs(h, w, y)
    with pytest.raises(ValueError, match=r"targets must be \[N\] = \[4\], got \(3,\)"):
        head_logprobs(h.float(), w.float(), y[:3])
    with pytest.raises(ValueError, match="temperature must be > 0, got 0"):
        head_logprobs(h.float(), w.float(), y, 0)


def test_the_plan_s_triton_kernel_gives_the_torch_kernel_s_scores_and_gradients():
    """The glue (fdiv_align/lm/scoring.py): ``plan.kernel = "triton"`` — what CUDA gets — scores a batch and gives
    the surrogate's gradients as the CPU's torch kernel does."""
    import dataclasses

    from fdiv_align.lm.batch import make_batch
    from fdiv_align.lm.models import tiny_model
    from fdiv_align.lm.precision import choose_kernel, compute_plan
    from fdiv_align.lm.scoring import score, weighted_logprob_sum
    from fdiv_align.lm.sampling import SamplingConfig

    assert choose_kernel(torch.device("cpu")) == "torch"
    lm = tiny_model(seed=2)
    batch = make_batch(lm.tokenizer, ["the", "a"], ["good dog runs", "bad"])
    plan = compute_plan("fp32", False, torch.device("cpu"))
    config, weights = SamplingConfig(temperature=0.9), torch.tensor([0.7, -1.3])
    results = {}
    for kernel in ("torch", "triton"):
        lm.model.zero_grad()
        chosen = dataclasses.replace(plan, kernel=kernel)
        total, seq = weighted_logprob_sum(lm.model, batch, weights, config, lm.tokenizer.pad_token_id, chosen)
        total.backward()
        with torch.no_grad():
            scored = score(lm.model, batch, config, pad_id=lm.tokenizer.pad_token_id, plan=chosen).sequence_logprobs
        results[kernel] = (total.detach(), seq, scored, {n: p.grad.clone() for n, p in lm.model.named_parameters()})
    (t_total, t_seq, t_scored, t_grads), (g_total, g_seq, g_scored, g_grads) = results["torch"], results["triton"]
    assert torch.allclose(g_total, t_total, atol=1e-5) and torch.allclose(g_seq, t_seq, atol=1e-5)
    assert torch.allclose(g_scored, t_scored, atol=1e-5)
    for name, grad in t_grads.items():
        assert torch.allclose(g_grads[name], grad, atol=1e-5, rtol=1e-4), name
