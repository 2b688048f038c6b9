"""Benchmarks behind ``rlmem bench``: each module exposes ``run(argv)`` and prints a table of ratios
measured side by side in one run."""
