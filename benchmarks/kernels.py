"""Token log-prob kernels: forward+backward time and peak memory of lm_head → log-prob variants.

    python benchmarks/kernels.py [--device cpu|cuda] [--dtype float32|bfloat16] [--repeats 3]
                                 [--shapes 1024x576x49152,4096x576x49152,...] [--results FILE.jsonl]

Variants (all compute per-token log π(y|h) = log softmax(h Wᵀ)[y] and backprop a random upstream
gradient into h and W):
  naive      log_softmax(h @ W.T).gather(y)            (materialises [N, V] logits and log-probs)
  trl        TRL-style selective log-softmax: gather − row-wise logsumexp (still materialises logits)
  compiled   torch.compile of the naive version
  ours       fdiv_align.kernels.token_logprobs (chunked, recompute in backward, compiled chunk math)
  ours_fwdgrad  fdiv_align.kernels.weighted_token_logprob_sum (upstream weights known up front, as
             in the trainer: gradients computed in the forward, 3 matmuls like naive)
  matmul     the lm_head matmuls alone (h Wᵀ, then dZ W and dZᵀ h): the floor any implementation pays

Time: one process, variants interleaved within each repeat, median of repeats. Memory: each variant
in its own subprocess, peak RSS (VmHWM, reset after a warm-up) minus the RSS with the inputs and their
gradients allocated (CPU) or the
CUDA allocator's peak minus the inputs (GPU). Every finished cell is one line of --results
(benchmarks/cells.py), so an interrupted run resumes where it stopped. Writes docs/results/kernels.md (or --out).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from cells import CellStore

VARIANTS = ["naive", "trl", "compiled", "ours", "ours_fwdgrad", "matmul"]
DEFAULT_SHAPES = "1024x576x49152,4096x576x49152,16384x576x49152,1024x2048x128256,4096x2048x128256"


#: a cell: one shape on one device and dtype
CELL_KEY = ("device", "dtype", "N", "H", "V")

def make_inputs(N, H, V, device, dtype, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    h = torch.randn(N, H, generator=g).to(device, dtype).requires_grad_(True)
    w = (0.02 * torch.randn(V, H, generator=g)).to(device, dtype).requires_grad_(True)
    y = torch.randint(V, (N,), generator=g).to(device)
    up = torch.randn(N, generator=g).to(device)
    return h, w, y, up


def _naive(h, w, y):
    return torch.log_softmax((h @ w.T).float(), -1).gather(1, y[:, None]).squeeze(1)


def _trl(h, w, y):
    logits = (h @ w.T).float()
    sel = logits.gather(1, y[:, None]).squeeze(1)
    lse = torch.stack([torch.logsumexp(row, -1) for row in logits.split(1024)]).flatten() if logits.shape[0] > 1024 \
        else torch.logsumexp(logits, -1)
    return sel - lse


_COMPILED = {}


def run_variant(name, h, w, y, up):
    """One forward+backward; returns nothing (grads land in h.grad, w.grad)."""
    h.grad = w.grad = None
    if name == "naive":
        (_naive(h, w, y) * up).sum().backward()
    elif name == "trl":
        (_trl(h, w, y) * up).sum().backward()
    elif name == "compiled":
        if "naive" not in _COMPILED:
            _COMPILED["naive"] = torch.compile(_naive, dynamic=False)
        (_COMPILED["naive"](h, w, y) * up).sum().backward()
    elif name == "ours":
        from fdiv_align.kernels import token_logprobs

        (token_logprobs(h, w, y) * up).sum().backward()
    elif name == "ours_fwdgrad":
        from fdiv_align.kernels import weighted_token_logprob_sum

        weighted_token_logprob_sum(h, w, y, up)[0].backward()
    elif name == "matmul":
        with torch.no_grad():
            z = h @ w.T
            h.grad = z @ w
            w.grad = z.T @ h
    else:
        raise ValueError(name)


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def memory_cell(name, N, H, V, device, dtype):
    """Peak memory (MiB) of one forward+backward above the inputs, measured in this (fresh) process."""
    h, w, y, up = make_inputs(N, H, V, device, dtype)
    run_variant(name, h, w, y, up)  # warm-up / compile (its peak counts too: that is what a step pays)
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run_variant(name, h, w, y, up)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return None


def peak_rss_mib() -> float:
    """This process's peak RSS (VmHWM). Unlike ru_maxrss it is not inherited across fork+exec from a
    large parent, and it can be reset (see :func:`reset_peak_rss`)."""
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def cpu_memory_cell(name, N, H, V, dtype):
    h, w, y, up = make_inputs(N, H, V, "cpu", dtype)
    run_variant(name, h, w, y, up)  # warm-up: compilation, allocator caches, gradient buffers
    h.grad = torch.zeros_like(h)
    w.grad = torch.zeros_like(w)  # gradients count as inputs-sized state for every variant
    reset_peak_rss()
    base = peak_rss_mib()
    run_variant(name, h, w, y, up)
    return peak_rss_mib() - base


def fits(name, N, V, budget_gib):
    if name in ("ours", "ours_fwdgrad", "matmul"):
        return True
    return 3 * N * V * 4 / 2**30 < budget_gib  # naive keeps ~3 fp32 [N, V] buffers alive


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--shapes", default=DEFAULT_SHAPES)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--results", default="benchmarks/results/kernels.jsonl")
    ap.add_argument("--out", default=None)
    ap.add_argument("--memory-budget-gib", type=float, default=16.0)
    ap.add_argument("--memory-cell", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    if args.memory_cell:
        name, N, H, V = args.memory_cell.split(",")
        N, H, V = int(N), int(H), int(V)
        mib = memory_cell(name, N, H, V, args.device, dtype) if args.device == "cuda" else cpu_memory_cell(name, N, H, V, dtype)
        print(json.dumps({"peak_mib": mib}))
        return

    store = CellStore(args.results, CELL_KEY)
    variants = args.variants.split(",")
    for shape in args.shapes.split(","):
        N, H, V = (int(x) for x in shape.split("x"))
        if store.get(device=args.device, dtype=args.dtype, N=N, H=H, V=V) is not None:
            print(f"[skip] {args.device} {args.dtype} {shape} is in {args.results}")
            continue
        active = [v for v in variants if fits(v, N, V, args.memory_budget_gib)]
        times = {v: [] for v in active}
        h, w, y, up = make_inputs(N, H, V, args.device, dtype)
        for v in active:  # warm-up (compilation) outside the timed repeats
            run_variant(v, h, w, y, up)
        for _ in range(args.repeats):
            for v in active:  # interleaved
                _sync(args.device)
                t0 = time.perf_counter()
                run_variant(v, h, w, y, up)
                _sync(args.device)
                times[v].append(time.perf_counter() - t0)
        del h, w, y, up
        memory = {}
        for v in active:
            out = subprocess.run([sys.executable, __file__, "--memory-cell", f"{v},{N},{H},{V}", "--device", args.device,
                                  "--dtype", args.dtype], capture_output=True, text=True)
            memory[v] = json.loads(out.stdout.strip().splitlines()[-1])["peak_mib"] if out.returncode == 0 else None
        row = {"device": args.device, "dtype": args.dtype, "N": N, "H": H, "V": V,
               "median_s": {v: statistics.median(t) for v, t in times.items()},
               "times": times, "repeats": args.repeats, "peak_mib": memory, "skipped": [v for v in variants if v not in active]}
        store.add(row)
        print(json.dumps({"shape": shape, "median_s": row["median_s"], "peak_mib": memory}))

    write_table(store, args)


def write_table(store: CellStore, args):
    rows = sorted(store.rows(device=args.device, dtype=args.dtype), key=lambda r: (r["N"], r["H"], r["V"]))
    lines = [f"## {args.device.upper()} {args.dtype}", "",
             f"Command: `python benchmarks/kernels.py --device {args.device} --dtype {args.dtype} --repeats R --shapes NxHxV,...` "
             "(R per row below; cells are kept in benchmarks/results/kernels.jsonl, delete a line to re-measure it) — "
             f"{datetime.date.today().isoformat()}, {platform.machine()} {platform.processor() or ''} "
             f"{os.cpu_count()} cores, torch {torch.__version__}"
             + (f", {torch.cuda.get_device_name()}" if args.device == "cuda" else ""), "",
             "Forward+backward of per-token log-probs; time = median of interleaved repeats; memory = peak above the "
             "inputs and their gradients, each variant in its own process. Ratios are against `naive` in the same run. "
             "The matmul floor is the three lm_head matmuls of the materialising version; `ours` does four (it "
             "recomputes the logits in backward instead of storing them), so its own floor is 4/3 of that.", "",
             "| N | H | V | repeats | variant | time (s) | × naive | × matmul floor | peak MiB | naive ÷ this (memory) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, m = r["median_s"], r["peak_mib"]
        for v in VARIANTS:
            if v in r["skipped"]:
                lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r.get('repeats', 3)} | {v} | skipped (needs > memory budget) | | | | |")
                continue
            if v not in t:
                continue
            tn, mn = t.get("naive"), m.get("naive")
            ratio = f"{t[v] / tn:.2f}" if tn else "–"
            floor = f"{t[v] / t['matmul']:.2f}" if t.get("matmul") else "–"
            mem = f"{m[v]:.0f}" if m.get(v) is not None else "–"
            mratio = f"{mn / m[v]:.1f}" if (mn and m.get(v)) else "–"
            lines.append(f"| {r['N']} | {r['H']} | {r['V']} | {r.get('repeats', 3)} | {v} | {t[v]:.3f} | {ratio} | {floor} "
                         f"| {mem} | {mratio} |")
    table = "\n".join(lines) + "\n"
    print(table)
    out = Path(args.out or "docs/results/kernels.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "# Fused token log-prob kernels\n\n"
    existing = out.read_text() if out.exists() else header
    marker = f"## {args.device.upper()} {args.dtype}"
    if marker in existing:  # replace this device/dtype's section
        start = existing.index(marker)
        nxt = existing.find("\n## ", start + 1)
        existing = existing[:start] + existing[nxt + 1:] if nxt != -1 else existing[:start]
    out.write_text(existing.rstrip("\n") + "\n\n" + table)


if __name__ == "__main__":
    main()
