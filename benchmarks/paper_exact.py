"""The paper's findings on a neural policy whose every sequence is enumerated (Go et al., ICML 2023).

    python benchmarks/paper_exact.py [--seeds 5] [--workers 2] [--tasks pointwise,...] [--divergences rkl,...]
                                     [--results benchmarks/results/paper_exact.jsonl] [--out docs/results/paper_exact.md]

Base model a: a 2-layer Llama (hidden 32) over 6 words + 4 special tokens (V = 10), trained here by
maximum likelihood on a seeded synthetic corpus (a first-order Markov chain over the words with
Dirichlet(0.4) transitions: fdiv_align.testing.exact_tasks.base_model, 16 s); cached outside the
repository, its weights' fingerprint is the first cell of --results. Continuations have exactly T = 5 tokens
(no EOS stop), so each context has V^T = 100,000 sequences, and Z, p and every metric are exact
(:func:`fdiv_align.testing.toy.enumerate_logprobs`, renormalised over the enumeration).

Tasks (the paper's four families), with P(x|c) = a(x|c)·Φ(x, c):
  pointwise       Φ = [the word "cat" occurs ≥ 2 times]
  distributional  Φ = exp(λ·[the word "red" occurs]), λ fitted exactly on the enumeration so that E_p = 0.8
                  (E_a = 0.35)
  reward          Φ = exp(r/β), r = (number of "runs")/T, β = 0.1  (RLHF's target)
  conditional     contexts "red", "blue", "cat"; Φ = [the context word occurs in the continuation]
                  (per-context Z; metrics averaged over the contexts, which the trainer draws uniformly)

Every divergence (rkl, fkl, js, tv, alpha with α = 0.5, chi2) fine-tunes the whole policy (started at
a) with the library's Trainer (fdiv_align.training.trainer.Trainer: on-policy, leave-one-out baseline, Adam,
64 samples per step); rkl and chi2 are infinite where P = 0 and train towards p_ε with
divergence.log_phi_floor = −10 on the two tasks with zeros. Each (task, divergence) uses the learning
rate of LR_GRID whose run on seed LR_SEED (LR_BUDGET samples) ends with the lowest exact value of its
own objective D_f(π‖p_train); then --seeds seeds run to the largest budget, with exact evaluations
at CURVE samples. Exact metrics: KL(p‖π), KL(π‖p), JS, TV, α=0.5, χ², alignment (E_π[Φ] for the
constraints, E_π[r] for the reward, E_π[φ] for the distributional one), entropy H(π) and KL(π‖a).

Each cell (one run) is one line of --results (benchmarks/cells.py: key kind/task/divergence/seed/lr), written
when it completes, so an interrupted benchmark resumes and deleting a cell's line re-runs only that cell; the
page and plots are regenerated from the cells every time (--report-only: nothing else). Processes run
cells in parallel, one thread each.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from pathlib import Path

import torch
from cells import CellStore

from fdiv_align.lm.models import cache_dir
from fdiv_align.testing.exact_tasks import (DIVERGENCES, TASKS, ExactTask, base_model, qrs_check, run_cell,
                                            weights_fingerprint)

#: the trained base is cached outside the repository (it is re-trained, deterministically, when missing)
BASE_CACHE = cache_dir() / "paper_exact"

CURVE = (0, 1000, 2000, 5000, 10000, 20000, 30000)
BUDGETS = (2000, 10000, 30000)
LR_GRID = (3e-4, 1e-3, 3e-3, 1e-2, 3e-2)
LR_SEED, LR_BUDGET = 0, 10000  # the learning-rate runs use seed 0 (as do the first of the runs at the chosen rate)


# ----------------------------------------------------------------------------- one cell = one run


#: a cell: one learning-rate run ("lr"), one run at the selected learning rate ("run"), one QRS check ("qrs")
#: or the fingerprint of the base model the cells were computed with ("base")
CELL_KEY = ("kind", "task", "divergence", "seed", "lr")


def _do_cell(args) -> dict:
    kind, task, div, seed, lr = args
    budget = LR_BUDGET if kind == "lr" else BUDGETS[-1]
    curve = (0, LR_BUDGET) if kind == "lr" else CURVE
    row = {"kind": kind, **run_cell(task, div, seed, lr, budget, curve, cache=BASE_CACHE)}
    print(f"  {kind} {task}/{div} seed {seed} lr {lr:g}: objective {row['objective']:.4f} ({row['seconds']:.0f} s)", flush=True)
    return row


def _run_all(store: CellStore, cells, workers: int):
    """Run the cells not in ``store`` yet; each is appended to it as soon as it completes."""
    todo = [c for c in cells if store.get(**dict(zip(CELL_KEY, c))) is None]
    if workers <= 1:
        for c in todo:
            store.add(_do_cell(c))
        return
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        for row in pool.imap_unordered(_do_cell, todo):
            store.add(row)


def best_lr(store: CellStore, task: str, div: str) -> float | None:
    rows = [store.get(kind="lr", task=task, divergence=div, seed=LR_SEED, lr=lr) for lr in LR_GRID]
    rows = [r for r in rows if r is not None]
    finite = [r for r in rows if math.isfinite(r["objective"])]
    if len(rows) < len(LR_GRID) or not finite:
        return None
    return min(finite, key=lambda r: r["objective"])["lr"]


def check_base(store: CellStore, lm) -> None:
    """The base trained here must be the one the stored cells were computed with: its weights'
    fingerprint is the store's first cell (new cells on another base would not be comparable)."""
    fingerprint = weights_fingerprint(lm.model)
    stored = store.get(kind="base")
    if stored is None:
        store.add({"kind": "base", "fingerprint": fingerprint, "cpu": _cpu(), "torch": torch.__version__})
    elif stored["fingerprint"] != fingerprint:
        print(f"warning: the base model trained here (fingerprint {fingerprint}) differs from the one the stored cells "
              f"used ({stored['fingerprint']}, trained on {stored['cpu']}, torch {stored['torch']}): cells computed now "
              f"would not be comparable with them; run on that kind of CPU, or move the results file aside to start "
              f"over", file=sys.stderr)


