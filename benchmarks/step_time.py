"""Step time of our f-DPG trainer against TRL's RLOO and GRPO trainers, like for like.

    python benchmarks/step_time.py [--rounds 2] [--steps-per-block 3] [--modes lora,full]
                                   [--trainers ours,rloo,grpo] [--precision auto] [--profile]
                                   [--out docs/results/step_time.md]

Work per step (every trainer): SmolLM2-135M-Instruct (the embedded model), one prompt, 32 samples ×
at most 40 new tokens (pure sampling: temperature 1, no top-k/top-p, stop at EOS), reward r = VADER
compound sentiment, KL-regularised with β = 0.1 (ours: divergence `rkl` on P = a·exp(r/β), which is
RLHF's objective; TRL RLOO and GRPO with beta = 0.1: both score the samples under the reference), one
optimiser step. Like for like: each mode runs on every side — ``lora`` (r = 16, alpha = 32, dropout 0,
all linear layers: our defaults, given to TRL as a PEFT ``LoraConfig``; the reference is the base with
adapters off on every side) and ``full`` (full fine-tuning; TRL keeps a reference copy, ours too) —
and one precision for all (``--precision auto``: our trainer's hardware decision, fp32 on a CPU
without native bf16; TRL's ``bf16`` flag set to match).

Blocks of ``--steps-per-block`` steps, each block in a fresh process (no allocator, thread-pool or
compile-cache state carried from one trainer to the next), interleaved across ``--rounds`` rounds; the
first step of each block is a warm-up and not timed. Reported per mode: median seconds per step,
samples per second, the ratio to RLOO and to GRPO measured in the same run, and for ours the
model-FLOPs utilisation (counted FLOPs ÷ time ÷ the matmul peak measured by this script on a 2048²
GEMM) and the trainer's own step breakdown (sampling / scoring / update); ``--profile`` adds a
torch.profiler table of one of our steps per mode. Each finished block is one line of --results
(benchmarks/cells.py), so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from cells import CellStore

PROMPT = "Here is what I think about the new movie:"
BETA = 0.1
SAMPLES = 32
NEW_TOKENS = 40


#: a block: its trainer, fine-tuning mode, precision, round and steps per block
CELL_KEY = ("trainer", "mode", "precision", "round", "steps_per_block")
TRAINERS = ("ours", "rloo", "grpo")
MODES = ("lora", "full")
#: learning rates (the timing does not depend on them; kept equal on every side)
LR = {"lora": 1e-4, "full": 1e-5}


def matmul_peak(dtype, n=2048, repeats=5) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - t)
    return 2 * n**3 / statistics.median(times)


def vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def lora_settings() -> dict:
    """Our LoRA defaults (fdiv_align.config.ModelConfig), given to TRL's side as the same PEFT LoraConfig."""
    from fdiv_align.config import ModelConfig

    m = ModelConfig()
    targets = list(m.lora_target_modules)
    return {"r": m.lora_r, "lora_alpha": m.lora_alpha, "lora_dropout": m.lora_dropout,
            "target_modules": "all-linear" if targets == ["all-linear"] else targets}  # PEFT: a string


def ours_block(steps: int, mode: str, precision: str, profile: bool = False):
    from fdiv_align.config import from_dict
    from fdiv_align.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        ctx = Path(d) / "contexts.txt"
        ctx.write_text(PROMPT + "\n")
        cfg = from_dict({"model": {"name": "smollm2-135m", "lora": mode == "lora"}, "divergence": {"name": "rkl"},
                         "task": {"name": "sentiment", "params": {"beta": BETA}, "contexts": str(ctx), "max_new_tokens": NEW_TOKENS},
                         "trainer": {"steps": steps, "samples_per_step": SAMPLES, "micro_batch_size": SAMPLES, "eval_every": 0,
                                     "eval_samples": 4, "checkpoint_every": 0, "precision": precision, "lr": LR[mode]},
                         "logger": {"progress": False, "jsonl": False}})
        records = []
        trainer = Trainer(cfg, output_dir=Path(d) / "run", callbacks=[lambda t, s, r: records.append(r)])
        trainer.train()
        flops = step_flops(trainer, mode)
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile

            with tprofile(activities=[ProfilerActivity.CPU]) as p:
                trainer.train_step()
            prof = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return [r["seconds"] for r in records], records, flops, prof


