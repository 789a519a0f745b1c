"""Evaluation: frame-level detection metrics and the scores they are computed from."""
