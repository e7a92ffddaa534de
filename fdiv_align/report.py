"""``fdiv-align-report``: result tables and plots from Hydra multirun directories.

    fdiv-align-report multirun/2026-11-22/10-00-00 [more dirs] --out docs/results/smollm2.md --plots docs/results/plots

Reads every run directory (a directory holding summary.json and metrics.jsonl) under the given
paths, or compact runs files (``--export`` writes one: a JSON line per run with what the report
reads). Per task: a "base" row (the untuned model: the step-0 evaluation, identical in every run of
the task with the same eval_seed — a sweep may make it once, in a ``trainer.steps=0`` run, which
gives no divergence row), a "target p" row (:func:`target_row`) and one row per divergence with the
final evaluation's KL(p‖π), KL(π‖p), JS and TV estimates, alignment, KL(π‖a), Distinct-1/2/3,
Self-BLEU-3 and entropy — mean ± standard error over seeds — and the seeds and settings that made
the cell. Plots (one PNG per figure, per task):
alignment and KL(p‖π) against samples seen, and alignment against KL(π‖a). The output depends only
on the run directories (sorted), so rerunning it regenerates the same bytes.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import defaultdict
from pathlib import Path

import yaml

from .extras import require
from .files import atomic_write_text

COLUMNS = [("kl_p_pi", "KL(p‖π)"), ("kl_pi_p", "KL(π‖p)"), ("js", "JS"), ("tv", "TV"), ("alignment", "alignment"),
           ("kl_pi_a", "KL(π‖a)"), ("distinct_1", "Dist-1"), ("distinct_2", "Dist-2"), ("distinct_3", "Dist-3"),
           ("self_bleu_3", "Self-BLEU-3"), ("entropy", "entropy")]
DIV_ORDER = ["rkl", "fkl", "js", "tv", "alpha", "chi2"]
#: columns holding Monte-Carlo estimates of quantities ≥ 0: a negative value is noise, and is marked
ESTIMATES = ("kl_p_pi", "kl_pi_p", "js", "tv", "kl_pi_a")
NOISE_NOTE = ("KL(p‖π), KL(π‖p), JS and TV are importance-sampling estimates, KL(π‖a) a Monte-Carlo mean, all from "
              "the evaluation sample: noisy (± is the standard error over seeds), and a value marked ⁻ is negative — "
              "noise around a true value ≥ 0.")


def find_runs(paths: list[str]) -> list[Path]:
    runs = set()
    for p in paths:
        root = Path(p)
        if not root.exists():
            raise FileNotFoundError(f"{root} does not exist")
        runs.update(s.parent for s in root.rglob("summary.json"))
    if not runs:
        raise FileNotFoundError(f"no run directories (with summary.json) under {paths}")
    return sorted(runs)


def load_runs(paths: list[str]) -> list[dict]:
    """The runs under ``paths``: run directories (found by :func:`find_runs`), or compact runs files
    (``*.jsonl``, written by ``--export``: one run per line, the same records as :func:`load_run`)."""
    runs, dirs = [], []
    for p in paths:
        if p.endswith(".jsonl") and Path(p).is_file():
            lines = Path(p).read_text(encoding="utf-8").splitlines()
            runs += [{**json.loads(line), "dir": Path(json.loads(line)["dir"])} for line in lines if line.strip()]
        else:
            dirs.append(p)
    return runs + ([load_run(r) for r in find_runs(dirs)] if dirs else [])


def export_runs(runs: list[dict], path: str | Path) -> Path:
    """The compact form of ``runs``: one JSON line per run (its directory's name, summary, evaluation
    records and config) — what the report reads, without checkpoints, samples or training records."""
    text = "".join(json.dumps({"dir": Path(r["dir"]).name, "summary": r["summary"], "evals": r["evals"],
                               "config": r["config"]}, ensure_ascii=False) + "\n" for r in runs)
    return atomic_write_text(path, text)


def load_run(run: Path) -> dict:
    summary = json.loads((run / "summary.json").read_text())
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"kind": "eval"' in line]
    cfg_path = run / ".hydra" / "config.yaml"  # CLI runs; summary.json carries the config of every run
    cfg = yaml.safe_load(cfg_path.read_text()) if cfg_path.exists() else summary.get("config", {})
    return {"dir": run, "summary": summary, "evals": evals, "config": cfg}


def _cell(key, values) -> str:
    text = _mean_se(values)
    vals = [v for v in values if v is not None and math.isfinite(v)]
    if key in ESTIMATES and vals and sum(vals) / len(vals) < 0:
        text += " ⁻"
    return text


#: a divergence's cell is separable when it differs from another divergence's by more than this many standard
#: errors of the difference, √(se₁² + se₂²) (seeds as independent replicates)
SEPARABLE_Z = 2.0
UNSEPARABLE_NOTE = (f"A cell marked ~ is not separable from noise: it differs from no other divergence's value on that "
                    f"column by more than {SEPARABLE_Z:g} standard errors of the difference (or has one seed only, or "
                    f"is infinite); only unmarked cells support an ordering.")


def _stats(values) -> tuple[float, float] | None:
    """(mean, standard error over seeds) of finite values from ≥ 2 seeds, else None."""
    vals = [v for v in values if v is not None]
    if len(vals) < 2 or any(not math.isfinite(v) for v in vals):
        return None
    m = sum(vals) / len(vals)
    return m, math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1) / len(vals))


def separable_cells(values: dict[str, list]) -> set[str]:
    """The divergences whose mean (of per-seed ``values[div]``) differs from at least one other divergence's
    by more than ``SEPARABLE_Z`` standard errors of the difference."""
    stats = {d: _stats(v) for d, v in values.items()}
    out = set()
    for a, sa in stats.items():
        for b, sb in stats.items():
            if a != b and sa and sb and abs(sa[0] - sb[0]) > SEPARABLE_Z * math.hypot(sa[1], sb[1]):
                out.add(a)
    return out


def _mean_se(values):
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if any(not math.isfinite(v) for v in vals):
        return "∞" if all(v > 0 for v in vals if not math.isfinite(v)) else "nan"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.3f}"
    se = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1) / len(vals))
    return f"{m:.3f} ± {se:.3f}"


def _settings(run) -> str:
    t = run["config"].get("trainer", {})
    s = run["summary"]
    return (f"{s['steps']} steps × {t.get('samples_per_step', '?')} samples, lr {t.get('lr', '?')}, "
            f"baseline {t.get('baseline', '?')}, {'LoRA' if s.get('lora') else 'full'}")


#: at most this many pooled QRS texts enter the target row's Distinct-n and Self-BLEU (both depend on the
#: number of texts: compare with rows evaluated on as many samples)
TARGET_TEXTS = 256
#: fewer accepted QRS samples than this, or a single distinct text, and the target row says its estimates are
#: not meaningful instead of printing a bound
MIN_TARGET_SAMPLES = 30


def target_row(runs: list[dict]) -> dict | None:
    """The target p itself from the final evaluations of ``runs`` (fdiv_align/training/evaluation.py,
    ``target_p_record``): alignment = mean ± s.e. over the pooled QRS samples of every run; Distinct-n and
    Self-BLEU-3 of the first ``TARGET_TEXTS`` of them (runs in order); entropy H(p) and KL(p‖a) = the
    runs' IS estimates, mean ± s.e. over runs (each run's policy is a different proposal). None when no
    run has QRS samples. Returns {"cells": column key → text, "description": text, "alignment": pooled
    mean, "kl_a": mean KL(p‖a) estimate or None}."""
    from .training.metrics import distinct_n, self_bleu

    have = [r for r in runs if r["summary"].get("final") and "qrs_samples" in r["summary"]["final"]]
    exact = [r for r in have if _floor(r) is None]  # runs with divergence.log_phi_floor aim at p_ε, not p
    finals = [r["summary"]["final"] for r in (exact or have)]
    floors = sorted({_floor(r) for r in have} - {None})
    texts = [t for f in finals for t in f["qrs_samples"]["texts"]]
    align = [a for f in finals for a in f["qrs_samples"]["alignment"]]
    if not texts:
        return None
    n = len(align)
    mean = sum(align) / n
    sub = texts[:TARGET_TEXTS]
    cells = {"alignment": _mean_se(align) + (" (1 sample)" if n == 1 else ""), "kl_pi_a": _mean_se([f["target_kl_a"] for f in finals]),
             "entropy": _mean_se([f["target_entropy"] for f in finals]),
             "distinct_1": f"{distinct_n(sub, 1):.3f}", "distinct_2": f"{distinct_n(sub, 2):.3f}",
             "distinct_3": f"{distinct_n(sub, 3):.3f}", "self_bleu_3": f"{self_bleu(sub, 3):.3f}"}
    proposed = sum(f["qrs_proposed"] for f in finals)
    bounds = [f["qrs_tv_bound"] for f in finals if f.get("qrs_tv_bound") is not None]
    bound = f", estimated TV(p, p_β) ≤ {max(bounds):.3f} (largest over runs)" if bounds else ""
    distinct = len(set(texts))
    if n < MIN_TARGET_SAMPLES or distinct < 2:
        bound = (f" — NOT MEANINGFUL: {n} accepted sample(s), {distinct} distinct text(s); a proposal this narrow "
                 f"cannot show p's support, so these estimates (and any TV bound) say nothing about p")
    which = ("" if not floors else f" (those without log_phi_floor; runs with {floors} aim at p_ε)" if exact
             else f" (all with log_phi_floor {floors}: this is p_ε)")
    desc = (f"QRS from the final policies of {len(finals)} runs below{which}: {n} of {proposed} proposals accepted "
            f"({n / proposed:.1%}){bound}; Dist/Self-BLEU on {len(sub)} of them; KL(π‖a) column = KL(p‖a) and "
            f"entropy = H(p), IS estimates (± over runs)")
    kl_a = [f["target_kl_a"] for f in finals if f.get("target_kl_a") is not None]
    return {"cells": cells, "description": desc, "alignment": mean, "kl_a": sum(kl_a) / len(kl_a) if kl_a else None}


def _floor(run: dict):
    return run["summary"].get("config", {}).get("divergence", {}).get("log_phi_floor")


def _check_distinct_seeds(task: str, divergence: str, runs: list[dict]) -> None:
    """A row's ± is over seeds: two runs of one seed in a row (copies of a run, or two settings) are refused."""
    seen = {}
    for i, r in enumerate(runs):
        seed, name = r["summary"]["seed"], r.get("dir", f"#{i + 1} (no directory)")
        if seed in seen:
            raise ValueError(f"{task}/{divergence}: runs {seen[seed]} and {name} both have seed {seed}; a row's ± is "
                             f"over seeds, so each run in it needs its own seed. Copies of one run: give one; runs of "
                             f"different settings: report them separately")
        seen[seed] = name


