"""The preference pipeline end to end on the embedded SmolLM2 (docs/preference_pipeline.md):

1. synthetic preference data: SmolLM2 continues 16 prompts; pairs of its continuations are labelled by
   VADER sentiment with Bradley–Terry noise (``fdiv_align.preferences.synthetic_preferences``);
2. a reward model on them (``fdiv-align-rm``), held-out pairwise accuracy ± s.e.;
3. f-DPG towards P = a·exp(r/β) with that reward model (``fdiv-align task=reward_model``), js and rkl;
4. offline f-DPO on the same pairs (``fdiv-align-po``), rkl (= DPO) and js;
5. one evaluation of every policy on the same 128 (prompt, uniforms) draws: VADER sentiment (the
   "human" preference the data came from) and the reward model's r, mean ± s.e.

Every stage is a command a user would type (printed, timed); a finished stage is skipped on a rerun
(resumable). Writes docs/results/preference_pipeline.md.

    python benchmarks/preference_pipeline.py [--work runs/preference_pipeline] [--out docs/results/preference_pipeline.md]
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import torch

PROMPTS = ["The movie was", "My day at the beach was", "The food at this restaurant", "I think the new phone is",
           "Our hotel room was", "The concert last night", "This book made me feel", "The customer service was",
           "My new job is", "The weather this weekend", "The game ended and we", "Honestly, the service here",
           "The trip to the mountains", "This coffee tastes", "The meeting this morning", "Living in this city"]
RESPONSES_PER_PROMPT = 96  # → 48 pairs per prompt, 768 pairs before ties are dropped
MIN_GAP = 0.05  # pairs whose VADER scores differ by less are "no preference" and dropped
MAX_NEW_TOKENS = 16
TAU = 0.1  # Bradley–Terry temperature of the synthetic labels: P(a ≻ b) = σ((r(a) − r(b))/τ)
BETA = 0.1  # P = a·exp(r/β) for f-DPG; f-DPO's β
EVAL_SAMPLES, EVAL_SEED = 128, 1234
SAMPLE_BATCH = 256  # sequences per sampling call: decoding is latency-bound on CPU (the data stage of this
# script took 124 s at 64 per call and 55 s at 256 on a 2-core AMD EPYC, AVX2, fp32)
RM_ARGS = ["training.lr=5e-4", "training.eval_at_start=false"]  # 2 epochs (the default)
PO_ARGS = ["training.epochs=1", "training.batch_size=16", "training.eval_at_start=false"]


def _cli(entry: str, *args: str) -> list[str]:
    return [sys.executable, "-c", f"from fdiv_align.cli import {entry}; {entry}()", *args]


def _stage(name: str, done: Path, cmd: list[str], times: dict, shown: str) -> None:
    if done.exists():
        print(f"[pipeline] {name}: done already ({done})", flush=True)
        return
    print(f"[pipeline] {name}: {shown}", flush=True)
    t = time.perf_counter()
    subprocess.run(cmd, check=True)
    times[name] = time.perf_counter() - t


def _eval_draws(num_contexts: int):
    """The trainer's evaluation design (fdiv_align/training/evaluation.py): contexts arange(M) mod C, uniforms from the seed."""
    g = torch.Generator().manual_seed(EVAL_SEED)
    return torch.arange(EVAL_SAMPLES) % num_contexts, torch.rand((EVAL_SAMPLES, MAX_NEW_TOKENS), generator=g, dtype=torch.float64)


def _sample(model, tokenizer, ctx, U=None, generator=None) -> list[str]:
    """One continuation of PROMPTS[ctx[i]] per row, SAMPLE_BATCH rows per call: from the uniforms ``U``
    (common random numbers) or, without them, drawn from ``generator``."""
    from fdiv_align.lm.sampling import sample

    texts = []
    with torch.no_grad():
        for i in range(0, len(ctx), SAMPLE_BATCH):
            texts += sample(model, tokenizer, PROMPTS, 0, MAX_NEW_TOKENS, generator=generator,
                            context_index=ctx[i:i + SAMPLE_BATCH],
                            uniforms=None if U is None else U[i:i + SAMPLE_BATCH]).texts
    return texts


