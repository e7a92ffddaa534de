"""The language model as a distribution: loading (an HF directory, the embedded default, tiny models),
batches, sampling with log q recorded, scoring, the compute plan (precision, fused kernels, compile)
and the :class:`~fdiv_align.lm.policy.Policy` (πθ and its base a). Imports :mod:`fdiv_align.kernels`
and :mod:`fdiv_align.config` only."""
