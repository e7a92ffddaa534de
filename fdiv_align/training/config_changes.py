"""What may change when a run continues in its directory, and what may not.

A run directory holds one run: its checkpoints, records and summary were made under one config. Rerunning
there (resume, or a finished run asked again) compares the config the run recorded with the new one, key
by key (dotted: ``trainer.lr``):

* **applied** (:data:`APPLIED`): keys that say how to run, not what is computed — how far (``trainer.steps``:
  a finished run is extended), how often to evaluate or checkpoint, micro-batching, threads, the compute
  plan's switches, the engine, the device, logging. The new value is used and recorded, and a line names
  each change (``logger.*`` and ``output_dir`` silently).
* **refused**: everything else — the model, the divergence, the task and every key of the estimator, the
  optimiser, the sampling and the evaluation. Continuing would mix two runs under one name (the optimiser
  restored with the old learning rate while the records say the new one; evaluations of two sample
  sizes in one curve). :class:`ConfigChangedError` names each key with both values and the ways out.
"""

from __future__ import annotations

__all__ = ["APPLIED", "SILENT", "ConfigChangedError", "config_changes", "check_config_changes"]

#: keys whose new value a continued run uses (said in a line)
APPLIED = frozenset({
    "trainer.steps", "trainer.eval_every", "trainer.checkpoint_every", "trainer.keep_checkpoints",
    "trainer.micro_batch_size", "trainer.eval_micro_batch_size", "trainer.threads", "trainer.compile",
    "trainer.fused_logprobs", "trainer.fp32_head", "trainer.parallel", "trainer.decode", "trainer.deterministic", "trainer.resume",
    "model.device", "model.attn_implementation", "model.gradient_checkpointing",
    # pair training (fdiv_align/preferences): the same roles
    "training.epochs", "training.checkpoint_every", "training.keep_checkpoints", "training.eval_batch_size", "training.threads",
    "training.resume", "training.progress",
})
#: prefixes of keys a continued run uses without a word
SILENT = ("logger.", "output_dir")


class ConfigChangedError(ValueError):
    """The run directory holds a run of another config (keys that may not change, see the module docstring)."""


def _flat(config: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def config_changes(recorded: dict, now: dict) -> tuple[list[str], list[str]]:
    """(applied, refused): ``key: old -> new`` for each key whose value differs between the ``recorded`` and
    the ``now`` config (nested dicts, as :func:`fdiv_align.config.to_dict` gives); silent keys are left out."""
    old, new = _flat(recorded), _flat(now)
    applied, refused = [], []
    for key in sorted(old.keys() | new.keys()):
        missing = "(absent)"
        if old.get(key, missing) == new.get(key, missing) or key.startswith(SILENT):
            continue
        line = f"{key}: {old.get(key, missing)!r} -> {new.get(key, missing)!r}"
        (applied if key in APPLIED else refused).append(line)
    return applied, refused


def check_config_changes(recorded: dict | None, now: dict, what: str, fresh_start: str) -> list[str]:
    """The applied changes (lines to say) between the config that ``what`` (e.g. "the checkpoint
    checkpoints/checkpoint-00000004") recorded and ``now``; :class:`ConfigChangedError` if a key that may not
    change did, or if nothing was recorded. ``fresh_start`` is the setting that starts over instead."""
    if recorded is None:
        raise ConfigChangedError(f"{what} records no config, so this run cannot be checked against it: use another "
                                 f"output_dir, or {fresh_start} to start over (the old files are moved to superseded-*)")
    applied, refused = config_changes(recorded, now)
    if refused:
        raise ConfigChangedError(
            f"{what} was made with another config; these keys may not change within a run: {'; '.join(refused)}. "
            f"Set them back to continue it, use another output_dir for a new run, or {fresh_start} to start over "
            f"here (the old files are moved to superseded-*)")
    return applied
