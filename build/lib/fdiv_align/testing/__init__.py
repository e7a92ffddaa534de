"""Models for tests and exact benchmarks: enumerable toy distributions (:mod:`.toy`) and tiny random
causal LMs built from a config (:func:`tiny_model`)."""

from ..lm.models import TINY_WORDS, tiny_model

__all__ = ["tiny_model", "TINY_WORDS"]