def step_flops(trainer, mode: str) -> dict:
    """Counted matmul FLOPs of one step: 2·P per token for sampling (prefill + each new token), 2·P for
    the reference forward, 2·P for the policy forward, 2·P for the activation backward and, in full
    fine-tuning, 2·P for the weight gradients (LoRA's frozen weights get none; the adapters' own FLOPs
    are left out). P = parameters of the linear layers incl. the output head."""
    model = trainer.policy.model.get_base_model() if trainer.policy.use_lora else trainer.policy.model
    P = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    prompt = len(trainer.policy.tokenizer(PROMPT)["input_ids"]) + 1
    tokens = SAMPLES * (prompt + NEW_TOKENS)  # upper bound on tokens processed per pass (EOS may stop earlier)
    per_token = 8 if mode == "lora" else 10
    return {"params_matmul": P, "tokens_per_pass": tokens, "flops": per_token * P * tokens, "per_token": per_token}


def trl_block(trainer_name: str, steps: int, mode: str, precision: str):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from fdiv_align.lm.models import embedded_model_dir

    if trainer_name == "rloo":
        from trl import RLOOConfig as Config, RLOOTrainer as TRLTrainer
    else:
        from trl import GRPOConfig as Config, GRPOTrainer as TRLTrainer
    model_dir = str(embedded_model_dir("smollm2-135m"))
    analyzer = vader()

    def reward(prompts, completions, **kwargs):
        return [analyzer.polarity_scores(c if isinstance(c, str) else c[-1]["content"])["compound"] for c in completions]

    times = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - self.t)

    with tempfile.TemporaryDirectory() as d:
        args = Config(output_dir=d, per_device_train_batch_size=SAMPLES, num_generations=SAMPLES,
                      max_completion_length=NEW_TOKENS, beta=BETA, temperature=1.0, top_p=1.0, top_k=0,
                      learning_rate=LR[mode], max_steps=steps, logging_steps=10_000, report_to="none", use_cpu=True,
                      bf16=precision == "bf16", fp16=False, save_strategy="no", gradient_accumulation_steps=1,
                      num_iterations=1, dataloader_num_workers=0, disable_dropout=True)
        tok = AutoTokenizer.from_pretrained(model_dir)
        peft_config = LoraConfig(task_type="CAUSAL_LM", **lora_settings()) if mode == "lora" else None
        trainer = TRLTrainer(model=model_dir, reward_funcs=reward, args=args, peft_config=peft_config,
                             train_dataset=Dataset.from_list([{"prompt": PROMPT}] * (SAMPLES * (steps + 1))),
                             processing_class=tok)
        trainer.add_callback(Timer())
        trainer.train()
    return times


def run_block(trainer: str, mode: str, precision: str, results: str, rnd: int, steps_per_block: int,
              profile: bool) -> None:
    """One block of one trainer (first step a warm-up, not timed), appended to the ``results`` store."""
    t0 = time.perf_counter()
    if trainer == "ours":
        times, records, flops, prof = ours_block(steps_per_block + 1, mode, precision, profile=profile)
        data = {"times": times[1:], "flops": flops,
                "breakdown": {k: statistics.median(r[k] for r in records[1:]) for k in
                              ("seconds_sample", "seconds_score", "seconds_update")},
                "alignment": [r["alignment"] for r in records], "profile": prof}
    else:
        data = {"times": trl_block(trainer, steps_per_block + 1, mode, precision)[1:]}
    data["wall"] = time.perf_counter() - t0
    CellStore(results, CELL_KEY).add({"trainer": trainer, "mode": mode, "precision": precision, "round": rnd,
                                      "steps_per_block": steps_per_block, **data})