def tables(runs: list[dict]) -> str:
    by_task = defaultdict(lambda: defaultdict(list))
    base_runs = defaultdict(list)
    for r in runs:
        task = r["summary"]["task"]
        if r["summary"]["steps"] == 0:
            base_runs[task].append(r)
        else:
            by_task[task][r["summary"]["divergence"]].append(r)
    lines = []
    for task in sorted(set(by_task) | set(base_runs)):
        divs = by_task[task]
        lines += [f"## {task}", "", "| divergence | " + " | ".join(label for _, label in COLUMNS) + " | seeds | settings |",
                  "|---|" + "---|" * (len(COLUMNS) + 2)]
        all_runs = [r for d in divs.values() for r in d]
        base = next((r["summary"]["base"] for r in base_runs[task] + all_runs if r["summary"].get("base")), None)
        if base is not None:
            lines.append("| base (untuned) | " + " | ".join(_cell(k, [base.get(k)]) for k, _ in COLUMNS)
                         + " | – | step-0 evaluation of the base model |")
        target = target_row(all_runs)
        if target is not None:
            lines.append("| target p | " + " | ".join(target["cells"].get(k, "–") for k, _ in COLUMNS)
                         + f" | – | {target['description']} |")
        order = sorted(divs, key=lambda d: (DIV_ORDER.index(d) if d in DIV_ORDER else 99, d))
        per_seed = {d: sorted(divs[d], key=lambda r: r["summary"]["seed"]) for d in order}
        values = {k: {d: [r["summary"]["final"].get(k) for r in rs] for d, rs in per_seed.items()} for k, _ in COLUMNS}
        separable = {k: separable_cells(v) for k, v in values.items()}
        for div, rs in per_seed.items():
            _check_distinct_seeds(task, div, rs)
            cells = [_cell(k, values[k][div]) + ("" if div in separable[k] or _cell(k, values[k][div]) == "–" else " ~")
                     for k, _ in COLUMNS]
            seeds = ",".join(str(r["summary"]["seed"]) for r in rs)
            settings = "; ".join(sorted({_settings(r) for r in rs}))
            lines.append(f"| {div} | " + " | ".join(cells) + f" | {seeds} | {settings} |")
        lines += ["", NOISE_NOTE, "", UNSEPARABLE_NOTE, ""]
    return "\n".join(lines)


