"""Per-process worker settings: the config is read once, and function modules imported once."""

from __future__ import annotations

import functools

from vebaq import config
from workers.pools import load_functions


def load_settings(path: str | None = None) -> config.Settings:
    """The settings (``path`` or ``$VEBAQ_CONFIG``, and env), after importing every function
    module, so that triggers and pool sections are checked against the pools that exist."""
    base = config.load(path)
    return config.load(path, known_pools=load_functions(base.functions))


@functools.cache
def settings() -> config.Settings:
    """:func:`load_settings`, once per process."""
    return load_settings()
