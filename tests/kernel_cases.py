"""The kernel test cases shared by tests/test_kernels.py (CPU) and tests/test_gpu.py (CUDA): shapes, inputs,
the fp64 reference and the variants of our kernel."""

import torch

from fdiv_align.kernels import reference_token_logprobs, token_logprobs

SHAPES = [  # (N, H, V, chunk, vocab tile): N not a multiple of the chunk, V not a multiple of the tile, N = 1, single chunk/tile
    (37, 16, 101, 8, 32),
    (1, 8, 50, 4, None),
    (64, 32, 1000, None, None),
    (129, 24, 257, 64, 100),
]


def make(N, H, V, seed, dtype=torch.float64, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g, dtype=torch.float64)
    w = 0.3 * torch.randn(V, H, generator=g, dtype=torch.float64)
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    y = torch.randint(V, (N,), generator=g)
    gl, ge = torch.randn(N, generator=g, dtype=torch.float64), torch.randn(N, generator=g, dtype=torch.float64)
    return h, w, b, y, gl, ge


def grads_of(fn, h, w, b, y, gl, ge, dtype, temperature):
    leaves = [t.to(dtype).clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    lp, ent = fn(leaves[0], leaves[1], y, temperature, leaves[2])
    (lp.double() * gl + ent.double() * ge).sum().backward()
    return lp.detach().double(), ent.detach().double(), [None if t is None else t.grad.double() for t in leaves]


def ours(compile, chunk, tile=None, budget=0):
    return lambda h, w, y, T, b: token_logprobs(h, w, y, T, chunk, True, b, compile=compile, vocab_tile=tile,
                                                saved_logits_budget=budget)


# kept forward logits: none (all recomputed in vocabulary tiles), the last 13 tokens, all (the default budget)
BUDGETS = {"recompute": lambda V: 0, "keep13": lambda V: 13 * V, "default": lambda V: 1 << 26}


def ref(h, w, y, T, b):
    return reference_token_logprobs(h, w, y, T, True, b)