def resolve_precision(requested: str) -> tuple[str, str]:
    """Our trainer's hardware decision (auto | fp32 | bf16 on the CPU), applied to every side."""
    from fdiv_align.lm.precision import choose_precision

    return choose_precision(requested, torch.device("cpu"))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps-per-block", type=int, default=3)
    ap.add_argument("--trainers", default=",".join(TRAINERS))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--results", default="benchmarks/results/step_time.jsonl")
    ap.add_argument("--out", default="docs/results/step_time.md")
    ap.add_argument("--run-block", default=None, help=argparse.SUPPRESS)  # "trainer,mode,precision"
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.run_block:
        trainer, mode, precision = args.run_block.split(",")
        run_block(trainer, mode, precision, args.results, args.round, args.steps_per_block, args.profile)
        return
    trainers, modes = args.trainers.split(","), args.modes.split(",")
    for name, given, allowed in (("trainer", trainers, TRAINERS), ("mode", modes, MODES)):
        bad = [x for x in given if x not in allowed]
        if bad:
            ap.error(f"unknown {name} {bad}: expected some of {list(allowed)}")
    precision, reason = resolve_precision(args.precision)
    peak = matmul_peak(torch.bfloat16 if precision == "bf16" else torch.float32)
    print(f"precision {precision} ({reason}); {precision} matmul peak (2048² GEMM): {peak / 1e9:.0f} GFLOP/s", flush=True)
    for rnd in range(args.rounds):
        for mode in modes:
            for trainer in trainers:
                cell = {"trainer": trainer, "mode": mode, "precision": precision, "round": rnd,
                        "steps_per_block": args.steps_per_block}
                if CellStore(args.results, CELL_KEY).get(**cell):
                    continue
                cmd = [sys.executable, __file__, "--run-block", f"{trainer},{mode},{precision}", "--results",
                       args.results, "--round", str(rnd), "--steps-per-block", str(args.steps_per_block)]
                subprocess.run(cmd + (["--profile"] if args.profile and rnd == 0 else []), check=True)
                done = CellStore(args.results, CELL_KEY).get(**cell)
                print(f"{trainer} {mode} round {rnd}:", [round(t, 2) for t in done["times"]], flush=True)
    store = CellStore(args.results, CELL_KEY)
    rows = {}
    for mode in modes:
        for trainer in trainers:
            cells = sorted(store.rows(trainer=trainer, mode=mode, precision=precision,
                                      steps_per_block=args.steps_per_block), key=lambda d: d["round"])
            times = [t for d in cells for t in d["times"]]
            if times:
                extra = next((d for d in cells if d.get("profile")), cells[-1])
                rows[mode, trainer] = (statistics.median(times), len(times), extra)
    write_report(rows, precision, reason, peak, args)


def write_report(rows, precision, reason, peak, args):
    from fdiv_align.lm.precision import cpu_name

    lines = ["# Step time: fdiv_align vs TRL RLOO and GRPO, like for like", "",
             f"Command: `python benchmarks/step_time.py --rounds {args.rounds} --steps-per-block {args.steps_per_block}` — "
             f"{datetime.date.today().isoformat()}, {cpu_name()} ({platform.machine()}, {os.cpu_count()} cores), "
             f"torch {torch.__version__}. Precision {precision} on every side ({reason}); measured {precision} matmul "
             f"peak (2048² GEMM) {peak / 1e9:.0f} GFLOP/s.", "",
             f"Work per step: SmolLM2-135M-Instruct, prompt {PROMPT!r}, {SAMPLES} samples × ≤ {NEW_TOKENS} new tokens, pure "
             f"sampling, VADER sentiment reward, KL-regularised with β = {BETA} (ours: `rkl` on P = a·exp(r/β); TRL RLOO "
             f"and GRPO: beta = {BETA}), one optimiser step. Each mode on every side: `lora` = LoRA r = 16, alpha 32, all "
             "linear layers (the reference = the base with adapters off); `full` = full fine-tuning. Each block of "
             f"{args.steps_per_block} timed steps (after one warm-up step) in a fresh process, {args.rounds} rounds interleaved.", "",
             "Where our time goes, and what would close the rest: [step_time_profile.md](step_time_profile.md).", "",
             "| mode | trainer | median s/step | samples/s | timed steps | × RLOO | × GRPO |", "|---|---|---|---|---|---|---|"]
    for (mode, trainer), (med, n, _) in rows.items():
        ratios = [f"{med / rows[mode, peer][0]:.2f}" if (mode, peer) in rows else "–" for peer in ("rloo", "grpo")]
        lines.append(f"| {mode} | {trainer} | {med:.2f} | {SAMPLES / med:.2f} | {n} | {ratios[0]} | {ratios[1]} |")
    lines.append("")
    for (mode, _trainer), (med, _, extra) in rows.items():
        if "flops" in extra:
            f = extra["flops"]
            lines.append(f"- ours, {mode}: counted {f['flops'] / 1e12:.2f} TFLOP per step ({f['per_token']}·P·tokens, P = "
                         f"{f['params_matmul'] / 1e6:.0f}M, {f['tokens_per_pass']} tokens per pass) → MFU "
                         f"{f['flops'] / med / peak:.1%} of the measured {precision} peak. Step breakdown (median): sampling "
                         f"{extra['breakdown']['seconds_sample']:.2f} s, reference scoring + rewards "
                         f"{extra['breakdown']['seconds_score']:.2f} s, policy forward/backward + optimiser "
                         f"{extra['breakdown']['seconds_update']:.2f} s.")
    for (mode, _trainer), (_, _, extra) in rows.items():
        if extra.get("profile"):
            lines += ["", f"## torch.profiler, one step of ours, {mode} (top ops by self CPU time)", "", "```",
                      extra["profile"], "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
