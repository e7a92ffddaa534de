"""The f-DPG training run: the :class:`~fdiv_align.training.trainer.Trainer` (its loop and one step),
the evaluation, the off-policy proposal, checkpoints, the run directory, data parallelism, stop
signals and metrics sinks."""