# ----------------------------------------------------------------------------- report


def _mean_se(xs):
    xs = [x for x in xs if x is not None]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan
    m = sum(xs) / n
    if n == 1 or any(math.isinf(x) for x in xs):
        return m, math.nan
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1) / n)


def _at(row, budget, metric):
    """The metric at the evaluation for the curve point ``budget`` (the first step with at least that many samples)."""
    pts = [c for c in row["curve"] if c["point"] == budget]
    return pts[0][metric] if pts else None


def _fmt(m, se):
    if math.isnan(m):
        return "–"
    if math.isinf(m):
        return "∞"
    return f"{m:.3f}" if math.isnan(se) else f"{m:.3f} ± {se:.3f}"


def _verdict(diff, se, claim_sign=+1):
    """holds / does not hold / not separable, at 3 standard errors."""
    if math.isnan(se) or se == 0:
        return "not separable (no spread)"
    z = claim_sign * diff / se
    return "holds" if z > 3 else ("does not hold" if z < -3 else "not separable")


def _paired(runs, task, a, b, budget, metric):
    """mean and s.e. over seeds of metric(a) − metric(b) (same seeds)."""
    A = {r["seed"]: _at(r, budget, metric) for r in runs.get((task, a), [])}
    B = {r["seed"]: _at(r, budget, metric) for r in runs.get((task, b), [])}
    common = sorted(set(A) & set(B))
    return _mean_se([A[s] - B[s] for s in common]) + (len(common),)


def _run_order(r: dict) -> str:
    """The order the runs are averaged in (fixed: float sums depend on it)."""
    return f"{r['task']}/{r['divergence']}/lr{r['lr']:g}/seed{r['seed']}"


