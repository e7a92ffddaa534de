"""Step time of our f-DPG trainer against TRL's RLOO trainer on identical work.

    python benchmarks/step_time.py [--rounds 2] [--steps-per-block 3] [--variants ours_fp32,ours_bf16,trl_bf16,trl_fp32]
                                   [--profile] [--out docs/results/step_time.md]

Work per step (both trainers): SmolLM2-135M-Instruct (the embedded model), one prompt, 32 samples ×
at most 40 new tokens (pure sampling: temperature 1, no top-k/top-p, stop at EOS), reward r = VADER
compound sentiment, KL-regularised with β = 0.1 (ours: divergence `rkl` on P = a·exp(r/β), which is
RLHF's objective; TRL: RLOO with beta = 0.1), one optimiser step. Ours trains LoRA (r = 16, all
projections; our default for this model size) and TRL trains the full model (its default).

Variants run in blocks of ``--steps-per-block`` steps, each block in a fresh process, blocks
interleaved across ``--rounds`` rounds; the first step of each block is a warm-up and not timed. Reported: median seconds per
step and samples per second; ratio ours/TRL-bf16; model-FLOPs utilisation (counted FLOPs of our
step ÷ time ÷ the bf16 and fp32 matmul peaks measured by this script on a 2048² GEMM). Step
breakdown (sampling / scoring / update) comes from the trainer's own per-step timings; ``--profile``
adds a torch.profiler table of one of our steps. Each finished block is one line of --results
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


#: a block: its variant, round and steps per block
CELL_KEY = ("variant", "round", "steps_per_block")


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


def ours_block(steps: int, precision: str, profile: bool = False):
    from fdiv_align.config import from_dict
    from fdiv_align.training.trainer import Trainer

    with tempfile.TemporaryDirectory() as d:
        ctx = Path(d) / "contexts.txt"
        ctx.write_text(PROMPT + "\n")
        cfg = from_dict({"model": {"name": "smollm2-135m"}, "divergence": {"name": "rkl"},
                         "task": {"name": "sentiment", "params": {"beta": BETA}, "contexts": str(ctx), "max_new_tokens": NEW_TOKENS},
                         "trainer": {"steps": steps, "samples_per_step": SAMPLES, "micro_batch_size": SAMPLES, "eval_every": 0,
                                     "eval_samples": 4, "checkpoint_every": 0, "precision": precision, "lr": 1e-4},
                         "logger": {"progress": False, "jsonl": False}})
        records = []
        trainer = Trainer(cfg, output_dir=Path(d) / "run", callbacks=[lambda t, s, r: records.append(r)])
        trainer.train()
        flops = step_flops(trainer)
        prof = None
        if profile:
            from torch.profiler import ProfilerActivity, profile as tprofile

            with tprofile(activities=[ProfilerActivity.CPU]) as p:
                trainer.train_step()
            prof = p.key_averages().table(sort_by="self_cpu_time_total", row_limit=15)
    return [r["seconds"] for r in records], records, flops, prof


def step_flops(trainer) -> dict:
    """Counted matmul FLOPs of one step: 2·P per token for sampling (prefill + each new token), 2·P for
    the reference forward, 4·P for the policy forward + activation backward (LoRA: frozen weights get
    no weight-gradient matmul). P = parameters of the linear layers incl. the output head."""
    model = trainer.policy.model.get_base_model() if trainer.policy.use_lora else trainer.policy.model
    P = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    prompt = len(trainer.policy.tokenizer(PROMPT)["input_ids"]) + 1
    tokens = SAMPLES * (prompt + NEW_TOKENS)  # upper bound on tokens processed per pass (EOS may stop earlier)
    return {"params_matmul": P, "tokens_per_pass": tokens, "flops": 8 * P * tokens}


def trl_block(steps: int, bf16: bool):
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from fdiv_align.lm.models import embedded_model_dir

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
        args = RLOOConfig(output_dir=d, per_device_train_batch_size=SAMPLES, num_generations=SAMPLES,
                          max_completion_length=NEW_TOKENS, beta=BETA, temperature=1.0, top_p=1.0, top_k=0,
                          learning_rate=1e-5, max_steps=steps, logging_steps=10_000, report_to="none", use_cpu=True,
                          bf16=bf16, save_strategy="no", gradient_accumulation_steps=1, num_iterations=1,
                          dataloader_num_workers=0, disable_dropout=True)
        tok = AutoTokenizer.from_pretrained(model_dir)
        trainer = RLOOTrainer(model=model_dir, reward_funcs=reward, args=args,
                              train_dataset=Dataset.from_list([{"prompt": PROMPT}] * (SAMPLES * (steps + 1))),
                              processing_class=tok)
        trainer.add_callback(Timer())
        trainer.train()
    return times


def run_block(v: str, results: str, rnd: int, steps_per_block: int, profile: bool) -> None:
    """One block of one variant (first step a warm-up, not timed), appended to the ``results`` store."""
    t0 = time.perf_counter()
    if v.startswith("ours"):
        times, records, flops, prof = ours_block(steps_per_block + 1, "bf16" if v == "ours_bf16" else "fp32",
                                                 profile=profile)
        data = {"times": times[1:], "flops": flops,
                "breakdown": {k: statistics.median(r[k] for r in records[1:]) for k in
                              ("seconds_sample", "seconds_score", "seconds_update")},
                "alignment": [r["alignment"] for r in records], "profile": prof}
    else:
        data = {"times": trl_block(steps_per_block + 1, bf16=(v == "trl_bf16"))[1:]}
    data["wall"] = time.perf_counter() - t0
    CellStore(results, CELL_KEY).add({"variant": v, "round": rnd, "steps_per_block": steps_per_block, **data})


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps-per-block", type=int, default=3)
    ap.add_argument("--variants", default="ours_fp32,ours_bf16,trl_bf16,trl_fp32")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--results", default="benchmarks/results/step_time.jsonl")
    ap.add_argument("--out", default="docs/results/step_time.md")
    ap.add_argument("--run-block", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--round", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(os.cpu_count() or 1)
    if args.run_block:
        run_block(args.run_block, args.results, args.round, args.steps_per_block, args.profile)
        return
    variants = args.variants.split(",")
    peaks = {"bf16": matmul_peak(torch.bfloat16), "fp32": matmul_peak(torch.float32)}
    print(f"matmul peak (2048² GEMM): bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s")
    for rnd in range(args.rounds):
        for v in variants:
            if CellStore(args.results, CELL_KEY).get(variant=v, round=rnd, steps_per_block=args.steps_per_block):
                continue
            # each block in a fresh process: no allocator, thread-pool or compile-cache state carried
            # from one trainer to the next (in one long process our bf16 block measured 7.4 s after
            # our fp32 block and 8.4 s after the TRL blocks)
            cmd = [sys.executable, __file__, "--run-block", v, "--results", args.results, "--round", str(rnd),
                   "--steps-per-block", str(args.steps_per_block)] + (["--profile"] if args.profile and rnd == 0 else [])
            subprocess.run(cmd, check=True)
            done = CellStore(args.results, CELL_KEY).get(variant=v, round=rnd, steps_per_block=args.steps_per_block)
            print(v, f"round {rnd}:", [round(t, 2) for t in done["times"]], flush=True)
    rows = {}
    store = CellStore(args.results, CELL_KEY)
    for v in variants:
        times, extra = [], {}
        for d in sorted(store.rows(variant=v, steps_per_block=args.steps_per_block), key=lambda d: d["round"]):
            times += d["times"]
            extra = {**d, "profile": d.get("profile") or extra.get("profile")}
        rows[v] = (statistics.median(times), len(times), extra)
    write_report(rows, peaks, args)


def write_report(rows, peaks, args):
    ref = rows.get("trl_bf16", (None,))[0]
    lines = ["# Step time: fdiv_align vs TRL RLOO", "",
             f"Command: `python benchmarks/step_time.py --rounds {args.rounds} --steps-per-block {args.steps_per_block}` — "
             f"{datetime.date.today().isoformat()}, {platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}. "
             f"Measured matmul peak (2048² GEMM): bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s, fp32 {peaks['fp32'] / 1e9:.0f} GFLOP/s.", "",
             f"Work per step: SmolLM2-135M-Instruct, prompt {PROMPT!r}, {SAMPLES} samples × ≤ {NEW_TOKENS} new tokens, pure "
             f"sampling, VADER sentiment reward, KL-regularised with β = {BETA} (ours: `rkl` on P = a·exp(r/β); TRL: RLOO, "
             "beta = 0.1), one optimiser step. Ours: LoRA r = 16 (default); TRL: full fine-tuning (default).", "",
             "Where the time goes, before and after each speed-up, and what would close the rest: "
             "[step_time_profile.md](step_time_profile.md).", "",
             "| variant | median s/step | samples/s | timed steps | × TRL bf16 |", "|---|---|---|---|---|"]
    for v, (med, n, _) in rows.items():
        ratio = f"{med / ref:.2f}" if ref else "–"
        lines.append(f"| {v} | {med:.2f} | {SAMPLES / med:.2f} | {n} | {ratio} |")
    lines.append("")
    for v, (med, _, extra) in rows.items():
        if "flops" in extra:
            f = extra["flops"]["flops"]
            lines.append(f"- {v}: counted {f / 1e12:.2f} TFLOP per step (8·P·tokens, P = {extra['flops']['params_matmul'] / 1e6:.0f}M, "
                         f"{extra['flops']['tokens_per_pass']} tokens per pass) → MFU {f / med / peaks['bf16']:.1%} of the bf16 "
                         f"peak, {f / med / peaks['fp32']:.1%} of the fp32 peak. Step breakdown (median): sampling "
                         f"{extra['breakdown']['seconds_sample']:.2f} s, reference scoring + rewards "
                         f"{extra['breakdown']['seconds_score']:.2f} s, "
                         f"policy forward/backward + optimiser {extra['breakdown']['seconds_update']:.2f} s.")
    profs = [(v, e["profile"]) for v, (_, _, e) in rows.items() if e.get("profile")]
    for v, prof in profs:
        lines += ["", f"## torch.profiler, one step of {v} (top ops by self CPU time)", "", "```", prof, "```"]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
