"""Runs the ``fdiv-align`` CLI with one phase slowed down, so that signal tests can hit that phase.

``FDIV_TEST_DELAY=<phase>:<seconds>``, phase ∈ load (model loading), sample (every sampling call of
a training step after step 2 — the sampling of step 3 —, not the evaluations), update (every policy_loss call after step 1).
``READY <phase>`` is
printed on stderr when the delay starts. Everything else is the real CLI."""

import os
import sys
import time

from fdiv_align.training import trainer as T
from fdiv_align.cli import main

phase, _, seconds = os.environ.get("FDIV_TEST_DELAY", ":0").partition(":")
seconds = float(seconds or 0)


def delayed(name, fn, after_step=1):
    def wrapper(self, *args, **kwargs):
        if self.step >= after_step and kwargs.get("proposal", True):  # training steps, not evaluations
            print(f"READY {name} step {self.step}", file=sys.stderr, flush=True)
            time.sleep(seconds)
        return fn(self, *args, **kwargs)
    return wrapper


if phase == "load":
    _load = T.Trainer._load_model

    def slow_load(self):
        print("READY load", file=sys.stderr, flush=True)
        time.sleep(seconds)
        return _load(self)

    T.Trainer._load_model = slow_load
elif phase == "sample":
    T.Trainer._sample = delayed("sample", T.Trainer._sample, after_step=2)
elif phase == "update":
    T.Trainer.policy_loss = delayed("update", T.Trainer.policy_loss)

if __name__ == "__main__":
    main()
