"""Worker for the data-parallel test: `torchrun --nproc_per_node=K tests/dist_worker.py OUT`."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_cfg  # noqa: E402

from fdiv_align.training.trainer import Trainer  # noqa: E402

out = sys.argv[1]
cfg = tiny_cfg(trainer={"steps": 4, "samples_per_step": 8, "micro_batch_size": 4, "eval_every": 2, "checkpoint_every": 0,
                        "baseline": "loo"})
trainer = Trainer(cfg, output_dir=out)
trainer.train()
rank = int(os.environ.get("RANK", "0"))
torch.save({n: p.detach() for n, p in trainer.policy.trainable.items()}, os.path.join(out, f"params-rank{rank}.pt"))
