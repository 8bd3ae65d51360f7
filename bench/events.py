"""The events the benchmarks feed in: simulator posts, simulated CloudEvents, maintenance events.

Everything is deterministic (fixed seeds, increasing keys) so runs are comparable.
"""

from __future__ import annotations

import itertools
import random
import uuid
from datetime import UTC, datetime
from typing import Any

from pyVmomi import vim

from producer.cloudevent import event_id, to_cloudevent
from producer.reader import SeenKeys
from producer.simulated import SimulatedReader, SimulatedSession
from vebaq.core.envelope import to_structured
from vebaq.core.messages import TaskMessage

#: Seed of the simulated source, so every run converts the same event mix.
SEED = 7

#: The vCenter the hand-built maintenance events claim to come from.
VROPS_VCENTER_UUID = "00000000-5eba-4000-8000-0000be4c0001"
VROPS_SOURCE = "https://vc.bench.invalid/sdk"


def simulated_cloudevents(count: int) -> list[dict[str, Any]]:
    """``count`` structured CloudEvents from the built-in simulated source (its event mix:
    maintenance mode, VM power, logins), converted as the producer converts them."""
    session = SimulatedSession()
    reader = SimulatedReader(begin=datetime.now(UTC), seen=SeenKeys(), backlog=count, rate=0,
                             seed=SEED, page_size=count or 1)
    return [to_structured(to_cloudevent(event, source=session.url,
                                        instance_uuid=session.instance_uuid,
                                        api_version=session.api_version))
            for event in reader.poll()]


def outgoing(structured: list[dict[str, Any]], pool: str) -> list[TaskMessage]:
    """One task per event, all for ``pool``."""
    return [TaskMessage(e["subject"], e, pool) for e in structured]


def bench_hosts(count: int) -> list[tuple[str, str]]:
    """``(name, moref)`` of the hosts the vROps events are about."""
    return [(f"esx{i:02d}.bench.local", f"host-{1000 + i}") for i in range(count)]


class MaintenanceEvents:
    """Maintenance-mode CloudEvents round-robin over ``hosts``, each host alternating between
    entering and leaving, with increasing event keys (newer than every event made before)."""

    def __init__(self, hosts: list[tuple[str, str]]) -> None:
        self.hosts = hosts
        self._keys = itertools.count(1)
        self._maintained = {moref: False for _, moref in hosts}

    def take(self, count: int) -> list[dict[str, Any]]:
        events = []
        for i in range(count):
            name, moref = self.hosts[i % len(self.hosts)]
            entering = not self._maintained[moref]
            self._maintained[moref] = entering
            events.append(self._event(next(self._keys), name, moref, entering))
        return events

    @staticmethod
    def _event(key: int, name: str, moref: str, entering: bool) -> dict[str, Any]:
        subject = "EnteredMaintenanceModeEvent" if entering else "ExitMaintenanceModeEvent"
        created = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        verb = "entered" if entering else "exited"
        return {
            "specversion": "1.0",
            "id": event_id(VROPS_VCENTER_UUID, key),
            "source": VROPS_SOURCE,
            "type": "com.vmware.event.router/event",
            "subject": subject,
            "time": created,
            "datacontenttype": "application/json",
            "eventclass": "event",
            "vsphereapiversion": "8.0.3.0",
            "vcenteruuid": VROPS_VCENTER_UUID,
            "data": {
                "Key": key, "ChainId": key, "CreatedTime": created,
                "UserName": "VSPHERE.LOCAL\\Administrator",
                "Datacenter": {"Name": "Lab",
                               "Datacenter": {"Type": "Datacenter", "Value": "datacenter-2"}},
                "Host": {"Name": name, "Host": {"Type": "HostSystem", "Value": moref}},
                "FullFormattedMessage": f"Host {name} in Lab has {verb} maintenance mode",
            },
        }


def simulator_mix(content: vim.ServiceInstanceContent, count: int,
                  seed: int = SEED) -> list[vim.event.Event]:
    """``count`` events for ``PostEvent``: host maintenance mode, VM power, user logins on the
    simulator's real inventory (the simulator sets key, chain id and creation time)."""
    rng = random.Random(seed)
    view = content.viewManager.CreateContainerView(content.rootFolder,
                                                   [vim.HostSystem, vim.VirtualMachine], True)
    try:
        hosts = [o for o in view.view if isinstance(o, vim.HostSystem)]
        vms = [o for o in view.view if isinstance(o, vim.VirtualMachine)]
        names = {o._moId: o.name for o in view.view}
    finally:
        view.DestroyView()
    datacenter = content.rootFolder.childEntity[0]
    dc_arg = vim.event.DatacenterEventArgument(datacenter=datacenter, name=datacenter.name)
    maintained: dict[str, bool] = {}
    events = []
    for _ in range(count):
        host = rng.choice(hosts)
        common = {"key": 0, "chainId": 0, "createdTime": datetime.now(UTC),
                  "userName": "VSPHERE.LOCAL\\Administrator", "datacenter": dc_arg,
                  "host": vim.event.HostEventArgument(host=host, name=names[host._moId])}
        roll = rng.random()
        if roll < 0.3:
            entering = not maintained.get(host._moId, False)
            maintained[host._moId] = entering
            cls = (vim.event.EnteredMaintenanceModeEvent if entering
                   else vim.event.ExitMaintenanceModeEvent)
            events.append(cls(**common))
        elif roll < 0.8:
            vm = rng.choice(vms)
            cls = rng.choice([vim.event.VmPoweredOnEvent, vim.event.VmPoweredOffEvent])
            events.append(cls(**common, template=False,
                              vm=vim.event.VmEventArgument(vm=vm, name=names[vm._moId])))
        else:
            events.append(vim.event.UserLoginSessionEvent(
                **common, ipAddress="10.0.0.7", userAgent="vebaq-bench", locale="en",
                sessionId=str(uuid.UUID(int=rng.getrandbits(128)))))
    return events


def general_event(message: str) -> vim.event.GeneralUserEvent:
    """A ``GeneralUserEvent`` carrying ``message`` (the latency runs tag events with it)."""
    return vim.event.GeneralUserEvent(key=0, chainId=0, createdTime=datetime.now(UTC),
                                      userName="VSPHERE.LOCAL\\Administrator", message=message)
