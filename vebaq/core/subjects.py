"""The event subjects vebaq knows up front: every vCenter event class pyvmomi describes.

A subject — the CloudEvent ``subject`` and the Celery task name — is an event's class name
(``VmPoweredOffEvent``), or for ``EventEx``/``ExtendedEvent`` its open-ended ``eventTypeId``.
Workers register a task for each known class at start (Flower lists them); other names are
accepted on first sight.
"""

from __future__ import annotations

import functools

from pyVmomi import VmomiSupport, vim


@functools.cache
def event_classes() -> tuple[type, ...]:
    """Every vCenter event class pyvmomi knows (``vim.event.Event`` and its subclasses)."""
    classes = []
    for name in sorted(VmomiSupport._dataDefMap):
        cls = VmomiSupport.GetVmodlType(name)
        if isinstance(cls, type) and issubclass(cls, vim.event.Event):
            classes.append(cls)
    return tuple(classes)


def class_subject(cls: type) -> str:
    """``EnteredMaintenanceModeEvent`` for ``vim.event.EnteredMaintenanceModeEvent``."""
    return cls.__name__.rsplit(".", 1)[-1]
