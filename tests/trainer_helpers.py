"""Shared builders for trainer tests (tiny models, enumerable targets). :func:`tiny_cfg` pins
``model.device=cpu`` (these tests compare against CPU tensors; tests/test_gpu.py covers CUDA) and
``trainer.precision=fp32``, so that the same path runs on every machine (tests/test_precision.py
forces each outcome of ``auto``)."""

from fdiv_align.config import from_dict
from fdiv_align.targets import RewardScorer, Task, WordPresent


def tiny_cfg(**over):
    base = {"model": {"name": "tiny", "device": "cpu"}, "task": {"name": "amazing", "max_new_tokens": 6},
            "trainer": {"steps": 6, "samples_per_step": 8, "micro_batch_size": 8, "eval_every": 3, "eval_samples": 8,
                        "checkpoint_every": 2, "lr": 1e-2, "deterministic": True, "threads": 1,
                        "precision": "fp32"},
            "logger": {"progress": False}}
    for group, values in over.items():
        base.setdefault(group, {}).update(values)
    return from_dict(base)


def count_a(texts, contexts):
    return [t.split().count("a") for t in texts]


def toy_task(div: str) -> Task:
    """Pointwise 'contains a' for divergences finite at P = 0, a reward target for rkl/chi2."""
    if div in ("rkl", "chi2"):
        return Task("toy_reward", RewardScorer(count_a, beta=0.5, name="count_a"))
    return Task("toy_word", WordPresent("a"))