def make_data(work: Path, times: dict) -> Path:
    from fdiv_align.lm.models import load_model
    from fdiv_align.preferences import synthetic_preferences, write_preferences
    from fdiv_align.targets.scorers import VaderSentiment

    path = work / "prefs.jsonl"
    (work / "prompts.txt").write_text("".join(p + "\n" for p in PROMPTS))
    if path.exists():
        return path
    t = time.perf_counter()
    lm = load_model("smollm2-135m")
    g = torch.Generator().manual_seed(0)
    ctx_all = torch.arange(len(PROMPTS)).repeat_interleave(RESPONSES_PER_PROMPT)
    texts = _sample(lm.model, lm.tokenizer, ctx_all, generator=g)
    responses = [texts[c * RESPONSES_PER_PROMPT:(c + 1) * RESPONSES_PER_PROMPT] for c in range(len(PROMPTS))]
    pairs = synthetic_preferences(PROMPTS, responses, VaderSentiment(beta=1.0).rewards, temperature=TAU,
                                  generator=g, min_gap=MIN_GAP)
    seen, unique = set(), []
    for p in pairs:  # identical pairs (the same two continuations twice) would be refused by the loader
        if (p.prompt, p.chosen, p.rejected) not in seen and p.chosen.strip() and p.rejected.strip():
            seen.add((p.prompt, p.chosen, p.rejected))
            unique.append(p)
    write_preferences(unique, path)
    times["1 data"] = time.perf_counter() - t
    return path


def evaluate(work: Path) -> dict:
    """VADER and reward-model scores of base, f-DPG (their final evaluation samples) and f-DPO policies."""
    from peft import PeftModel

    from fdiv_align.lm.models import load_model
    from fdiv_align.targets.reward_model import load_reward_model
    from fdiv_align.targets.scorers import VaderSentiment

    cache = work / "evaluation.json"
    if cache.exists():
        return json.loads(cache.read_text())
    ctx, U = _eval_draws(len(PROMPTS))
    base = load_model("smollm2-135m")
    texts = {"base (SmolLM2)": _sample(base.model, base.tokenizer, ctx, U)}
    for div in ("js", "rkl"):
        rows = [json.loads(l) for l in (work / f"fdpg_{div}" / "samples.jsonl").read_text().splitlines()]
        last = max(r["step"] for r in rows)
        texts[f"f-DPG {div} (reward model target)"] = [r["text"] for r in rows if r["step"] == last]
    for div in ("rkl", "js"):
        lm = load_model("smollm2-135m")
        model = PeftModel.from_pretrained(lm.model, str(work / f"fdpo_{div}" / "final_model")).eval()
        texts[f"f-DPO {div}" + (" (= DPO)" if div == "rkl" else "")] = _sample(model, lm.tokenizer, ctx, U)
    contexts = [PROMPTS[i] for i in ctx.tolist()]
    vader, rm = VaderSentiment(beta=1.0), load_reward_model(work / "rm")
    out = {}
    for name, ts in texts.items():
        assert len(ts) == EVAL_SAMPLES, (name, len(ts))
        v, r = vader.rewards(ts, contexts), rm.rewards(ts, contexts)
        out[name] = {"vader": float(v.mean()), "vader_se": float(v.std() / math.sqrt(len(v))),
                     "reward": float(r.mean()), "reward_se": float(r.std() / math.sqrt(len(r))), "example": ts[0]}
    cache.write_text(json.dumps(out, indent=2))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="runs/preference_pipeline")
    ap.add_argument("--out", default="docs/results/preference_pipeline.md")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of every stage (default: all cores)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    times_path = work / "times.json"
    times = json.loads(times_path.read_text()) if times_path.exists() else {}
    t0 = time.perf_counter()
    data = make_data(work, times)
    times_path.write_text(json.dumps(times))
    common = ["training.progress=false"] + ([f"training.threads={args.threads}"] if args.threads else [])
    _stage("2 reward model", work / "rm" / "summary.json",
           _cli("rm_main", f"training.data={data}", *RM_ARGS, f"output_dir={work / 'rm'}", *common), times,
           f"fdiv-align-rm training.data={data} {' '.join(RM_ARGS)} output_dir={work / 'rm'}")
    times_path.write_text(json.dumps(times))
    for div in ("js", "rkl"):
        args_ = ["task=reward_model", f"task.params.path={work / 'rm'}", f"task.params.beta={BETA}",
                 f"task.contexts={work / 'prompts.txt'}", f"task.max_new_tokens={MAX_NEW_TOKENS}", f"divergence={div}",
                 "trainer.steps=20", "trainer.eval_every=0", "trainer.eval_at_start=false",
                 f"trainer.eval_samples={EVAL_SAMPLES}", "trainer.eval_micro_batch_size=64",
                 f"logger.log_samples={EVAL_SAMPLES}", "logger.progress=false", f"output_dir={work / f'fdpg_{div}'}"]
        args_ += [f"trainer.threads={args.threads}"] if args.threads else []
        _stage(f"3 f-DPG {div}", work / f"fdpg_{div}" / "summary.json", _cli("main", *args_), times,
               "fdiv-align " + " ".join(args_))
        times_path.write_text(json.dumps(times))
    for div in ("rkl", "js"):
        args_ = [f"training.data={data}", f"divergence={div}", f"beta={BETA}", *PO_ARGS,
                 f"output_dir={work / f'fdpo_{div}'}", *common]
        _stage(f"4 f-DPO {div}", work / f"fdpo_{div}" / "summary.json", _cli("po_main", *args_), times,
               "fdiv-align-po " + " ".join(args_))
        times_path.write_text(json.dumps(times))
    t = time.perf_counter()
    results = evaluate(work)
    times.setdefault("5 evaluation", time.perf_counter() - t)
    times_path.write_text(json.dumps(times))
    print(f"[pipeline] this invocation: {time.perf_counter() - t0:.0f}s", flush=True)
    Path(args.out).write_text(report(work, results, times))
    print(f"[pipeline] wrote {args.out}")