def _finish(fig, ax, xlabel, ylabel, title, path: Path) -> Path:
    """Label, save (no timestamp metadata: reruns give the same bytes) and close one figure."""
    import matplotlib.pyplot as plt

    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(title="divergence")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100, metadata={"Software": None})
    plt.close(fig)
    return path


def plots(runs: list[dict], out_dir: Path) -> list[Path]:
    require("plots", "fdiv-align-report --plots")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    by_task = defaultdict(list)
    for r in runs:
        by_task[r["summary"]["task"]].append(r)
    for task, every in sorted(by_task.items()):
        rs = [r for r in every if r["summary"]["steps"] > 0]
        base = next((r["summary"]["base"] for r in every if r["summary"].get("base")), None)
        for key, ylabel in [("alignment", "alignment (eval)"), ("kl_p_pi", "KL(p‖π) estimate (eval)")]:
            fig, ax = plt.subplots(figsize=(6, 4))
            for div in sorted({r["summary"]["divergence"] for r in rs}, key=lambda d: DIV_ORDER.index(d) if d in DIV_ORDER else 99):
                for i, r in enumerate(sorted([r for r in rs if r["summary"]["divergence"] == div], key=lambda r: r["summary"]["seed"])):
                    pts = [(e["samples_seen"], e[key]) for e in r["evals"] if key in e and math.isfinite(e[key])]
                    if pts:
                        color = f"C{DIV_ORDER.index(div) if div in DIV_ORDER else 9}"
                        ax.plot(*zip(*pts), marker="o", label=div if i == 0 else None, color=color)
            written.append(_finish(fig, ax, "samples seen", ylabel, f"{task}: {ylabel} during training",
                                   out_dir / f"{task}_{key}_curve.png"))
        fig, ax = plt.subplots(figsize=(6, 4))
        if base is not None:
            ax.scatter([base.get("kl_pi_a", 0.0)], [base["alignment"]], marker="*", s=150, color="black", label="base")
        target = target_row(rs)
        if target is not None and target["kl_a"] is not None:  # the target: pooled QRS alignment, IS KL(p‖a)
            ax.scatter([target["kl_a"]], [target["alignment"]], marker="P", s=150, color="gray", label="target p")
        for div in sorted({r["summary"]["divergence"] for r in rs}, key=lambda d: DIV_ORDER.index(d) if d in DIV_ORDER else 99):
            pts = [(r["summary"]["final"]["kl_pi_a"], r["summary"]["final"]["alignment"]) for r in rs if r["summary"]["divergence"] == div]
            ax.scatter(*zip(*pts), label=div, color=f"C{DIV_ORDER.index(div) if div in DIV_ORDER else 9}")
        written.append(_finish(fig, ax, "KL(π‖a) (nats)", "alignment", f"{task}: alignment vs KL to the base (final)",
                               out_dir / f"{task}_tradeoff.png"))
    return written


