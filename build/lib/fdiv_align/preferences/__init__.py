"""Learning from preference pairs: the data (JSONL pairs, synthetic pairs from any reward) and pair
training (reward models, offline f-DPO). The data API is re-exported here."""

from .data import PreferenceDataError, PreferencePair, load_preferences, synthetic_preferences, write_preferences

__all__ = ["PreferencePair", "PreferenceDataError", "load_preferences", "write_preferences", "synthetic_preferences"]
