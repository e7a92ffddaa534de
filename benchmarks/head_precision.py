"""Precision of the output head's variants on SmolLM2 samples (the reason for the bf16 head design).

    python benchmarks/head_precision.py [--samples 32] [--tokens 40]

Samples continuations of one prompt from SmolLM2-135M-Instruct (fp32), then computes every token's
log-prob with: an fp32 body and head (the reference); the bf16 body (autocast) with an fp32 head; an
fp32 body with a plain bf16 head GEMM (output rounded to bf16); an fp32 body with the shifted bf16
head of fdiv_align.kernels (output rounding relative to the target logit); and an fp64 product of the
bf16-rounded inputs (input rounding alone). Prints the rms and max per-token error and the mean
|error| of the sequence sums; then the bias of fp32 log-softmax implementations (torch's kernel and
fdiv_align.lm.sampling.log_softmax_fp32) on the same fp32 logits against fp64.
"""

from __future__ import annotations

import argparse

import torch

from fdiv_align.kernels import token_logprobs
from fdiv_align.lm.models import load_model
from fdiv_align.lm.logprobs import log_softmax_fp32
from fdiv_align.lm.sampling import sample
from fdiv_align.lm.scoring import _continuation_hidden


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--prompt", default="Here is what I think about the new movie:")
    args = ap.parse_args()
    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    model.set_attn_implementation("eager")
    batch = sample(model, tok, [args.prompt], args.samples, args.tokens, generator=torch.Generator().manual_seed(0))
    pad, y, mask = tok.pad_token_id, batch.tokens, batch.mask.bool()

    def hidden(bf16_body: bool):
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_body):
            h, head = _continuation_hidden(model, batch, "left", pad)
        return h.float(), head.weight.float()

    h32, w32 = hidden(False)
    hb16, _ = hidden(True)

    def gathered(z):
        return z.log_softmax(-1).gather(-1, y[..., None]).squeeze(-1).double()

    with torch.no_grad():
        ref = gathered(h32.double() @ w32.double().T)
        hb, wb = h32.bfloat16(), w32.bfloat16()
        variants = {
            "bf16 body, fp32 head": gathered(hb16.double() @ w32.double().T),
            "plain bf16 head GEMM": gathered((hb @ wb.T).float()),
            "shifted bf16 head (ours)": token_logprobs(hb, wb, y).double(),
            "input rounding alone (fp64 of bf16 inputs)": gathered(hb.double() @ wb.double().T),
        }
        # the log-softmax itself on the fp32 logits: torch's fp32 kernel vs fdiv_align's, against fp64
        z32 = (h32 @ w32.T)[mask]
        exact = z32.double().log_softmax(-1)
        softmax_bias = {name: (fn(z32).double() - exact).gather(1, y[mask][:, None]).squeeze(1)
                        for name, fn in (("torch.log_softmax (fp32)", lambda z: z.log_softmax(-1)),
                                         ("fdiv_align log_softmax_fp32", log_softmax_fp32))}
    print(f"SmolLM2-135M-Instruct, {args.samples} samples × ≤ {args.tokens} tokens; error of token log-probs against fp32/fp64")
    print("| variant | rms per token | max per token | mean abs per sequence |\n|---|---|---|---|")
    for name, lp in variants.items():
        d = (lp - ref).masked_fill(~mask, 0.0)
        print(f"| {name} | {float(d[mask].pow(2).mean().sqrt()):.4f} | {float(d[mask].abs().max()):.4f} | "
              f"{float(d.sum(-1).abs().mean()):.4f} |")
    print("\nfp32 log-softmax of the same fp32 logits against fp64 (per token):\n"
          "| implementation | mean error | max |error| |\n|---|---|---|")
    for name, d in softmax_bias.items():
        print(f"| {name} | {float(d.mean()):+.2e} | {float(d.abs().max()):.2e} |")


if __name__ == "__main__":
    main()
