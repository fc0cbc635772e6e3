"""Statistics: arrays in, dataclasses out (C_T, baselines, attribution, confidence, evaluation)."""
