"""Learners (one module per algorithm) built from shared actor-critic pieces."""

import agents.td  # noqa: F401  (registers td)
