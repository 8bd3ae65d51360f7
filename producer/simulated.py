"""A built-in simulated vCenter event source, for trying vebaq without a vCenter and for
benchmarks that need backlogs larger than the govmomi simulator keeps (1,000 events).

It makes real pyvmomi event objects — hosts entering and leaving maintenance mode, VMs powering
on and off, users logging in — with increasing keys, so everything after the reader (conversion,
routing, publishing, checkpoint) runs exactly as with a vCenter.
"""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from pyVmomi import vim

from producer.reader import SeenKeys

#: The simulated vCenter's identity (stable, so checkpoints survive restarts).
SIMULATED_UUID = "00000000-5eba-4000-8000-00000000c0de"
SIMULATED_URL = "https://vcsim.vebaq.invalid/sdk"


@dataclass(frozen=True)
class SimulatedHost:
    name: str
    moref: str


def simulated_hosts(count: int) -> list[SimulatedHost]:
    return [SimulatedHost(f"esx{i:02d}.lab.local", f"host-{100 + i}") for i in range(count)]


@dataclass
class SimulatedSession:
    """Stands in for :class:`producer.vcenter.Session`."""

    url: str = SIMULATED_URL
    instance_uuid: str = SIMULATED_UUID
    api_version: str = "8.0.3.0"

    def now(self) -> datetime:
        return datetime.now(UTC)

    def close(self) -> None:
        pass


@dataclass
class SimulatedReader:
    """Stands in for :class:`producer.reader.EventReader`.

    :param rate: events per second generated while running (0: none).
    :param backlog: events that already exist when the reader starts (e.g. 100,000).
    :param hosts: how many ESXi hosts the simulated inventory has.
    """

    begin: datetime
    seen: SeenKeys
    floor: datetime | None = None
    rate: float = 2.0
    backlog: int = 0
    hosts: int = 4
    page_size: int = 1000
    seed: int | None = None
    next_key: int = 1
    _rng: random.Random = field(init=False)
    _pending: list[vim.event.Event] = field(init=False, default_factory=list)
    _last: float = field(init=False, default=0.0)
    _maintenance: dict[str, bool] = field(init=False, default_factory=dict)
    more_waiting: bool = field(init=False, default=False)
    #: The EventReader's watchdog state: a simulated source never stalls nor skips.
    stall: None = field(init=False, default=None)
    resets: int = field(init=False, default=0)
    skipped: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.floor = self.floor or self.begin
        self._rng = random.Random(self.seed)
        self._inventory = simulated_hosts(self.hosts)
        self.next_key = max(self.next_key, self.seen.highest + 1)
        start = self.begin
        for i in range(self.backlog):
            self._pending.append(self._make(start + timedelta(microseconds=i)))
        self._last = time.monotonic()

    def _make(self, created: datetime) -> vim.event.Event:
        host = self._rng.choice(self._inventory)
        roll = self._rng.random()
        common = {"key": self.next_key, "chainId": self.next_key, "createdTime": created,
                  "userName": "VSPHERE.LOCAL\\Administrator"}
        self.next_key += 1
        host_arg = vim.event.HostEventArgument(name=host.name, host=vim.HostSystem(host.moref))
        datacenter = vim.event.DatacenterEventArgument(name="Lab",
                                                       datacenter=vim.Datacenter("datacenter-2"))
        if roll < 0.3:
            entering = not self._maintenance.get(host.moref, False)
            self._maintenance[host.moref] = entering
            cls = (vim.event.EnteredMaintenanceModeEvent if entering
                   else vim.event.ExitMaintenanceModeEvent)
            verb = "entered" if entering else "exited"
            return cls(**common, host=host_arg, datacenter=datacenter,
                       fullFormattedMessage=f"Host {host.name} in Lab has {verb} maintenance mode")
        if roll < 0.8:
            vm_name = f"vm-{self._rng.randrange(1, 40):03d}"
            cls = self._rng.choice([vim.event.VmPoweredOnEvent, vim.event.VmPoweredOffEvent])
            vm = vim.event.VmEventArgument(name=vm_name, vm=vim.VirtualMachine(f"vm-{vm_name[3:]}"))
            return cls(**common, host=host_arg, datacenter=datacenter, vm=vm, template=False,
                       fullFormattedMessage=f"{vm_name} on {host.name} in Lab changed power state")
        return vim.event.UserLoginSessionEvent(
            **common, ipAddress="10.0.0.7", userAgent="vebaq-simulated", locale="en",
            sessionId=str(uuid.UUID(int=self._rng.getrandbits(128))),
            fullFormattedMessage="User VSPHERE.LOCAL\\Administrator logged in")

    # --- the EventReader interface

    def open(self) -> None:
        pass

    def reattach(self, content: object) -> None:
        pass

    def newest_key(self) -> int | None:
        return self.next_key - 1 if self.next_key > 1 else None

    def close(self) -> None:
        pass

    def poll(self) -> list[vim.event.Event]:
        now = time.monotonic()
        if self.rate > 0:
            due = int((now - self._last) * self.rate)
            if due:
                self._last += due / self.rate
                created = datetime.now(UTC)
                self._pending.extend(self._make(created) for _ in range(min(due, 10_000)))
        page, self._pending = self._pending[:self.page_size], self._pending[self.page_size:]
        self.more_waiting = bool(self._pending)
        return page

    def confirmed(self, keys: Iterable[int], begin: datetime) -> None:
        for key in keys:
            self.seen.add(key)
        self.begin = max(self.begin, begin)
