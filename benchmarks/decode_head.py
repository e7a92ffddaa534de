"""The output head of one CPU decoding step: one GEMM against vocabulary blocks.

    python benchmarks/decode_head.py [--rows 16,32,64] [--vocab 49152] [--hidden 576] [--repeats 20]

A decoding step multiplies a few hidden rows [B, d] by the whole head [V, d] (SmolLM2-135M: d = 576,
V = 49152). Prints, per B, the median time (ms) of ``torch.nn.functional.linear`` and of
``fdiv_align.lm.logprobs._vocab_blocked_logits`` (what the sampler uses on CPU: HEAD_BLOCK_ROWS rows at a
time into a reused buffer), their ratio, the largest difference between the two outputs, and the CPU.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fdiv_align.lm.logprobs import HEAD_BLOCK_ROWS, _vocab_blocked_logits
from fdiv_align.lm.precision import cpu_name


def median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="16,32,64")
    ap.add_argument("--vocab", type=int, default=49152)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--repeats", type=int, default=20)
    args = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(args.vocab, args.hidden, generator=gen)
    print(f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}; "
          f"head [{args.vocab}, {args.hidden}] fp32, blocks of {HEAD_BLOCK_ROWS} rows; median of {args.repeats}")
    print("| rows B | linear (ms) | blocked (ms) | blocked / linear | max |difference| |")
    print("|---|---|---|---|---|")
    for rows in map(int, args.rows.split(",")):
        hidden = torch.randn(rows, args.hidden, generator=gen)
        buffers: dict = {}
        plain = median_ms(lambda h=hidden: torch.nn.functional.linear(h, weight), args.repeats)
        blocked = median_ms(lambda h=hidden, b=buffers: _vocab_blocked_logits(h, weight, b), args.repeats)
        diff = (_vocab_blocked_logits(hidden, weight, buffers) - torch.nn.functional.linear(hidden, weight)).abs().max()
        print(f"| {rows} | {plain:.1f} | {blocked:.1f} | {blocked / plain:.2f} | {diff.item():.1e} |")


if __name__ == "__main__":
    main()
