"""Per-process worker settings: the config is read once, and function modules imported once."""

from __future__ import annotations

import functools

from vebaq import config
from workers.pools import load_functions


@functools.cache
def settings() -> config.Settings:
    """The settings (``$VEBAQ_CONFIG`` + env), after importing every function module so that
    triggers and pool sections can be checked against the real pools."""
    base = config.load()
    pools = load_functions(base.functions)
    return config.load(known_pools=pools)
