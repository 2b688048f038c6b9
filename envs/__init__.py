"""Vectorized environments behind one contract (``envs.base.VecEnv``). Importing registers them."""

from envs.base import EnvError, VecEnv
from envs.registry import ENVS, EnvOptions, env_options, make_env, register_env

__all__ = ["ENVS", "EnvError", "EnvOptions", "VecEnv", "env_options", "make_env", "register_env"]
