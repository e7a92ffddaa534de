"""Peak memory of one f-DPG step on SmolLM2 with LoRA: reference = base with adapters disabled
(one copy of the weights) vs. a separate reference copy, vs. full fine-tuning (which needs one).

    python benchmarks/lora_memory.py [--samples 8] [--tokens 16]

Each variant runs in its own subprocess; the figure is that process's peak RSS (ru_maxrss).
"""

import argparse
import copy
import json
import resource
import subprocess
import sys
import tempfile

VARIANTS = ["lora_disabled_adapters", "lora_separate_reference", "full_finetune"]


def run_variant(name, samples, tokens):
    import torch

    from fdiv_align.config import from_dict
    from fdiv_align.lm.sampling import SamplingConfig
    from fdiv_align.lm.scoring import score
    from fdiv_align.training.trainer import Trainer

    cfg = from_dict({"model": {"name": "smollm2-135m", "lora": name != "full_finetune"},
                     "task": {"name": "sentiment", "max_new_tokens": tokens},
                     "trainer": {"steps": 1, "samples_per_step": samples, "micro_batch_size": samples, "eval_every": 0,
                                 "eval_samples": samples, "checkpoint_every": 0},
                     "logger": {"progress": False, "jsonl": False}})

    if name == "lora_separate_reference":  # what a 2-model setup holds: a separate copy of the base scores a(x)
        from fdiv_align.lm.policy import Policy

        separate = {}

        @torch.no_grad()
        def reference_logprobs(self, batch):
            if "model" not in separate:
                separate["model"] = copy.deepcopy(self.model.get_base_model()).eval()
            return score(separate["model"], batch, SamplingConfig(), pad_id=self.pad_id)[1].double()

        Policy.reference_logprobs = reference_logprobs  # before the trainer binds it (a fresh process per variant)
    with tempfile.TemporaryDirectory() as d:
        Trainer(cfg, output_dir=d).train()
    for line in open("/proc/self/status"):  # VmHWM: not inherited from the parent across fork+exec
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # MiB


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--variant", choices=VARIANTS)
    args = ap.parse_args()
    if args.variant:
        print(json.dumps({"variant": args.variant, "peak_rss_mib": run_variant(args.variant, args.samples, args.tokens)}))
        return
    rows = []
    for v in VARIANTS:
        out = subprocess.run([sys.executable, __file__, "--variant", v, "--samples", str(args.samples), "--tokens", str(args.tokens)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = rows[0]["peak_rss_mib"]
    print("| variant | peak RSS (MiB) | vs LoRA with adapters disabled |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] / base:.2f}× |")


if __name__ == "__main__":
    main()