def _hidden_reward_accuracy(pairs, training: dict) -> tuple[float, float]:
    """Pairwise accuracy (ties ½) ± binomial s.e. of VADER, the labels' hidden reward, on the reward
    model's held-out pairs (the same seeded split): what a perfect reward model would score."""
    from fdiv_align.preferences.pair_training import pairwise_accuracy, split_pairs
    from fdiv_align.targets.scorers import VaderSentiment

    _, held = split_pairs(pairs, training["eval_fraction"], training["seed"])
    vader, prompts = VaderSentiment(beta=1.0), [p.prompt for p in held]
    return pairwise_accuracy(vader.rewards([p.chosen for p in held], prompts) - vader.rewards([p.rejected for p in held], prompts))


def report(work: Path, results: dict, times: dict) -> str:
    from fdiv_align.lm.precision import cpu_name
    from fdiv_align.preferences import load_preferences

    rm = json.loads((work / "rm" / "summary.json").read_text())
    pairs = load_preferences(work / "prefs.jsonl")
    fin = rm["final"]
    z = (fin["heldout_accuracy"] - 0.5) / fin["heldout_accuracy_se"]
    ceiling, ceiling_se = _hidden_reward_accuracy(pairs, rm["config"]["training"])
    lines = [
        "# Preference pipeline on SmolLM2-135M-Instruct: figures",
        "",
        f"Generated by `python benchmarks/preference_pipeline.py` on {cpu_name()} ({torch.get_num_threads()} threads), "
        f"torch {torch.__version__}. The walk-through is docs/preference_pipeline.md.",
        "",
        f"- Data: {len(pairs)} pairs from {len(PROMPTS)} prompts × {RESPONSES_PER_PROMPT} SmolLM2 continuations "
        f"(≤ {MAX_NEW_TOKENS} tokens), labelled by VADER with Bradley–Terry noise τ = {TAU}.",
        f"- Reward model: held-out pairwise accuracy (0.5 for the untrained head, which ties every pair) "
        f"**{fin['heldout_accuracy']:.3f} ± {fin['heldout_accuracy_se']:.3f}** on {fin['heldout_pairs']} "
        f"held-out pairs ({z:.1f} standard errors above chance), {rm['steps']} steps of "
        f"{rm['config']['training']['batch_size']} pairs ({rm['epochs']} epochs of {rm['train_pairs']} training pairs). "
        f"The ceiling: VADER itself — the hidden reward — orders {ceiling:.3f} ± {ceiling_se:.3f} of the same held-out "
        f"pairs as their noisy labels do.",
        "",
        "| stage | seconds |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.0f} |" for k, v in sorted(times.items())]
    lines += [f"| **total** | **{sum(times.values()):.0f}** ({sum(times.values()) / 60:.1f} min) |", "",
              f"Evaluation: the same {EVAL_SAMPLES} (prompt, uniforms) draws for every policy (the trainer's evaluation "
              f"design); VADER compound sentiment in [−1, 1] (the preference the data encodes) and the reward model's r, "
              f"mean ± s.e. f-DPG: 20 steps × 16 samples towards P = a·exp(r/{BETA}); f-DPO: one epoch in batches of 16 "
              f"pairs, β = {BETA}.", "",
              "| policy | VADER sentiment | reward model r | example continuation |", "|---|---|---|---|"]
    for name, r in results.items():
        example = r["example"].replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {name} | {r['vader']:.3f} ± {r['vader_se']:.3f} | {r['reward']:.3f} ± {r['reward_se']:.3f} | "
                     f"{example!r} |")
    po = {d: json.loads((work / f"fdpo_{d}" / "summary.json").read_text())["final"] for d in ("rkl", "js")}
    lines += ["", "f-DPO held-out pairwise accuracy of the implicit reward β f′(π/π_ref): "
              + "; ".join(f"{d}: {v['heldout_accuracy']:.3f} ± {v['heldout_accuracy_se']:.3f}" for d, v in po.items()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
