"""Learners (one module per algorithm) built from shared actor-critic pieces."""