def write_report(store: CellStore, out: Path, args, wall: float):
    runs = {}  # only the cells at each (task, divergence)'s selected learning rate
    for r in sorted(store.rows(kind="run"), key=_run_order):
        if r["lr"] == best_lr(store, r["task"], r["divergence"]):
            runs.setdefault((r["task"], r["divergence"]), []).append(r)
    lm = base_model(cache=BASE_CACHE)
    lines = ["# The paper's claims, exactly: a neural policy over an enumerable sequence space", "",
             f"Command: `python benchmarks/paper_exact.py --seeds {args.seeds} --workers {args.workers}` — "
             f"{datetime.date.today()}, {platform.machine()} {_cpu()}, torch {torch.__version__}; "
             f"this invocation {wall / 60:.1f} min (cells already cached are not re-run).", "",
             __doc__.split("\n\n", 1)[1].split("Each cell")[0].strip(), "",
             "Cells: " + ", ".join(f"{t}: {sum(len(v) for k, v in runs.items() if k[0] == t)} runs" for t in TASKS) + ". "
             + _cost_line(store), ""]
    for task in TASKS:
        if not any(k[0] == task for k in runs):
            lines += [f"## {task}: not run yet", ""]
            continue
        ex = ExactTask(task, lm)
        tgt = ex.target_metrics()
        lines += [f"## {task}", "", f"Target p itself: alignment {tgt['alignment']:.3f}, entropy {tgt['entropy']:.3f} nats"
                  + (f"; λ = {ex.lam:.4f}" if task == "distributional" else "") + ".", ""]
        for budget in BUDGETS:
            lines += [f"After {budget:,} samples (mean ± s.e. over seeds):", "",
                      "| divergence | lr | seeds | KL(p‖π) | KL(π‖p) | JS | TV | alignment | entropy | KL(π‖a) |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            for div in DIVERGENCES:
                rs = runs.get((task, div), [])
                if not rs:
                    continue
                cells = [_fmt(*_mean_se([_at(r, budget, m) for r in rs])) for m in
                         ("kl_p_pi", "kl_pi_p", "js", "tv", "alignment", "entropy", "kl_pi_a")]
                floor = " (p_ε)" if rs[0]["floor"] else ""
                edge = "†" if rs[0]["lr"] in (LR_GRID[0], LR_GRID[-1]) else ""
                lines.append(f"| {div}{floor} | {rs[0]['lr']:g}{edge} | {len(rs)} | " + " | ".join(cells) + " |")
            lines.append("")
    lines += ["† the selected learning rate is at the edge of the grid.", ""]
    lines += _lr_section(store)
    lines += _claims(runs)
    lines += _qrs_section(store)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    _plots(runs, out.parent / "plots" / "paper_exact")


def _claims(runs) -> list[str]:
    big, small = BUDGETS[-1], BUDGETS[0]
    lines = ["## The paper's claims, with verdicts (3 standard errors of the paired seed differences)", ""]
    # 1. JS vs forward KL on KL(p‖π), GDC-style tasks
    lines += ["**1. Jensen–Shannon gives a better KL(p‖π) than forward KL on GDC-style tasks.**", "",
              "| task | samples | KL(p‖π): js − fkl | seeds | verdict |", "|---|---|---|---|---|"]
    for task in ("pointwise", "distributional", "conditional"):
        for b in BUDGETS:
            m, se, n = _paired(runs, task, "js", "fkl", b, "kl_p_pi")
            if n:
                lines.append(f"| {task} | {b:,} | {_fmt(m, se)} | {n} | {_verdict(m, se, -1)} |")
    # 2. reverse KL aligns fast and collapses diversity
    lines += ["", "**2. Reverse KL aligns fastest but collapses diversity** (alignment after the first budget; entropy at "
              "the last, against the mean of the other divergences' runs of the same seed).", "",
              "| task | alignment@2k: rkl − others | verdict | entropy@30k: rkl − others | verdict |", "|---|---|---|---|---|"]
    for task in TASKS:
        a = _vs_others(runs, task, "rkl", small, "alignment")
        e = _vs_others(runs, task, "rkl", big, "entropy")
        if a[2]:
            lines.append(f"| {task} | {_fmt(a[0], a[1])} | {_verdict(a[0], a[1], +1)} | {_fmt(e[0], e[1])} | {_verdict(e[0], e[1], -1)} |")
    # 3. forward KL covers the target, with high variance
    lines += ["", "**3. Forward KL covers the target (higher entropy than reverse KL) but has high variance** "
              "(seed standard deviation of the final KL(p‖π), fkl against the others).", "",
              "| task | entropy@30k: fkl − rkl | verdict | seed s.d. of KL(p‖π)@30k: fkl / others |", "|---|---|---|---|"]
    for task in TASKS:
        m, se, n = _paired(runs, task, "fkl", "rkl", big, "entropy")
        if n:
            sd = {d: _sd([_at(r, big, "kl_p_pi") for r in runs.get((task, d), [])]) for d in DIVERGENCES}
            others = [v for d, v in sd.items() if d != "fkl" and not math.isnan(v)]
            ratio = sd["fkl"] / (sum(others) / len(others)) if others and sum(others) > 0 else math.nan
            lines.append(f"| {task} | {_fmt(m, se)} | {_verdict(m, se, +1)} | {ratio:.2f} |")
    # 4. no divergence best everywhere
    lines += ["", "**4. No divergence is best everywhere** (lowest mean KL(p‖π) after 30k samples; separated from the "
              "runner-up at 3 s.e. of the paired difference?).", "", "| task | best | runner-up | difference | verdict |",
              "|---|---|---|---|---|"]
    winners = set()
    for task in TASKS:
        means = {d: _mean_se([_at(r, big, "kl_p_pi") for r in runs.get((task, d), [])])[0] for d in DIVERGENCES
                 if runs.get((task, d))}
        if len(means) < 2:
            continue
        order = sorted(means, key=lambda d: means[d])
        m, se, n = _paired(runs, task, order[1], order[0], big, "kl_p_pi")
        v = _verdict(m, se, +1)
        if v == "holds":
            winners.add(order[0])
        lines.append(f"| {task} | {order[0]} | {order[1]} | {_fmt(m, se)} | {'separable' if v == 'holds' else 'not separable'} |")
    lines += ["", f"Separable winners across tasks: {', '.join(sorted(winners)) or 'none'} — the claim "
              + ("holds" if len(winners) > 1 else "is not decided by these runs (fewer than two tasks with a separable, different winner)")
              + ".", ""]
    return lines


def _cost_line(store: CellStore) -> str:
    """The whole benchmark's cost from the cells' own timings (each cell runs single-threaded)."""
    cells = store.rows(kind="lr") + store.rows(kind="run") + store.rows(kind="qrs")
    total = sum(c["seconds"] for c in cells)
    return (f"Measured cost of all {len(cells)} cells (learning-rate runs, runs at every learning rate kept, QRS checks): "
            f"{total / 60:.1f} single-thread minutes, i.e. ≈ {total / 120:.1f} minutes on 2 cores with 2 workers "
            f"(plus the base model's training, once).")


def _lr_section(store: CellStore) -> list[str]:
    lines = [f"## Learning-rate selection (seed {LR_SEED}, {LR_BUDGET:,} samples; exact D_f(π‖p_train) of the run's own "
             "divergence; selected in bold)", "", "| task | divergence | " + " | ".join(f"lr {lr:g}" for lr in LR_GRID) + " |",
             "|---|---|" + "---|" * len(LR_GRID)]
    for task in TASKS:
        for div in DIVERGENCES:
            rows = [store.get(kind="lr", task=task, divergence=div, seed=LR_SEED, lr=lr) for lr in LR_GRID]
            if any(r is None for r in rows):
                continue
            best = best_lr(store, task, div)
            cells = []
            for lr, row in zip(LR_GRID, rows):
                v = row["objective"]
                cells.append(f"**{v:.4g}**" if lr == best else f"{v:.4g}")
            lines.append(f"| {task} | {div} | " + " | ".join(cells) + " |")
    return lines + [""]


def _qrs_section(store: CellStore) -> list[str]:
    rows = sorted(store.rows(kind="qrs"), key=lambda r: r["task"])
    if not rows:
        return []
    lines = ["## Exact samples of the target: quasi-rejection sampling", "",
             "Proposal: the base a (the library's sampler, log q as recorded); β = max P/a over the enumeration "
             "(clip 0: the accepted samples follow p exactly), lowered by whole nats only where the exact acceptance "
             "rate would need more than 10⁶ proposals. Chi-square of the accepted samples' histogram against the exact "
             "p_β (cells merged to ≥ 5 expected counts); the same counts against p and against a show what the test "
             "can tell apart.", "",
             "| task (context) | clip (nats) | proposals | accepted | acceptance: exact / empirical (z) | TV(p, p_β) exact / "
             "bound exact / bound estimated | χ² p-value vs p_β | vs p | vs a | alignment of p: exact / QRS | entropy of p |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['task']} ({r['context'] or '∅'}) | {r.get('clip_nats', 0)} | {r['proposals']:,} | {r['accepted']:,} | "
                     f"{r['acceptance_exact']:.4f} / {r['acceptance_empirical']:.4f} ({r['acceptance_z']:+.1f}) | "
                     f"{r.get('tv_exact', 0.0):.4f} / {r['tv_bound_exact']:.4f} / {r['tv_bound_estimate']:.4f} | "
                     f"{r['chi2_pvalue']:.3f} | {r.get('chi2_pvalue_vs_p', r['chi2_pvalue']):.2g} | "
                     f"{r['chi2_pvalue_vs_base']:.1e} | {r['target']['alignment']:.3f} / {r['qrs_alignment']:.3f} | "
                     f"{r['target']['entropy']:.3f} |")
    return lines + [""]


def _sd(xs):
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    if len(xs) < 2:
        return math.nan
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _vs_others(runs, task, div, budget, metric):
    mine = {r["seed"]: _at(r, budget, metric) for r in runs.get((task, div), [])}
    diffs = []
    for seed, v in mine.items():
        others = [_at(r, budget, metric) for d in DIVERGENCES if d != div for r in runs.get((task, d), []) if r["seed"] == seed]
        if others:
            diffs.append(v - sum(others) / len(others))
    return _mean_se(diffs) + (len(diffs),)


def _plots(runs, folder: Path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    for task in TASKS:
        if not any(k[0] == task for k in runs):
            continue
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        for div in DIVERGENCES:
            rs = runs.get((task, div), [])
            if not rs:
                continue
            xs = [c["samples"] for c in rs[0]["curve"]]
            stats = [_mean_se([r["curve"][i]["kl_p_pi"] for r in rs if i < len(r["curve"])]) for i in range(len(xs))]
            m = [s[0] for s in stats]
            se = [0.0 if math.isnan(s[1]) else s[1] for s in stats]
            ax1.plot(xs, m, label=div)
            ax1.fill_between(xs, [a - b for a, b in zip(m, se)], [a + b for a, b in zip(m, se)], alpha=0.2)
            al = [_mean_se([_at(r, b, "alignment") for r in rs])[0] for b in BUDGETS]
            kl = [_mean_se([_at(r, b, "kl_pi_a") for r in rs])[0] for b in BUDGETS]
            ax2.plot(kl, al, marker="o", label=div)
        ax1.set(xlabel="samples seen", ylabel="KL(p‖π) (exact)", title=f"{task}: KL(p‖π), mean ± s.e.")
        ax2.set(xlabel="KL(π‖a) (exact)", ylabel="alignment (exact)",
                title=f"{task}: alignment vs KL(π‖a) at {', '.join(map(str, BUDGETS))}")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(folder / f"{task}.png", dpi=90, metadata={"Software": None})
        plt.close(fig)


def _cpu() -> str:
    from fdiv_align.lm.precision import cpu_name

    return cpu_name()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--divergences", default=",".join(DIVERGENCES))
    ap.add_argument("--results", default="benchmarks/results/paper_exact.jsonl")
    ap.add_argument("--out", default="docs/results/paper_exact.md")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    store = CellStore(args.results, CELL_KEY)
    tasks, divs = args.tasks.split(","), args.divergences.split(",")
    t0 = time.perf_counter()
    check_base(store, base_model(cache=BASE_CACHE))  # trained once, before the workers need it
    if not args.report_only:
        _run_all(store, [("lr", t, d, LR_SEED, lr) for t in tasks for d in divs for lr in LR_GRID], args.workers)
        main_cells = []
        for t in tasks:
            for d in divs:
                lr = best_lr(store, t, d)
                if lr is None:
                    print(f"{t}/{d}: no finite learning-rate run; skipped", file=sys.stderr)
                    continue
                main_cells += [("run", t, d, s, lr) for s in range(args.seeds)]
        _run_all(store, main_cells, args.workers)
        for t in tasks:
            if store.get(kind="qrs", task=t) is None:
                store.add({"kind": "qrs", **qrs_check(t, cache=BASE_CACHE)})
    write_report(store, Path(args.out), args, time.perf_counter() - t0)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
