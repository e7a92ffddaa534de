"""Base-model rates of the built-in tasks on the embedded SmolLM2 (alignment of the untuned model).

    python benchmarks/base_rates.py [--samples 256] [--seed 0] [--out docs/results/base_rates.md]

Each task's contexts are sampled evenly; alignment = E_a[b] (pointwise), E_a[r] (reward) or
E_a[φ] (distributional), with its standard error. Pure ancestral sampling, task max_new_tokens.
"""

import argparse
import datetime
import math
import os
import platform
import time

import torch

from fdiv_align.lm.models import load_model
from fdiv_align.lm.sampling import sample
from fdiv_align.targets import get_task


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tasks", default="amazing,science,sentiment,female,code_compiles")
    ap.add_argument("--out", default="docs/results/base_rates.md")
    args = ap.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    lm = load_model("smollm2-135m")
    g = torch.Generator().manual_seed(args.seed)
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        t0 = time.perf_counter()
        values, examples = [], []
        for start in range(0, args.samples, args.batch):
            n = min(args.batch, args.samples - start)
            idx = torch.arange(start, start + n) % len(task.contexts)
            batch = sample(lm.model, lm.tokenizer, task.contexts, 0, task.max_new_tokens, generator=g, context_index=idx)
            values.append(task.scorer.alignment(batch.texts, batch.context_texts))
            examples.extend(batch.texts[:1])
        v = torch.cat(values)
        se = float(v.std() / math.sqrt(len(v)))
        kind = {"pointwise": "E[b]", "reward": "E[r]", "distributional": "E[φ]"}[task.kind]
        rows.append((name, task.kind, kind, float(v.mean()), se, len(v), task.max_new_tokens, len(task.contexts),
                     time.perf_counter() - t0, examples[0]))
        print(f"{name}: {kind} = {float(v.mean()):.4f} ± {se:.4f} ({len(v)} samples, {time.perf_counter() - t0:.1f}s)")
    date = datetime.date.today().isoformat()
    lines = [
        "# Base-model rates on SmolLM2-135M-Instruct (untuned)",
        "",
        f"Command: `python benchmarks/base_rates.py --samples {args.samples} --seed {args.seed}` — {date}, "
        f"{platform.machine()} CPU, {os.cpu_count()} cores, torch {torch.__version__}, fp32, pure sampling.",
        "",
        "| task | kind | quantity | base rate | s.e. | samples | max new tokens | contexts | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, kind, q, m, se, n, T, C, sec, _ in rows:
        lines.append(f"| {name} | {kind} | {q} | {m:.4f} | {se:.4f} | {n} | {T} | {C} | {sec:.1f} |")
    lines += ["", "One sample per task (first batch):", ""]
    for name, *_, ex in rows:
        lines.append(f"- `{name}`: {ex[:150]!r}")
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
