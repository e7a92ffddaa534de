"""Worker of the data-parallel tests: `torchrun --nproc_per_node=K tests/dist_worker.py OUT [OVERRIDES_JSON]`.

Trains the tiny model (tests/conftest.py tiny_cfg, 4 steps × 8 samples, micro-batches of 4, evaluations
at steps 2 and 4) with the config groups of OVERRIDES_JSON merged in (its "die": {"rank": R, "after_step": S}
is not a config group: rank R kills itself with SIGKILL after step S in the first attempt of a torchrun
group — TORCHELASTIC_RESTART_COUNT 0 — as a crashed machine would), then every rank writes the whole
trained parameters to OUT/params-rank<R>.pt and the layout of its parameters (sharded or whole, elements held)
to OUT/layout-rank<R>.json.
"""

import json
import math
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from conftest import tiny_cfg  # noqa: E402

from fdiv_align.training.distributed import whole  # noqa: E402
from fdiv_align.training.trainer import Trainer  # noqa: E402

out = sys.argv[1]
over = json.loads(sys.argv[2]) if len(sys.argv) > 2 else {}
die = over.pop("die", None)
groups = {"trainer": {"steps": 4, "samples_per_step": 8, "micro_batch_size": 4, "eval_every": 2, "checkpoint_every": 0,
                      "baseline": "loo"}}
for group, values in over.items():
    groups.setdefault(group, {}).update(values)


def crash(trainer, step, record):
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if die and first_attempt and trainer.rank == die["rank"] and step == die["after_step"]:
        os.kill(os.getpid(), signal.SIGKILL)


trainer = Trainer(tiny_cfg(**groups), output_dir=out, callbacks=[crash])
trainer.train()
params = whole(dict(trainer.policy.trainable))
torch.save(params, os.path.join(out, f"params-rank{trainer.rank}.pt"))

from torch.distributed.tensor import DTensor  # noqa: E402

held = list(trainer.policy.model.parameters()) + list(trainer.policy.reference.parameters() if trainer.policy.reference else [])
world = trainer.group.world
layout = {"sharded": any(isinstance(p, DTensor) for p in held),
          "local_numel": sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in held),
          "numel": sum(p.numel() for p in held),
          # FSDP2 shards dim 0 into world chunks of ceil(rows / world) rows
          "ceil_share": sum(math.ceil(p.shape[0] / world) * (p.numel() // max(1, p.shape[0])) for p in held)}
with open(os.path.join(out, f"layout-rank{trainer.rank}.json"), "w") as f:
    json.dump(layout, f)
