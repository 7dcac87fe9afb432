"""Evaluation: the ranking metrics (metrics: recall@K, mR, the RSITMD protocol), scoring a
checkpoint on a split (evaluate) and the pointing game for attention maps (pointing)."""
