"""Diversity and logging helpers: distinct-n, Self-BLEU, JSONL / wandb / progress-bar sinks."""

from __future__ import annotations

import json
import math
import os
import sys
from collections import Counter
from pathlib import Path

from ..extras import require
from ..files import atomic_write_text, read_jsonl

__all__ = ["distinct_n", "self_bleu", "MetricsLogger", "say"]


def say(message: str) -> None:
    """One status line on stderr, ``[fdiv-align] …`` (rank 0 of a data-parallel run only)."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"[fdiv-align] {message}", file=sys.stderr, flush=True)


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique word n-grams / total word n-grams over all texts (0 if there are none)."""
    grams = [tuple(w[i:i + n]) for w in (t.split() for t in texts) for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def _bleu(hyp: list[str], refs: list[list[str]], n_max: int) -> float:
    if not hyp:
        return 0.0
    log_p = 0.0
    for n in range(1, n_max + 1):
        h = Counter(tuple(hyp[i:i + n]) for i in range(len(hyp) - n + 1))
        if not h:
            return 0.0
        best = Counter()
        for r in refs:
            for g, c in Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1)).items():
                best[g] = max(best[g], c)
        clipped = sum(min(c, best[g]) for g, c in h.items())
        log_p += math.log((clipped + 1) / (sum(h.values()) + 1)) / n_max  # add-one smoothing
    ref_len = min((len(r) for r in refs), key=lambda L: (abs(L - len(hyp)), L)) if refs else 0
    bp = 1.0 if len(hyp) > ref_len else math.exp(1 - ref_len / max(len(hyp), 1))
    return bp * math.exp(log_p)


def self_bleu(texts: list[str], n: int = 3) -> float:
    """Self-BLEU-n: mean BLEU of each text against all the others (add-one smoothed; higher = less diverse)."""
    toks = [t.split() for t in texts]
    if len(toks) < 2:
        return 0.0
    return sum(_bleu(toks[i], toks[:i] + toks[i + 1:], n) for i in range(len(toks))) / len(toks)


class MetricsLogger:
    """Writes one JSON line per record to ``metrics.jsonl`` and forwards to wandb once per step."""

    def __init__(self, run_dir: Path, jsonl: bool = True, wandb_cfg=None, config: dict | None = None):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.samples_path = self.run_dir / "samples.jsonl"
        self.jsonl = jsonl
        self.wandb = None
        if wandb_cfg is not None and wandb_cfg.wandb:
            require("wandb", "logger.wandb=true")
            import wandb

            self.wandb = wandb.init(project=wandb_cfg.wandb_project, mode=wandb_cfg.wandb_mode, dir=str(self.run_dir),
                                    config=config, reinit=True)

    def truncate_after(self, step: int) -> None:
        """On resume: drop records of steps after the checkpoint (they will be redone). A torn last line — what
        a crash or a full disk leaves in an append-only log — is dropped with a message; any other line that
        is not JSON is an error naming the file and the line. A metrics.jsonl missing after steps were taken is
        said (its records are lost; the run goes on and logs from here)."""
        if self.jsonl and step > 0 and not self.path.exists():
            say(f"warning: {self.path} is missing: the records of steps 1..{step} are lost (the checkpoint holds the "
                f"state, not the log); records continue from step {step + 1}")
        for path in (self.path, self.samples_path):
            if path.exists():
                records, torn = read_jsonl(path)
                if torn:
                    say(f"{path}:{torn}: dropping a torn last line (an interrupted write)")
                keep = [line for line, record in records if record.get("step", 0) <= step]
                atomic_write_text(path, "".join(line + "\n" for line in keep))

    def log(self, step: int, record: dict) -> None:
        if self.jsonl:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, **record}) + "\n")
        if self.wandb is not None:
            self.wandb.log({f"{record.get('kind', 'train')}/{k}": v for k, v in record.items()
                            if isinstance(v, (int, float)) and k != "step"}, step=step)

    def log_samples(self, step: int, texts: list[str], contexts: list[str], scores: list[float]) -> None:
        rows = [{"step": step, "context": c, "text": t, "alignment": s} for t, c, s in zip(texts, contexts, scores)]
        if self.jsonl:
            with open(self.samples_path, "a") as f:
                for r in rows:
                    f.write(json.dumps(r) + "\n")
        if self.wandb is not None:
            import wandb

            table = wandb.Table(columns=["step", "context", "text", "alignment"], data=[list(r.values()) for r in rows])
            self.wandb.log({"samples": table}, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
