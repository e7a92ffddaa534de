"""Plain on-policy f-DPG loops on the enumerable toy model: exact divergence before → after.

    python benchmarks/toy_minimise.py [--steps 150] [--batch 32] [--seed 0]
"""

import argparse

import torch

from fdiv_align import get_divergence
from fdiv_align.testing.toy import ToyAR, exponential_problem, minimise, pointwise_problem


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    base = ToyAR(3, 4, seed=1)
    print("| target | divergence | exact D(base) | exact D(trained) | ratio |")
    print("|---|---|---|---|---|")
    for problem, divs in [(exponential_problem(base, 0, 1.5), ["fkl", "rkl", "js", "tv", "chi2", ("alpha", 0.5)]),
                          (pointwise_problem(base, 0, 2), ["fkl", "js", "tv", ("alpha", 0.5)])]:
        for spec in divs:
            div = get_divergence(spec[0], alpha=spec[1]) if isinstance(spec, tuple) else get_divergence(spec)
            with torch.no_grad():
                start = float(problem.exact_divergence(div, base))
            end = minimise(problem, div, steps=args.steps, batch_size=args.batch, seed=args.seed)["curve"][-1]
            print(f"| {problem.name} | {div!r} | {start:.4f} | {end:.4f} | {end / start:.3f} |")


if __name__ == "__main__":
    main()
