"""Pools and the functions registered for them.

A pool is a Celery queue plus the functions that run for events routed to it. A function is a
plain callable taking a :class:`~cloudevents.core.v1.event.CloudEvent`; register it with::

    from workers.pools import function

    @function(pool="tickets", subjects=["VmPoweredOffEvent"])
    def open_ticket(event):
        ...

and name its module in the config's ``functions:`` list (or ``VEBAQ_FUNCTIONS``); route events to
the pool with a trigger. Raise :class:`~workers.errors.PermanentError` for failures a retry cannot
fix; any other exception is retried with back-off, then dead-lettered.

A pool can also be an *HTTP pool*, with no Python at all: ``pools.<pool>.sink`` in the config
registers a function that POSTs each event to a CloudEvents receiver (:mod:`workers.sinks`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cloudevents.core.v1.event import CloudEvent

from vebaq.core.errors import ConfigError

Handler = Callable[[CloudEvent], Any]

#: Modules that register the built-in pools (``echo``, ``vrops``).
BUILTIN_FUNCTION_MODULES = ("workers.functions.echo", "workers.functions.vrops")


@dataclass(frozen=True)
class Function:
    """A registered function.

    :param name: unique within its pool; part of the dedupe key, so keep it stable.
    :param subjects: the CloudEvent subjects it handles; ``None`` means every subject.
    """

    name: str
    pool: str
    handler: Handler
    subjects: frozenset[str] | None = None

    def handles(self, subject: str | None) -> bool:
        return self.subjects is None or subject in self.subjects


#: pool name → its functions, in registration order.
POOLS: dict[str, list[Function]] = {}


def function(pool: str, subjects: Iterable[str] | None = None,
             name: str | None = None) -> Callable[[Handler], Handler]:
    """Register the decorated callable for ``pool`` (see the module docstring)."""

    def register(handler: Handler) -> Handler:
        entry = Function(name or handler.__name__, pool, handler,
                         frozenset(subjects) if subjects is not None else None)
        functions = POOLS.setdefault(pool, [])
        functions[:] = [f for f in functions if f.name != entry.name] + [entry]
        return handler

    return register


def functions_for(pool: str, subject: str | None) -> list[Function]:
    return [f for f in POOLS.get(pool, ()) if f.handles(subject)]


def load_functions(modules: Iterable[str] = ()) -> set[str]:
    """Import the built-in and the configured function modules; return the known pool names."""
    for module in (*BUILTIN_FUNCTION_MODULES, *modules):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise ConfigError(f"functions: cannot import {module!r}: {exc}") from None
    return set(POOLS)
