"""Test-only pools for the routing tests (``VEBAQ_FUNCTIONS=tests.routing_functions``): the
tests count the tasks waiting in each pool's queue, so the functions never run."""

from __future__ import annotations

from workers.pools import function

#: The pools the routing tests' triggers send to.
POOLS = ("hosts", "vms", "users", "once", "after", "batched")

for _pool in POOLS:
    function(pool=_pool, name=f"{_pool}-noop")(lambda event: None)
