"""Scaling on one machine: what FSDP2 saves per process, what data parallelism and launcher sweeps buy.

    python benchmarks/scaling.py [--parts memory,throughput,sweep] [--out docs/results/scaling.md]

1. memory — per-process bytes of parameters + gradients + optimiser state (counted from the tensors each
   process holds after one step: local shards under FSDP) and the process's peak RSS (measured), for
   SmolLM2-135M-Instruct full fine-tuning and LoRA at 1 process and 2 processes (torchrun, gloo,
   trainer.parallel=fsdp; ddp for comparison).
2. throughput — the same work (SmolLM2, LoRA, fp32, 16 samples × ≤ 24 new tokens per step, 3 timed steps
   after one warm-up) on 1 process × 2 torch threads and on 2 processes × 1 thread (ddp): median s/step.
3. sweep — 4 tiny-model runs (trainer=smoke, seeds 0-3) through `fdiv-align -m`: Hydra's basic launcher
   (one after another) vs hydra/launcher=joblib with 2 jobs side by side: wall time of the command.

Each finished measurement is one line of --results (benchmarks/cells.py), so an interrupted run resumes.
Run it alone: the parts time processes that use every core.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from cells import CellStore

from fdiv_align.cli import available_cores

CELL_KEY = ("part", "mode", "parallel", "world")
HERE = Path(__file__).resolve().parent


def _trainer_cfg(lora: bool, parallel: str, threads: int, steps: int, samples: int, new_tokens: int):
    from fdiv_align.config import from_dict

    return from_dict({"model": {"name": "smollm2-135m", "lora": lora}, "divergence": {"name": "js"},
                      "task": {"name": "sentiment", "max_new_tokens": new_tokens},
                      "trainer": {"steps": steps, "samples_per_step": samples, "micro_batch_size": samples,
                                  "eval_every": 0, "eval_at_start": False, "eval_samples": 2, "checkpoint_every": 0,
                                  "precision": "fp32", "threads": threads, "parallel": parallel},
                      "logger": {"progress": False, "jsonl": False}})


def held_bytes(trainer) -> dict:
    """Bytes of the tensors this process holds: parameters (policy and reference; local shards under
    FSDP), gradients of the trainable ones, optimiser state."""
    import torch
    from torch.distributed.tensor import DTensor

    def local(t):
        return t.to_local() if isinstance(t, DTensor) else t

    def nbytes(t):
        t = local(t)
        return t.numel() * t.element_size()

    policy = trainer.policy
    params = list(policy.model.parameters()) + (list(policy.reference.parameters()) if policy.reference is not None else [])
    grads = [p.grad for p in policy.trainable.values() if p.grad is not None]
    states = [v for st in trainer.optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    out = {"params": sum(map(nbytes, params)), "grads": sum(map(nbytes, grads)), "optimizer": sum(map(nbytes, states))}
    out["total"] = sum(out.values())
    return out


def worker(args) -> None:
    """Inside torchrun (or alone): one measurement, written by every rank to --worker-out/rank<R>.json."""
    from fdiv_align.training.trainer import Trainer

    lora = args.mode == "lora"
    with tempfile.TemporaryDirectory() as d:
        if args.part == "memory":
            cfg = _trainer_cfg(lora, args.parallel, args.threads, steps=1, samples=4, new_tokens=8)
        else:
            cfg = _trainer_cfg(lora, args.parallel, args.threads, steps=4, samples=16, new_tokens=24)
        records = []
        trainer = Trainer(cfg, output_dir=Path(d) / "run", callbacks=[lambda t, s, r: records.append(r)])
        trainer.train()
        result = {"seconds": [r["seconds"] for r in records],
                  "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        if args.part == "memory":
            result["held"] = held_bytes(trainer)
    Path(args.worker_out).mkdir(parents=True, exist_ok=True)
    (Path(args.worker_out) / f"rank{trainer.rank}.json").write_text(json.dumps(result))


def launch(part: str, mode: str, parallel: str, world: int, threads: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}", "--master_port",
               str(29300 + world + os.getpid() % 300), __file__, "--worker", part, "--mode", mode, "--parallel", parallel,
               "--threads", str(threads), "--worker-out", d]
        subprocess.run(cmd, check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1"),
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return [json.loads((Path(d) / f"rank{r}.json").read_text()) for r in range(world)]


def sweep_seconds(launcher: list[str]) -> float:
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "fdiv_align", "-m", "model=tiny", "trainer=smoke", "task=amazing",
                        "logger.progress=false", "trainer.seed=0,1,2,3", f"hydra.sweep.dir={d}", *launcher], check=True,
                       env=dict(os.environ, HF_HUB_OFFLINE="1"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return time.perf_counter() - t0


def measure(parts: list[str], store: CellStore) -> None:
    cores = available_cores()
    cells = []
    if "memory" in parts:
        cells += [("memory", mode, parallel, world, max(1, cores // world))
                  for mode in ("full", "lora") for parallel, world in (("fsdp", 1), ("ddp", 2), ("fsdp", 2))]
    if "throughput" in parts:
        cells += [("throughput", "lora", "ddp", 1, cores), ("throughput", "lora", "ddp", 2, max(1, cores // 2))]
    for part, mode, parallel, world, threads in cells:
        if store.get(part=part, mode=mode, parallel=parallel, world=world):
            continue
        ranks = launch(part, mode, parallel, world, threads)
        store.add({"part": part, "mode": mode, "parallel": parallel, "world": world, "threads": threads, "ranks": ranks})
        print(part, mode, parallel, world, "done", flush=True)
    if "sweep" in parts:
        for name, launcher in (("basic", []), ("joblib", ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"])):
            if not store.get(part="sweep", mode=name, parallel=None, world=None):
                store.add({"part": "sweep", "mode": name, "seconds": sweep_seconds(launcher)})
                print("sweep", name, "done", flush=True)


def report(store: CellStore, out: str) -> str:
    import torch

    from fdiv_align.lm.precision import cpu_name

    mib = 2 ** 20
    lines = ["# Scaling on one machine: FSDP2 memory per process, data-parallel throughput, launcher sweeps", "",
             f"Command: `python benchmarks/scaling.py` — {datetime.date.today().isoformat()}, {cpu_name()}, "
             f"{available_cores()} cores, torch {torch.__version__}, gloo. Model: SmolLM2-135M-Instruct, fp32.", "",
             "## Memory per process after one step (tensors held: local shards under FSDP)", "",
             "| fine-tuning | engine | processes | params MiB | grads MiB | optimiser MiB | total MiB | × 1 process | peak RSS MiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode in ("full", "lora"):
        one = store.get(part="memory", mode=mode, parallel="fsdp", world=1)
        for parallel, world in (("fsdp", 1), ("ddp", 2), ("fsdp", 2)):
            cell = store.get(part="memory", mode=mode, parallel=parallel, world=world)
            if not cell:
                continue
            held = cell["ranks"][0]["held"]
            ratio = f"{held['total'] / one['ranks'][0]['held']['total']:.2f}" if one else "–"
            rss = max(r["max_rss_bytes"] for r in cell["ranks"]) / mib
            engine = "one process" if world == 1 else parallel
            lines.append(f"| {mode} | {engine} | {world} | {held['params'] / mib:.1f} | {held['grads'] / mib:.1f} | "
                         f"{held['optimizer'] / mib:.1f} | {held['total'] / mib:.1f} | {ratio} | {rss:.0f} |")
    lines += ["", "(rank 0 shown; the ranks differ by FSDP's padding of dim 0 only. LoRA: the frozen base is sharded "
              "too, the gradients and AdamW moments are the adapters'. Full fine-tuning holds a frozen reference copy.)", ""]
    thr = {w: store.get(part="throughput", mode="lora", parallel="ddp", world=w) for w in (1, 2)}
    if all(thr.values()):
        lines += ["## Data parallel on the same cores (LoRA, 16 samples × ≤ 24 tokens per step)", "",
                  "| layout | median s/step | samples/s | × 1 process |", "|---|---|---|---|"]
        base = statistics.median(thr[1]["ranks"][0]["seconds"][1:])
        for w, cell in thr.items():
            med = statistics.median(cell["ranks"][0]["seconds"][1:])
            lines.append(f"| {w} process(es) × {cell['threads']} thread(s) | {med:.2f} | {16 / med:.2f} | {med / base:.2f} |")
        lines.append("")
    sweeps = {m: store.get(part="sweep", mode=m, parallel=None, world=None) for m in ("basic", "joblib")}
    if all(sweeps.values()):
        lines += ["## A sweep of 4 tiny runs (`fdiv-align -m ... trainer.seed=0,1,2,3`)", "",
                  "| launcher | wall s | × basic |", "|---|---|---|"]
        for m, cell in sweeps.items():
            lines.append(f"| {m} | {cell['seconds']:.1f} | {cell['seconds'] / sweeps['basic']['seconds']:.2f} |")
        lines.append("")
    text = "\n".join(lines)
    Path(out).write_text(text)
    return text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--parts", default="memory,throughput,sweep")
    ap.add_argument("--results", default=str(HERE / "results" / "scaling.jsonl"))
    ap.add_argument("--out", default="docs/results/scaling.md")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="lora", help=argparse.SUPPRESS)
    ap.add_argument("--parallel", default="fsdp", help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.part = args.worker
        worker(args)
        return
    store = CellStore(args.results, CELL_KEY)
    measure(args.parts.split(","), store)
    print(report(CellStore(args.results, CELL_KEY), args.out))


if __name__ == "__main__":
    main()
