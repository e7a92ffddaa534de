"""Training on preference pairs: the reward model (``fdiv-align-rm``) and offline f-DPO (``fdiv-align-po``).

Both minimise the mean over pairs of −log σ(m_i) (:func:`fdiv_align.objectives.preference_loss.pairwise_nll`) for a
preference logit m_i that the objective supplies:

* :class:`RewardModelObjective`: m = r(y_w) − r(y_l) − margin (Bradley–Terry; the margin only where the
  data has one and ``use_margin``), r the reward model of fdiv_align/targets/reward_model.py;
* :class:`FDPOObjective`: m = β [f′(π/π_ref)(y_w) − f′(π/π_ref)(y_l)] (f-DPO, fdiv_align/objectives/preference_loss.py),
  π = the model with LoRA adapters, π_ref = the same model with adapters disabled (TRL's PEFT convention).

The pairs of ``training.data`` are split by a seeded permutation into a training and a held-out part
(``training.eval_fraction``). Each epoch visits the training pairs in a permutation drawn from
(seed, epoch), ``batch_size`` pairs per step, AdamW, gradient clipping. Held-out pairwise accuracy — the
fraction of pairs whose score difference s_i (r_w − r_l, or r̂_w − r̂_l, without the data margin) is > 0,
ties counted ½ — with its binomial standard error √(acc(1−acc)/n), at the start (unless
``eval_at_start`` is false; summary.json's ``initial`` is then null) and after every epoch, ``eval_batch_size``
pairs per forward.
Checkpoints (fdiv_align/training/checkpoint.py: atomic, verified) every ``checkpoint_every`` steps and at the end;
a rerun resumes from the newest one, and re-draws exactly the same batches; its config is checked against the
checkpoint's as the trainer's is (fdiv_align/training/config_changes.py). metrics.jsonl holds one record per step
and per evaluation; summary.json (written atomically, last) the outcome. Stop signals as in the trainer: during
model loading the run ends at once, with nothing written; later the step in flight is finished and checkpointed.
Every pair must fit the model's context window (prompt, response and the end-of-sequence token), checked before
training, naming the pair.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

import torch

from ..lm.batch import encode_contexts, make_batch
from ..lm.sampling import model_window
from ..training.config_changes import check_config_changes
from ..training.interrupts import RunInterrupted, stop_requests
from ..training.metrics import MetricsLogger, say
from ..training.run_dir import RunDir
from ..objectives.preference_loss import bradley_terry_loss, check_f_dpo_divergence, f_dpo_margin, pairwise_nll
from .data import PreferencePair

__all__ = ["RewardModelObjective", "FDPOObjective", "split_pairs", "pairwise_accuracy", "train_on_pairs",
           "run_reward_model", "run_preference_opt", "check_pair_lengths"]


#: the held-out split is drawn from seed ``training.seed + SPLIT_SEED_OFFSET``
SPLIT_SEED_OFFSET = 4242


class RewardModelObjective:
    """Bradley–Terry on a :class:`fdiv_align.targets.reward_model.RewardModel`."""

    def __init__(self, rm, use_margin: bool = True):
        self.rm, self.use_margin = rm, use_margin
        self.parameters = [p for p in rm.parameters() if p.requires_grad]

    def __call__(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, [B] score differences r_w − r_l) of a batch, chosen and rejected in one forward."""
        B = len(pairs)
        prompts = [p.prompt for p in pairs]
        r = self.rm(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs]).double().cpu()
        margin = None
        if self.use_margin and any(p.margin is not None for p in pairs):
            margin = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float64)
        return bradley_terry_loss(r[:B], r[B:], margin), (r[:B] - r[B:]).detach()

    def train(self, mode: bool = True) -> None:
        self.rm.train(mode)

    def state(self) -> dict:
        return self.rm.trained_state()

    def load_state(self, state: dict) -> None:
        params = dict(self.rm.model.named_parameters())
        with torch.no_grad():
            for name, value in state["body"].items():
                params[name].copy_(value)
        self.rm.head.load_state_dict(state["head"])


