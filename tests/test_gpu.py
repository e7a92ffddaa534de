"""CUDA paths (deselected by default; run on a GPU machine with ``python -m pytest -m gpu``).

The same exactness criteria as on the CPU: the fused kernel against an fp64 reference (fp32 within
1e-5 abs / 1e-4 rel, TF32 off; bf16 no worse than the naive bf16 computation), and the trainer on
CUDA reproducing the CPU trainer's first step (same samples — sampling is by inverse CDF from
uniforms drawn on the CPU — and the same loss up to fp32 round-off).
"""

import pytest
import torch
from conftest import tiny_cfg
from kernel_cases import BUDGETS, SHAPES, grads_of, make, ours, ref

from fdiv_align.lm.models import tiny_model
from fdiv_align.training.trainer import Trainer

pytestmark = pytest.mark.gpu


@pytest.fixture(autouse=True)
def _need_cuda():
    assert torch.cuda.is_available(), "the gpu tests need a CUDA device (run them on a GPU machine: pytest -m gpu)"
    torch.backends.cuda.matmul.allow_tf32 = False


def _cuda(*ts):
    return [None if t is None else t.cuda() for t in ts]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("budget", ["recompute", "default"])
def test_cuda_kernel_fp32_matches_fp64(shape, budget):
    N, H, V, chunk, tile = shape
    h, w, b, y, gl, ge = make(N, H, V, seed=N + V)
    r_lp, r_ent, r_grads = grads_of(ref, h, w, b, y, gl, ge, torch.float64, 0.7)
    lp, ent, grads = grads_of(ours(True, chunk, tile, BUDGETS[budget](V)), *_cuda(h, w, b, y, gl, ge), torch.float32, 0.7)
    for got, want, name in [(lp, r_lp, "logprob"), (ent, r_ent, "entropy")] + list(zip(grads, r_grads, ["hidden", "weight", "bias"])):
        got = got.cpu()
        assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (name, float((got - want).abs().max()))


@pytest.mark.parametrize("shape", SHAPES[:3], ids=str)
def test_cuda_kernel_bf16_no_worse_than_naive(shape):
    N, H, V, chunk, tile = shape
    h, w, b, y, gl, ge = make(N, H, V, seed=1, bias=False)
    r_lp, r_ent, r_grads = grads_of(ref, h, w, b, y, gl, ge, torch.float64, 1.0)
    n_lp, n_ent, n_grads = grads_of(ref, *_cuda(h, w, b, y, gl, ge), torch.bfloat16, 1.0)
    lp, ent, grads = grads_of(ours(True, chunk, tile, 0), *_cuda(h, w, b, y, gl, ge), torch.bfloat16, 1.0)
    for got, naive, want, name in [(lp, n_lp, r_lp, "logprob"), (ent, n_ent, r_ent, "entropy"),
                                   (grads[0], n_grads[0], r_grads[0], "hidden"), (grads[1], n_grads[1], r_grads[1], "weight")]:
        err, naive_err = (got.cpu() - want).abs().max(), (naive.cpu() - want).abs().max()
        assert err <= naive_err + 1e-2 * want.abs().max(), (name, float(err), float(naive_err))


@pytest.mark.parametrize("lora", [False, True])
def test_cuda_trainer_reproduces_cpu_first_step(tmp_path, lora):
    records = {}
    for device in ("cpu", "cuda"):
        cfg = tiny_cfg(model={"device": device, "lora": lora, "lora_r": 4}, trainer={"steps": 1, "eval_every": 0})
        tr = Trainer(cfg, lm=tiny_model(seed=3), output_dir=tmp_path / device)
        assert {p.device.type for p in tr.policy.model.parameters()} == {device}
        recs = []
        tr.callbacks.append(lambda t, s, r, recs=recs: recs.append(r))
        tr.train()
        records[device] = (recs[0], {n: p.detach().cpu() for n, p in tr.policy.trainable.items()})
    (cpu, cpu_params), (gpu, gpu_params) = records["cpu"], records["cuda"]
    for key in ("alignment", "loss", "pseudo_reward", "log_z"):
        assert abs(cpu[key] - gpu[key]) <= 1e-4 * max(1.0, abs(cpu[key])), (key, cpu[key], gpu[key])
    for n in cpu_params:
        assert torch.allclose(cpu_params[n], gpu_params[n], atol=1e-5, rtol=1e-4), n


def test_cuda_bf16_run_and_resume(tmp_path):
    cfg = tiny_cfg(model={"device": "cuda", "lora": True, "lora_r": 4},
                   trainer={"steps": 4, "precision": "bf16", "checkpoint_every": 2, "eval_every": 2})
    first = Trainer(cfg, lm=tiny_model(seed=3), output_dir=tmp_path)
    summary = first.train()
    assert first.plan.head_dtype == torch.bfloat16 and summary["steps"] == 4
    cfg.trainer.steps = 6
    resumed = Trainer(cfg, lm=tiny_model(seed=3), output_dir=tmp_path)
    assert next(resumed.model.parameters()).is_cuda
    assert resumed.train()["steps"] == 6 and resumed.samples_seen == 6 * cfg.trainer.samples_per_step


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_triton_kernel_on_cuda_and_under_inductor(dtype):
    """The Triton head kernels (the plan's choice on CUDA) against fp64 at real block sizes, eagerly and inside
    ``torch.compile`` (Inductor schedules the triton_op's kernels): fp32 within 1e-5/1e-4; bf16 no worse than naive."""
    from fdiv_align.kernels.triton_logprobs import head_logprobs

    N, H, V = 300, 96, 1000
    h, w, b, y, g, _ = make(N, H, V, seed=5)
    want = torch.log_softmax((h @ w.t() + b) / 0.8, -1).gather(-1, y[:, None]).squeeze(-1)
    naive = torch.log_softmax(((h.to(dtype) @ w.to(dtype).t()) + b.to(dtype)).double() / 0.8, -1).gather(-1, y[:, None]).squeeze(-1)
    hc, wc, bc, yc = _cuda(h.to(dtype), w.to(dtype), b.to(dtype), y)
    for fn in (head_logprobs, torch.compile(head_logprobs, fullgraph=True)):
        got = fn(hc, wc, yc, 0.8, bc).double().cpu()
        if dtype == torch.float32:
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), float((got - want).abs().max())
        else:
            assert (got - want).abs().max() <= (naive - want).abs().max() + 1e-2 * want.abs().max()


def test_captured_decoding_draws_what_dynamic_decoding_draws():
    """trainer.decode=captured (static cache, steps replayed as CUDA graphs) against the dynamic cache on CUDA."""
    import dataclasses

    from fdiv_align.lm.precision import compute_plan
    from fdiv_align.lm.sampling import SamplingConfig, sample

    lm = tiny_model(seed=0)
    lm.model.cuda()
    plan = compute_plan("fp32", True, torch.device("cuda"), decode="captured")
    index = torch.tensor([0, 1, 1, 2, 0, 2, 1, 0])
    u = torch.rand(len(index), 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    got = {d: sample(lm.model, lm.tokenizer, ["the", "a good dog", ""], 0, 16, SamplingConfig(0.9), context_index=index,
                     uniforms=u, plan=dataclasses.replace(plan, decode=d)) for d in ("dynamic", "captured")}
    assert torch.equal(got["captured"].tokens, got["dynamic"].tokens)
    assert float((got["captured"].token_logq - got["dynamic"].token_logq).abs().max()) <= 1e-5
