"""Errors a user can cause. The CLI turns each into one message and exit status 2."""


class ConfigError(ValueError):
    """A configuration, command-line or file error: the message names the key and the valid choices."""
