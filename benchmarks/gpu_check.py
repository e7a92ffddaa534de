"""The GPU device check of issue 27: the head log-prob kernel against its peers, and the f-DPG step against TRL's
RLOO step, like for like. Run by benchmarks/gpu_check.sh on one GPU; ``--dry-run`` runs every part at toy sizes on
the CPU (argument parsing, the methods that exist here, the step blocks, the table), so the script is known to work
before device time is spent.

    python benchmarks/gpu_check.py [--parts kernels,step] [--shapes 4096x576x49152,...] [--repeats 10] [--warmup 3]
                                   [--steps 4] [--out FILE.md] [--dry-run]

Kernels (bf16 inputs, fp32 where a method needs it): per shape N×H×V, forward + backward of the per-token log-probs
log softmax(h Wᵀ)[y] into h and W with a random upstream gradient, for
  ours       fdiv_align.kernels.triton_logprobs.head_logprobs (the plan's kernel on CUDA)
  naive      log_softmax(h @ W.T).gather(y) (materialises [N, V])
  compiled   torch.compile of naive
  trl        TRL's selective_log_softmax on chunks of rows (its chunked log-prob path)
  liger      Liger's fused linear cross-entropy (reduction none: −lp)
  cce        Cut Cross-Entropy's linear_cross_entropy (reduction none: −lp)
  floor      the three matmuls no method avoids (h Wᵀ, dZ W, dZᵀ h)
time = median of ``--repeats`` timed runs after ``--warmup``; peak = the CUDA allocator's peak minus the inputs;
error = max |lp − lp_fp32| and max |∂h − ∂h_fp32| / max |∂h_fp32| against the fp32 naive computation. A method
whose package is missing, or that runs out of memory, is a row saying so.

Step: ours (f-DPG, rkl on P = a·exp(r/β), β = 0.1) against TRL RLOO (beta 0.1) on a randomly initialised model of
SmolLM2-135M's architecture (the embedded weights do not travel) with a word-level tokenizer over its vocabulary,
one prompt, 32 samples × ≤ 40 tokens, reward = the number of occurrences of one token, LoRA (r 16, α 32, all
linear layers) on both sides and full fine-tuning on both; bf16 on CUDA. Each block a fresh process; the first step
a warm-up; median seconds per step and our sampling/scoring/update breakdown.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SHAPES = "4096x576x49152,16384x576x49152,8192x2048x128256,16384x2048x128256,16384x4096x128256"
DRY_SHAPES = "37x32x101,64x48x300"
METHODS = ("ours", "naive", "compiled", "trl", "liger", "cce", "floor")
SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "tie_word_embeddings": True}
TOY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
       "num_key_value_heads": 2, "vocab_size": 300, "max_position_embeddings": 256, "tie_word_embeddings": True}
PROMPT, SAMPLES, NEW_TOKENS, BETA, LR = "w1 w2 w3 w4 w5", 32, 40, 0.1, {"lora": 1e-4, "full": 1e-5}
REWARDED = "w7"


# ---------------------------------------------------------------- kernels
def _chunked_trl(h, w, y, rows=1024):
    from trl.trainer.utils import selective_log_softmax

    return torch.cat([selective_log_softmax(h[i:i + rows] @ w.t(), y[i:i + rows]) for i in range(0, len(h), rows)])


def method(name: str):
    """The per-token log-prob function of a method (h, w, y) → lp [N], or an ImportError naming the package."""
    naive = lambda h, w, y: torch.log_softmax((h @ w.t()).float(), -1).gather(-1, y[:, None]).squeeze(-1)  # noqa: E731
    if name == "ours":
        from fdiv_align.kernels.triton_logprobs import head_logprobs

        return head_logprobs
    if name == "naive":
        return naive
    if name == "compiled":
        return torch.compile(naive)
    if name == "trl":
        return _chunked_trl
    if name == "liger":
        from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

        return lambda h, w, y: -LigerFusedLinearCrossEntropyFunction.apply(h, w, y, None, None, -100, 0.0, 0.0, "none")[0]
    if name == "cce":
        from cut_cross_entropy import linear_cross_entropy

        return lambda h, w, y: -linear_cross_entropy(h, w, y, reduction="none")
    raise ValueError(f"unknown method {name!r}; expected one of {', '.join(METHODS)}")


def _inputs(N, H, V, device, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device, dtype)
    w = (torch.randn(V, H, generator=g) / H ** 0.5).to(device, dtype)
    y = torch.randint(V, (N,), generator=g).to(device)
    up = torch.randn(N, generator=g).to(device)
    return h, w, y, up


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fwd_bwd(fn, h, w, y, up):
    hh, ww = h.detach().requires_grad_(True), w.detach().requires_grad_(True)
    if fn == "floor":
        z = hh @ ww.t()
        z.backward(torch.ones_like(z))  # dZ W and dZᵀ h: the two gradient matmuls
        return None, hh.grad
    lp = fn(hh, ww, y)
    (lp.float() * up).sum().backward()
    return lp.detach().float(), hh.grad


def kernel_row(name, N, H, V, device, dtype, repeats, warmup) -> dict:
    row = {"method": name, "shape": f"{N}x{H}x{V}"}
    try:
        fn = "floor" if name == "floor" else method(name)
    except ImportError as exc:
        return {**row, "status": f"not installed ({exc.name})"}
    h, w, y, up = _inputs(N, H, V, device, dtype)
    try:
        for _ in range(warmup):
            _fwd_bwd(fn, h, w, y, up)
        _sync(device)
        base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            lp, gh = _fwd_bwd(fn, h, w, y, up)
            _sync(device)
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2 ** 20 if device.type == "cuda" else None
    except torch.OutOfMemoryError:
        return {**row, "status": "out of memory"}
    row.update(status="ok", ms=1e3 * statistics.median(times), peak_mib=peak)
    if lp is not None:
        ref_lp, ref_gh = _fwd_bwd(method("naive"), h.float(), w.float(), y, up)
        row.update(lp_err=float((lp - ref_lp).abs().max()), grad_err=float((gh.float() - ref_gh).abs().max() / ref_gh.abs().max()))
    return row


def kernel_table(rows) -> list[str]:
    floor = {r["shape"]: r["ms"] for r in rows if r["method"] == "floor" and r["status"] == "ok"}
    trl = {r["shape"]: r["ms"] for r in rows if r["method"] == "trl" and r["status"] == "ok"}
    out = ["| shape N×H×V | method | ms fwd+bwd | × floor | × TRL chunked | peak MiB | max |lp err| | ∂h rel err |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['shape']} | {r['method']} | {r['status']} | | | | | |")
            continue
        ratios = [f"{r['ms'] / ref[r['shape']]:.2f}" if r["shape"] in ref else "–" for ref in (floor, trl)]
        peak = "–" if r.get("peak_mib") is None else f"{r['peak_mib']:.0f}"
        errs = [f"{r[k]:.2e}" if k in r else "–" for k in ("lp_err", "grad_err")]
        out.append(f"| {r['shape']} | {r['method']} | {r['ms']:.2f} | " + " | ".join(ratios) + f" | {peak} | "
                   + " | ".join(errs) + " |")
    return out


# ---------------------------------------------------------------- the step
def model_dir(root: Path, arch: dict) -> Path:
    """A randomly initialised Llama of ``arch`` with a word-level tokenizer over its vocabulary (w0, w1, …)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from fdiv_align.lm.models import tiny_tokenizer

    tok = tiny_tokenizer([f"w{i}" for i in range(arch["vocab_size"] - 4)])
    config = LlamaConfig(**arch, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(root)
    tok.chat_template = None
    tok.save_pretrained(root)
    return root


def reward(texts):
    return [float(t.split().count(REWARDED)) for t in texts]


def ours_block(model: str, mode: str, steps: int, precision: str) -> dict:
    from fdiv_align.config import from_dict
    from fdiv_align.targets import RewardScorer, Task
    from fdiv_align.training.trainer import Trainer

    task = Task("count", RewardScorer(lambda texts, contexts: reward(texts), beta=BETA, name="count"), contexts=[PROMPT],
                max_new_tokens=NEW_TOKENS)
    with tempfile.TemporaryDirectory() as d:
        cfg = from_dict({"model": {"name": model, "lora": mode == "lora"}, "divergence": {"name": "rkl"},
                         "trainer": {"steps": steps, "samples_per_step": SAMPLES, "micro_batch_size": SAMPLES, "eval_every": 0,
                                     "eval_samples": 4, "eval_at_start": False, "checkpoint_every": 0,
                                     "precision": precision, "lr": LR[mode]},
                         "logger": {"progress": False, "jsonl": False}})
        records = []
        Trainer(cfg, task=task, output_dir=Path(d) / "run", callbacks=[lambda t, s, r: records.append(r)]).train()
    return {"times": [r["seconds"] for r in records[1:]],
            "breakdown": {k: statistics.median(r[k] for r in records[1:]) for k in ("seconds_sample", "seconds_score", "seconds_update")}}


def rloo_block(model: str, mode: str, steps: int, precision: str) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as d:
        args = RLOOConfig(output_dir=d, per_device_train_batch_size=SAMPLES, num_generations=SAMPLES,
                          max_completion_length=NEW_TOKENS, beta=BETA, temperature=1.0, top_p=1.0, top_k=0,
                          learning_rate=LR[mode], max_steps=steps, logging_steps=10_000, report_to="none",
                          use_cpu=not torch.cuda.is_available(), bf16=precision == "bf16", save_strategy="no",
                          num_iterations=1, dataloader_num_workers=0, disable_dropout=True)
        lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear") \
            if mode == "lora" else None
        trainer = RLOOTrainer(model=model, reward_funcs=lambda prompts, completions, **kw: reward(completions), args=args,
                              peft_config=lora, train_dataset=Dataset.from_list([{"prompt": PROMPT}] * (SAMPLES * (steps + 1))),
                              processing_class=AutoTokenizer.from_pretrained(model))
        trainer.add_callback(Timer())
        trainer.train()
    return {"times": times[1:]}


def step_rows(arch: dict, steps: int, precision: str) -> list[dict]:
    """Every (trainer, mode) block in a fresh process; a block that fails is a row naming its error."""
    rows = []
    with tempfile.TemporaryDirectory() as d:
        model = str(model_dir(Path(d) / "model", arch))
        for mode in ("lora", "full"):
            for trainer in ("ours", "rloo"):
                done = subprocess.run([sys.executable, __file__, "--block", json.dumps([trainer, model, mode, steps, precision])],
                                      capture_output=True, text=True)
                result = done.stdout.strip().splitlines()[-1:] if done.returncode == 0 else []
                data = json.loads(result[0]) if result else {"error": done.stderr.strip().splitlines()[-1:] or ["?"]}
                rows.append({"trainer": trainer, "mode": mode, **data})
    return rows


def step_table(rows) -> list[str]:
    out = ["| mode | trainer | s/step (median) | ours × RLOO | ours: sample / score / update s |", "|---|---|---|---|---|"]
    med = {(r["trainer"], r["mode"]): statistics.median(r["times"]) for r in rows if r.get("times")}
    for r in rows:
        key = (r["trainer"], r["mode"])
        if key not in med:
            out.append(f"| {r['mode']} | {r['trainer']} | failed: {' '.join(r.get('error', ['no timed step']))[:160]} | | |")
            continue
        ratio = f"{med[key] / med[('rloo', r['mode'])]:.2f}" if r["trainer"] == "ours" and ("rloo", r["mode"]) in med else ""
        parts = " / ".join(f"{r['breakdown'][k]:.3f}" for k in ("seconds_sample", "seconds_score", "seconds_update")) \
            if "breakdown" in r else ""
        out.append(f"| {r['mode']} | {r['trainer']} | {med[key]:.3f} | {ratio} | {parts} |")
    return out


# ---------------------------------------------------------------- main
def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="kernels,step", help="comma-separated: kernels, step")
    ap.add_argument("--shapes", default=None, help=f"NxHxV,... (default: {SHAPES}; dry run: {DRY_SHAPES})")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="steps per step-block (the first is a warm-up)")
    ap.add_argument("--out", default=None, help="the markdown table (default: stdout only)")
    ap.add_argument("--dry-run", action="store_true", help="CPU, toy sizes, 2 repeats: checks the script, measures nothing")
    ap.add_argument("--block", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dry_run:  # before triton is imported: its kernels then run on CPU tensors, interpreted
        os.environ.setdefault("TRITON_INTERPRET", "1")
    parts = args.parts.split(",")
    if not set(parts) <= {"kernels", "step"}:
        ap.error(f"--parts: expected kernels and/or step, got {args.parts!r}")
    methods = args.methods.split(",")
    if not set(methods) <= set(METHODS):
        ap.error(f"--methods: unknown {sorted(set(methods) - set(METHODS))}; expected some of {', '.join(METHODS)}")
    shapes = []
    for s in (args.shapes or (DRY_SHAPES if args.dry_run else SHAPES)).split(","):
        try:
            N, H, V = (int(x) for x in s.split("x"))
        except ValueError:
            ap.error(f"--shapes: {s!r} is not NxHxV (three integers joined by x)")
        shapes.append((N, H, V))
    if args.repeats < 1 or args.warmup < 0 or args.steps < 2:
        ap.error("--repeats ≥ 1, --warmup ≥ 0 and --steps ≥ 2 (the first step is a warm-up)")
    return args, parts, methods, shapes


def main(argv=None) -> list[str]:
    args, parts, methods, shapes = parse(argv)
    if args.block:
        trainer, model, mode, steps, precision = json.loads(args.block)
        print(json.dumps((ours_block if trainer == "ours" else rloo_block)(model, mode, steps, precision)))
        return []
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        raise SystemExit("no CUDA device: this is the GPU check (use --dry-run to check the script on a CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    where = torch.cuda.get_device_name() if cuda else f"{platform.processor() or platform.machine()} (dry run: toy sizes, nothing measured)"
    lines = [f"# GPU check — {where}", "", f"`python benchmarks/gpu_check.py {' '.join(sys.argv[1:])}` on "
             f"{datetime.date.today()}, torch {torch.__version__}", ""]
    if "kernels" in parts:
        if cuda:
            torch.backends.cuda.matmul.allow_tf32 = False
        rows = [kernel_row(m, N, H, V, device, torch.bfloat16 if cuda else torch.float32,
                           2 if args.dry_run else args.repeats, 1 if args.dry_run else args.warmup)
                for (N, H, V) in shapes for m in methods]
        lines += ["## Kernel: token log-probs, forward + backward", ""] + kernel_table(rows) + [""]
    if "step" in parts:
        rows = step_rows(TOY if args.dry_run else SMOLLM2, 2 if args.dry_run else args.steps, "bf16" if cuda else "fp32")
        lines += ["## Step: f-DPG vs TRL RLOO, like for like", ""] + step_table(rows) + [""]
    text = "\n".join(lines)
    print(text, flush=True)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return lines


if __name__ == "__main__":
    main()
