"""rlmem: online reinforcement learning with recurrent memory."""

__version__ = "0.1.0"