class FDPOObjective:
    """f-DPO of a :class:`fdiv_align.lm.policy.Policy` (LoRA: the reference is the base with adapters off)."""

    def __init__(self, policy, divergence, beta: float):
        if not policy.use_lora:
            raise ValueError("offline f-DPO here needs a LoRA policy (the reference is the base with adapters "
                             "disabled): set model.lora=true")
        self.policy, self.divergence, self.beta = policy, check_f_dpo_divergence(divergence), beta
        self.parameters = list(policy.trainable.values())

    def __call__(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, [B] implicit-reward margins r̂_w − r̂_l) of a batch, chosen and rejected in one forward each."""
        B = len(pairs)
        prompts = [p.prompt for p in pairs]
        batch = make_batch(self.policy.tokenizer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
        log_pi = self.policy.policy_logprobs(batch).double().cpu()
        log_ref = self.policy.reference_logprobs(batch)
        margin = f_dpo_margin(log_pi[:B], log_pi[B:], log_ref[:B], log_ref[B:], self.divergence, self.beta)
        return pairwise_nll(margin), margin.detach()

    def train(self, mode: bool = True) -> None:
        self.policy.model.train(mode)

    def state(self) -> dict:
        return {n: p.detach().cpu().clone() for n, p in self.policy.trainable.items()}

    def load_state(self, state: dict) -> None:
        with torch.no_grad():
            for name, value in state.items():
                self.policy.trainable[name].copy_(value)


def split_pairs(pairs: list[PreferencePair], eval_fraction: float, seed: int) -> tuple[list, list]:
    """(training pairs, held-out pairs): a permutation from ``seed + SPLIT_SEED_OFFSET``, the first
    ⌈eval_fraction·n⌉ held out; each part must keep at least one pair."""
    n = len(pairs)
    k = math.ceil(eval_fraction * n)
    if k < 1 or n - k < 1:
        raise ValueError(f"{n} preference pairs cannot be split with eval_fraction {eval_fraction}: both the training "
                         f"and the held-out part need at least one pair")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + SPLIT_SEED_OFFSET)).tolist()
    return [pairs[i] for i in order[k:]], [pairs[i] for i in order[:k]]


def pairwise_accuracy(diffs: torch.Tensor) -> tuple[float, float]:
    """(accuracy, binomial s.e.) of score differences: 1 where > 0, ½ on ties, 0 below."""
    wins = (diffs > 0).double() + 0.5 * (diffs == 0).double()
    acc = float(wins.mean())
    return acc, math.sqrt(max(acc * (1 - acc), 0.0) / len(diffs))


@torch.no_grad()
def _evaluate(objective, pairs: list[PreferencePair], batch_size: int) -> dict:
    objective.train(False)
    losses, diffs = [], []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        loss, d = objective(chunk)
        losses.append(float(loss) * len(chunk))
        diffs.append(d)
    acc, se = pairwise_accuracy(torch.cat(diffs))
    return {"kind": "eval", "heldout_accuracy": acc, "heldout_accuracy_se": se, "heldout_loss": sum(losses) / len(pairs),
            "heldout_pairs": len(pairs)}


def train_on_pairs(objective, pairs: list[PreferencePair], training, run_dir: str | os.PathLike,
                   config: dict | None = None, on_finish=None, artifacts: tuple[str, ...] = (), on_start=None) -> dict:
    """Train ``objective`` on ``pairs`` as ``training`` (:class:`fdiv_align.config.PairTrainingConfig`)
    says, in ``run_dir`` (see the module docstring); ``on_finish(run_dir, summary)`` writes the artifact
    (e.g. the reward model; ``artifacts`` its names, set aside with the records on a fresh start) before
    summary.json; ``on_start()`` is called once the directory holds this run (as the trainer's). Returns the summary.

    Stop signals as in the f-DPG trainer (fdiv_align/training/interrupts.py): the step in flight is
    finished, checkpointed, and ``{"status": "interrupted", ...}`` returned; a rerun continues exactly."""
    with stop_requests() as stops:
        directory = RunDir(run_dir, artifacts=artifacts)
        try:
            return _train_on_pairs(objective, pairs, training, directory, config or {}, on_finish, on_start, stops)
        finally:
            directory.close()


def _train_on_pairs(objective, pairs, training, run_dir: RunDir, config: dict, on_finish, on_start, stops) -> dict:
    t0 = time.perf_counter()
    train, heldout = split_pairs(pairs, training.eval_fraction, training.seed)
    total = training.epochs * math.ceil(len(train) / training.batch_size)
    optimizer = torch.optim.AdamW(objective.parameters, lr=training.lr, weight_decay=training.weight_decay)
    logger = MetricsLogger(run_dir.path, True, None, config)
    found = _resume(objective, optimizer, training, run_dir, config, logger)
    step, initial = (found[0], found[1]["initial"]) if found is not None else (0, None)
    if on_start is not None:
        on_start()
    if found is None and training.eval_at_start:
        initial = _evaluate(objective, heldout, training.eval_batch_size)
        logger.log(0, initial)

    def save():
        return run_dir.save_checkpoint(step, {"model": objective.state(), "optimizer": optimizer.state_dict(),
                                              "initial": initial, "config": config}, keep=training.keep_checkpoints)

    bar = None
    if training.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=step, desc="pairs", dynamic_ncols=True)
    last = None
    while step < total and not stops.requested:
        record = _pair_step(objective, optimizer, train, training, step)
        step += 1
        logger.log(step, record)
        if step % math.ceil(len(train) / training.batch_size) == 0 or step == total:
            last = _evaluate(objective, heldout, training.eval_batch_size)
            logger.log(step, last)
        if training.checkpoint_every and step % training.checkpoint_every == 0 and step < total:
            save()
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}")
    if bar is not None:
        bar.close()
    if stops.requested and step < total:
        say(f"stopped at step {step}; checkpoint {save()}")
        logger.close()
        return {"status": "interrupted", "step": step, "signal": int(stops.signum), "saved": True}
    if found is None or found[0] < total:
        save()
    summary = {"status": "finished", "steps": step, "epochs": training.epochs, "train_pairs": len(train),
               "heldout_pairs": len(heldout), "initial": initial, "final": last,
               "wall_seconds_this_run": time.perf_counter() - t0, "config": config}
    if last is None:  # resumed after the last step: its evaluation is the last one logged
        summary["final"] = [json.loads(line) for line in (run_dir.path / "metrics.jsonl").read_text().splitlines()
                            if '"eval"' in line][-1]
    if on_finish is not None:
        on_finish(run_dir.path, summary)
    run_dir.write_summary(summary)
    logger.close()
    return summary


def _resume(objective, optimizer, training, run_dir: RunDir, config: dict, logger) -> tuple | None:
    """The newest checkpoint (step, state, path) loaded into ``objective`` and ``optimizer`` after its config is
    checked against ``config``; None — a fresh start, an earlier run's files set aside — when there is none or
    ``training.resume`` is false."""
    found = run_dir.latest_checkpoint() if training.resume else None
    if found is None:
        run_dir.set_aside("no checkpoint to resume from" if training.resume else "training.resume=false")
        return None
    step, state, path = found
    for change in check_config_changes(state.get("config"), config, f"the checkpoint {path}", "training.resume=false"):
        say(f"resuming with a changed setting: {change}")
    objective.load_state(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    logger.truncate_after(step)
    return found


def _pair_step(objective, optimizer, train: list[PreferencePair], training, step: int) -> dict:
    """Step ``step + 1``: the batch at position ``step`` of its epoch's permutation (drawn from (seed, epoch)),
    loss, backward, clipping and the optimiser step; returns the step's record."""
    per_epoch = math.ceil(len(train) / training.batch_size)
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(training.seed * 100_003 + epoch)).tolist()
    chunk = [train[i] for i in order[pos * training.batch_size:(pos + 1) * training.batch_size]]
    started = time.perf_counter()
    objective.train(True)
    loss, diffs = objective(chunk)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"step {step + 1}: the pairwise loss is {float(loss)} (parameters not updated)")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(objective.parameters, training.max_grad_norm or math.inf)
    if not torch.isfinite(grad_norm):
        raise FloatingPointError(f"step {step + 1}: the gradient norm is {float(grad_norm)} (parameters not updated)")
    optimizer.step()
    return {"kind": "train", "loss": float(loss.detach()), "accuracy": pairwise_accuracy(diffs)[0],
            "grad_norm": float(grad_norm), "epoch": epoch, "seconds": time.perf_counter() - started}


