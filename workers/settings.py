"""The worker process's settings: the config read once, and the function modules imported once
(so that triggers and pool sections are checked against the pools that really exist, the HTTP
pools of ``pools.<pool>.sink`` included)."""

from __future__ import annotations

import functools

from vebaq.core import config
from workers.pools import load_functions
from workers.sinks import register_sinks


def load_settings(path: str | None = None) -> config.Settings:
    """The settings of ``path`` (or ``$VEBAQ_CONFIG``) and the environment, checked against the
    pools the built-in and configured function modules and the sinks register."""
    base = config.load(path)
    return config.check_pools(base, load_functions(base.functions) | register_sinks(base))


@functools.cache
def settings() -> config.Settings:
    """:func:`load_settings`, once per process."""
    return load_settings()
