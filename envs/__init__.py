"""Vectorized environments behind one contract (``envs.base.VecEnv``). Importing registers them."""

import envs.prediction_tasks  # noqa: F401  (registers trace_conditioning, trace_patterning)
from envs import atari, gym_env, memory_tasks, procgen_env  # noqa: F401  (register the built-in sources)
from envs.base import EnvError, VecEnv
from envs.registry import ENVS, EnvOptions, env_device, env_options, make_env, register_env

__all__ = ["ENVS", "EnvError", "EnvOptions", "VecEnv", "env_device", "env_options", "make_env", "register_env"]