def _load_for_pairs(cfg, stops):
    """Checks, preference data, threads and the model of a pair-training config (before anything is written);
    a stop signal during model loading ends it (:class:`RunInterrupted`)."""
    from ..config import validate_pairs
    from ..lm.models import load_configured, resolve_device
    from .data import load_preferences

    validate_pairs(cfg)
    pairs = load_preferences(cfg.training.data)
    if cfg.training.threads:
        torch.set_num_threads(cfg.training.threads)
    device = resolve_device(cfg.model.device)
    torch.manual_seed(cfg.training.seed)
    with stops.abortable("model loading"):
        lm = load_configured(cfg.model, device)
    check_pair_lengths(pairs, lm.tokenizer, model_window(lm.model), cfg.training.data)
    torch.manual_seed(cfg.training.seed)  # the head / LoRA initialisation depends on the seed alone
    return pairs, lm, device


def check_pair_lengths(pairs: list[PreferencePair], tokenizer, window: int | None, source: str = "the data") -> None:
    """Every pair's prompt + response + end-of-sequence token within the model's ``window`` of positions (None:
    no limit); otherwise a ValueError naming the first pair too long (its number in ``source``, 1-based, and
    its length)."""
    if window is None:
        return
    for number, pair in enumerate(pairs, 1):
        prompt = len(encode_contexts(tokenizer, [pair.prompt])[0])
        response = max(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in (pair.chosen, pair.rejected))
        if prompt + response + 1 > window:
            raise ValueError(f"pair {number} of {source} (prompt {pair.prompt[:60]!r}) is {prompt + response + 1} tokens "
                             f"long (prompt {prompt} + longest response {response} + end of sequence), more than the "
                             f"model's {window} positions: shorten or drop it")


