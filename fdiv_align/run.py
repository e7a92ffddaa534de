"""Running a :class:`fdiv_align.trainer.Trainer` to the end: resume, base evaluation, the loop of
steps with evaluations and checkpoints, stop signals, the summary (the contracts are in
docs/design.md, "Run safety"). ``Trainer.train()`` calls :func:`run`.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import time

import torch

from .checkpoint import load_latest
from .config import to_dict
from .interrupts import RunInterrupted, stop_requests
from .metrics import say

__all__ = ["run", "progress_postfix"]


def log(t, record: dict) -> None:
    if t.logger is not None:
        t.logger.log(t.step, record)


def eval_and_log(t) -> dict:
    record, samples = t.evaluate()
    log(t, record)
    if t.logger is not None and t.cfg.logger.log_samples:
        k = t.cfg.logger.log_samples
        t.logger.log_samples(t.step, samples["texts"][:k], samples["contexts"][:k], samples["alignment"][:k])
    return record


def resume(t) -> bool:
    """Load the newest intact checkpoint (True), or find none (False). Checkpoints that all fail
    verification stop the run (CorruptCheckpointsError): starting over would silently discard them."""
    resumed = load_latest(t.output_dir / "checkpoints")
    if resumed is None:
        return False
    step, state, path = resumed
    t.load_state_dict(state)
    if t.logger is not None:
        t.logger.truncate_after(t.step)
    say(f"resumed from {path} (step {t.step} of {t.cfg.trainer.steps})")
    return True


def set_aside_previous_run(t) -> None:
    """A fresh start in a directory that holds an earlier run's files (trainer.resume=false): move
    them to ``superseded-<time>/`` so that nothing is deleted and no record is mixed with this run's."""
    if t.rank != 0:
        return
    old = [t.output_dir / n for n in ("checkpoints", "metrics.jsonl", "samples.jsonl", "summary.json")]
    old = [p for p in old if p.exists()]
    if not old:
        return
    aside = t.output_dir / f"superseded-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S-%f')}"
    aside.mkdir()
    for p in old:
        os.replace(p, aside / p.name)
    say(f"starting over (trainer.resume=false): the earlier run's {', '.join(p.name for p in old)} moved to {aside}")


def progress_postfix(record: dict) -> dict:
    """Progress-bar fields: IS estimates shown as value±standard error (they are noisy, and may be
    negative where the true divergence is ≥ 0)."""
    out = {"align": f"{record['alignment']:.3f}"}
    for key in ("kl_p_pi", "kl_pi_a"):
        if key in record:
            out[key] = f"{record[key]:.2f}±{record.get(key + '_se', float('nan')):.2f}"
    out["samp/s"] = f"{record['samples_per_second']:.1f}"
    return out


def run(t) -> dict:
    """Run trainer ``t`` to ``trainer.steps`` (resuming from the newest checkpoint) and return the summary.

    SIGINT/SIGTERM (:mod:`fdiv_align.interrupts`): during sampling, scoring or an evaluation the
    work in flight is abandoned at once; during an update the step is finished first. Then the
    state of the last completed step is checkpointed and ``{"status": "interrupted", ...}`` is
    returned; rerunning in the same output directory continues exactly. A second signal exits at once.
    """
    with stop_requests() as stops:
        return _run(t, stops)


def _run(t, stops) -> dict:
    tc = t.cfg.trainer
    t_start = time.perf_counter()
    done = t.output_dir / "summary.json"
    if tc.resume and done.exists():
        previous = json.loads(done.read_text())
        if previous.get("status") == "finished" and previous.get("steps") == tc.steps:
            return previous  # a finished run (e.g. a resumed sweep): nothing to redo
    fits = None
    if not (tc.resume and resume(t)):
        set_aside_previous_run(t)
        if t.plan.compile:
            say("compiling the fused log-prob kernels with torch.compile (first run only; then cached)")
        try:
            with t.abortable(stops, "the base evaluation"):
                fits = t.evaluator.fit_constraints(t.cfg.task.constraint_fit_samples, tc.seed, t.max_new_tokens)
                if fits:
                    log(t, {"kind": "constraint_fit", **{f"{k}/{m}": v for k, d in fits.items() for m, v in d.items()}})
                if tc.eval_at_start:
                    t.base_eval = eval_and_log(t)
        except RunInterrupted as exc:
            say(f"interrupted during {exc.phase}: no step was taken, nothing to save")
            if t.logger is not None:
                t.logger.close()
            return {"status": "interrupted", "step": 0, "signal": exc.signum, "saved": False}
    bar = None
    if t.cfg.logger.progress and t.rank == 0:
        from tqdm.auto import tqdm

        bar = tqdm(total=tc.steps, initial=t.step, desc=f"f-DPG {t.divergence.name}", dynamic_ncols=True)
    last_eval = t.base_eval
    try:
        if t.pending_eval:  # an evaluation interrupted before the last checkpoint: redo it first
            last_eval = abortable_eval(t, stops)
        while t.step < tc.steps and not stops.requested:
            rng = (t.generator.get_state(), torch.get_rng_state())
            try:
                record = t.train_step(stops)
            except RunInterrupted:  # sampling/scoring abandoned: the step never happened
                t.generator.set_state(rng[0])
                torch.set_rng_state(rng[1])
                break
            log(t, record)
            if tc.eval_every and t.step % tc.eval_every == 0 and t.step < tc.steps:
                t.pending_eval = True
                last_eval = abortable_eval(t, stops)
            for cb in t.callbacks:
                cb(t, t.step, record)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(progress_postfix(record))
            if tc.checkpoint_every and t.step % tc.checkpoint_every == 0 and not stops.requested:
                t.save()
    finally:
        if bar is not None:
            bar.close()
    if stops.requested:
        path = t.save()
        say(f"stopped at step {t.step}; checkpoint {path}")
        if t.logger is not None:
            t.logger.close()
        return {"status": "interrupted", "step": t.step, "signal": int(stops.signum), "saved": True}
    final = eval_and_log(t) if tc.steps > 0 else last_eval
    if tc.checkpoint_every:
        t.save()
    log_z, known = t.loss_fn.log_z.log_z(torch.arange(t.loss_fn.log_z.num_contexts))
    warn = []
    if tc.steps > 0 and not known.any():
        warn.append(f"no sample in {t.samples_seen} had P > 0 (every target score was 0): Z is unknown and the "
                    f"policy was never updated; the target may be unreachable from the base model")
    for w in warn:
        say(f"warning: {w}")
    summary = {"status": "finished", "steps": t.step, "samples_seen": t.samples_seen,
               "divergence": t.divergence.name, "task": t.task.name, "model": t.cfg.model.name,
               "lora": t.policy.use_lora, "seed": tc.seed, "base": t.base_eval, "final": final,
               "constraint_fit": fits, "compute": t.plan.as_dict(), "warnings": warn,
               "config": to_dict(t.cfg), "wall_seconds_this_run": time.perf_counter() - t_start}
    if t.rank == 0:
        (t.output_dir / "summary.json").write_text(json.dumps(_json_safe(summary), indent=2, default=float))
    if t.logger is not None:
        t.logger.close()
    return summary


def abortable_eval(t, stops):
    """The evaluation at this step; if a stop signal abandons it, it stays pending in the checkpoint
    and is redone first on resume."""
    try:
        with t.abortable(stops, f"the evaluation at step {t.step}"):
            record = eval_and_log(t)
    except RunInterrupted:
        return None
    t.pending_eval = False
    return record


def _json_safe(obj):
    """NaN/±inf → None (JSON has no NaN), recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj
