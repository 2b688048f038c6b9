"""CUDA kernels for the sensitivity recursion; ``rlmem/rtrl.py`` holds their PyTorch oracle."""