def _interruptible(run):
    """``run(cfg, run_dir, stops, on_start)`` under the run's stop handling: a signal during model loading
    returns ``{"status": "interrupted", "step": 0, "saved": False, ...}`` at once."""

    def runner(cfg, run_dir: str | os.PathLike, on_start=None) -> dict:
        with stop_requests() as stops:
            try:
                return run(cfg, run_dir, stops, on_start)
            except RunInterrupted as exc:
                say(f"interrupted during {exc.phase}: no step was taken, nothing to save")
                return {"status": "interrupted", "step": 0, "signal": exc.signum, "saved": False}

    runner.__doc__, runner.__name__, runner.__qualname__ = run.__doc__, run.__name__, run.__qualname__
    return runner


@_interruptible
def run_reward_model(cfg, run_dir: str | os.PathLike, stops, on_start) -> dict:
    """``fdiv-align-rm``: train a reward model (:class:`fdiv_align.config.RewardModelConfig`) and save it as
    ``<run_dir>/reward_model.pt`` (fdiv_align/targets/reward_model.py), written only once training has finished."""
    from ..config import to_dict
    from ..lm.policy import maybe_lora
    from ..targets.reward_model import REWARD_MODEL_FILE, RewardModel, save_reward_model

    pairs, lm, _ = _load_for_pairs(cfg, stops)
    model, use_lora = maybe_lora(lm.model, cfg.model)
    rm = RewardModel(model, lm.tokenizer)
    model_cfg = {**to_dict(cfg)["model"], "lora": use_lora}

    def finish(run_dir: Path, summary: dict) -> None:
        summary["reward_model"] = str(save_reward_model(rm, run_dir, model_cfg, summary["final"]))

    return train_on_pairs(RewardModelObjective(rm, cfg.use_margin), pairs, cfg.training, run_dir, to_dict(cfg), finish,
                          artifacts=(REWARD_MODEL_FILE,), on_start=on_start)


@_interruptible
def run_preference_opt(cfg, run_dir: str | os.PathLike, stops, on_start) -> dict:
    """``fdiv-align-po``: offline f-DPO (:class:`fdiv_align.config.PreferenceOptConfig`); the trained LoRA
    adapter is saved in ``<run_dir>/final_model`` (fdiv_align/lm/export.py: PEFT's format with the tokenizer and
    a generation config, renamed into place once complete)."""
    from ..config import to_dict
    from ..lm.export import FINAL_MODEL_DIR, save_final_model
    from ..objectives.divergences import get_divergence
    from ..lm.policy import prepare_policy
    from ..lm.precision import compute_plan
    from ..lm.sampling import SamplingConfig

    divergence = check_f_dpo_divergence(get_divergence(cfg.divergence.name, **cfg.divergence.params))
    pairs, lm, device = _load_for_pairs(cfg, stops)
    policy = prepare_policy(cfg.model, lm, device, compute_plan("fp32", None, device), SamplingConfig())

    def finish(run_dir: Path, summary: dict) -> None:
        summary["final_model"] = str(save_final_model(policy, run_dir / FINAL_MODEL_DIR))

    return train_on_pairs(FDPOObjective(policy, divergence, cfg.beta), pairs, cfg.training, run_dir, to_dict(cfg), finish,
                          artifacts=(FINAL_MODEL_DIR,), on_start=on_start)