def main(argv=None):
    ap = argparse.ArgumentParser(prog="fdiv-align-report", description=__doc__.split("\n\n")[0])
    ap.add_argument("dirs", nargs="+", help="Hydra multirun directories (or any directories holding run dirs), or "
                                            "compact runs files (*.jsonl, from --export)")
    ap.add_argument("--export", default=None, help="also write the runs' compact form (JSONL) to this file")
    ap.add_argument("--out", default=None, help="markdown file to write (default: print)")
    ap.add_argument("--plots", default=None, help="directory for PNG plots")
    ap.add_argument("--title", default="f-DPG results")
    ap.add_argument("--preamble", default=None, help="a markdown file placed after the title (reading notes)")
    args = ap.parse_args(argv)
    runs = load_runs(args.dirs)
    if args.export:
        export_runs(runs, args.export)
    preamble = Path(args.preamble).read_text().rstrip() + "\n\n" if args.preamble else ""
    text = (f"# {args.title}\n\nGenerated by `fdiv-align-report {' '.join(args.dirs)}` from {len(runs)} runs.\n\n"
            + preamble + tables(runs))
    if args.plots:
        paths = plots(runs, Path(args.plots))
        import os

        rel = [Path(os.path.relpath(p, Path(args.out).parent)) if args.out else p for p in paths]
        text += "\n## Plots\n\n" + "\n".join(f"![{p.stem}]({p})" for p in rel) + "\n"
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)
    else:
        print(text)


if __name__ == "__main__":
    main()
