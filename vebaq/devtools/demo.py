"""The demo driver: makes things happen in a vCenter *simulator*, so the demo stack has events.

Every ``--interval`` seconds it does one action, cycling over the simulator's hosts and VMs::

    host A enters maintenance mode  EnterMaintenanceMode_Task + EnteredMaintenanceModeEvent posted
    VM X powers off                 PowerOffVM_Task (the simulator posts VmPoweredOffEvent)
    host A exits maintenance mode   ExitMaintenanceMode_Task + ExitMaintenanceModeEvent posted
    VM X powers on                  PowerOnVM_Task (the simulator posts VmPoweredOnEvent)
    host B enters maintenance mode  ...

The simulator's maintenance-mode tasks flip ``runtime.inMaintenanceMode`` but post no event, so
the driver posts the event a vCenter would. Each action toggles the current state, so a restarted
driver carries on where things stand. One log line per action.

With ``--fake-vrops URL`` it first registers the simulator's hosts in the fake vROps
(``POST /_fake/hosts``), so that the ``vrops`` pool finds them and mirrors maintenance mode.

It drives simulators only: before anything it checks that the endpoint answers ``/about`` the way
govmomi's ``vcsim`` does, and refuses a real vCenter.

Run it as ``python -m vebaq.devtools.demo`` (the compose ``demo`` profile's ``demo-driver``); it
reads ``VCENTER_URL``, ``VCENTER_USER``, ``VCENTER_PASSWORD`` and ``VCENTER_INSECURE_SSL`` like the
producer. ``--count N`` stops after N actions.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import ssl
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import replace
from urllib.parse import urlsplit, urlunsplit

from pyVmomi import vim

from producer.vcenter import connect, ssl_context
from vebaq.core import config
from vebaq.core.errors import ConfigError, VCenterError, VebaqError
from vebaq.core.secrets import Secret

logger = logging.getLogger("vebaq.demo")

#: Seconds a simulator task may take before the action counts as failed.
TASK_TIMEOUT = 60.0


class NotASimulator(VebaqError):
    """The endpoint is not a vCenter simulator: the driver will not touch it."""


def about_url(sdk_url: str) -> str:
    """``https://vcsim:8989/sdk`` → ``https://vcsim:8989/about`` (vcsim's inventory summary)."""
    parts = urlsplit(sdk_url)
    return urlunsplit((parts.scheme, parts.netloc, "/about", "", ""))


def check_simulator(settings: config.VCenterSettings, timeout: float = 10.0) -> None:
    """Raise :class:`NotASimulator` unless ``settings.url`` is a govmomi simulator.

    vcsim answers ``GET /about`` with JSON listing the ``Methods`` and ``Types`` it simulates; a
    real vCenter has no such page. Connection failures raise :class:`VCenterError` (retried)."""
    url = about_url(settings.url or "")
    context = ssl_context(settings) if url.startswith("https") else None
    try:
        with urllib.request.urlopen(url, timeout=timeout, context=context) as answer:
            about = json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        raise NotASimulator(f"{settings.url} is not a vCenter simulator ({url} answered "
                            f"{exc.code}); the demo driver only drives simulators") from None
    except ValueError:
        raise NotASimulator(f"{settings.url} is not a vCenter simulator ({url} is not vcsim's "
                            f"JSON); the demo driver only drives simulators") from None
    except (OSError, ssl.SSLError) as exc:
        reason = getattr(exc, "reason", exc)
        raise VCenterError(f"cannot reach {url}: {reason}") from None
    if not isinstance(about, dict) or "Methods" not in about:
        raise NotASimulator(f"{settings.url} is not a vCenter simulator; the demo driver only "
                            f"drives simulators")


def retry(action: Callable[[], object], what: str, deadline: float, stop: threading.Event,
          errors: tuple[type[BaseException], ...]) -> object:
    """Call ``action`` until it succeeds, ``deadline`` (monotonic) passes or ``stop`` is set."""
    delay = 0.5
    while True:
        try:
            return action()
        except errors as exc:
            if time.monotonic() + delay > deadline or stop.is_set():
                raise
            logger.info("waiting for %s: %s", what, exc)
        stop.wait(delay)
        delay = min(delay * 2, 5.0)


class Driver:
    """One connection to the simulator and the cycle of actions."""

    def __init__(self, session, stop: threading.Event) -> None:  # session: producer.vcenter.Session
        self.session = session
        self.content = session.content
        self.stop = stop
        self.hosts = self._inventory(vim.HostSystem)
        self.vms = self._inventory(vim.VirtualMachine)
        if not self.hosts:
            raise VCenterError(f"{session.url}: the simulator has no hosts")

    def _inventory(self, kind: type) -> list:
        view = self.content.viewManager.CreateContainerView(self.content.rootFolder, [kind], True)
        try:
            return sorted(view.view, key=lambda obj: obj.name)
        finally:
            view.DestroyView()

    # --- fake vROps

    def register_hosts(self, fake_vrops: str, timeout: float = 10.0) -> int:
        """Create every host in the fake vROps (idempotent); returns how many."""
        for host in self.hosts:
            body = json.dumps({"name": host.name, "moref": host._moId,
                               "vcUuid": self.session.instance_uuid}).encode()
            request = urllib.request.Request(f"{fake_vrops.rstrip('/')}/_fake/hosts", data=body,
                                             headers={"Content-Type": "application/json"},
                                             method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                answer.read()
        return len(self.hosts)

    # --- actions

    def step(self, n: int) -> str:
        """Action number ``n`` (from 0): even ones toggle a host's maintenance mode, odd ones a
        VM's power; each host (and VM) is toggled twice in a row, so it goes there and back."""
        if n % 2 == 0 or not self.vms:
            host = self.hosts[(n // 4) % len(self.hosts)]
            return self.maintenance(host, enter=not host.runtime.inMaintenanceMode)
        vm = self.vms[(n // 4) % len(self.vms)]
        return self.power(vm, on=vm.runtime.powerState != "poweredOn")

    def _wait(self, task: vim.Task) -> str:
        deadline = time.monotonic() + TASK_TIMEOUT
        while task.info.state not in ("success", "error"):
            if time.monotonic() > deadline:
                return f"still {task.info.state} after {TASK_TIMEOUT:.0f}s"
            time.sleep(0.05)
        if task.info.state == "error":
            fault = task.info.error
            return f"error: {type(fault).__name__}: {getattr(fault, 'msg', '') or fault}"
        return "success"

    def _datacenter(self, entity: vim.ManagedEntity) -> vim.Datacenter | None:
        parent = entity.parent
        while parent is not None and not isinstance(parent, vim.Datacenter):
            parent = parent.parent
        return parent

    def maintenance(self, host: vim.HostSystem, enter: bool) -> str:
        """Run the real maintenance-mode task, then post the event a vCenter would post."""
        name = "EnterMaintenanceMode_Task" if enter else "ExitMaintenanceMode_Task"
        task = host.EnterMaintenanceMode_Task(timeout=0) if enter else \
            host.ExitMaintenanceMode_Task(timeout=0)
        outcome = self._wait(task)
        where = f"host {host.name} ({host._moId})"
        if outcome != "success":
            return f"{where}: {name} {outcome}; no event posted"
        cls = vim.event.EnteredMaintenanceModeEvent if enter else \
            vim.event.ExitMaintenanceModeEvent
        datacenter = self._datacenter(host)
        event = cls(key=0, chainId=task.info.eventChainId or 0,
                    createdTime=self.session.si.CurrentTime(),
                    userName=self.session.si.content.sessionManager.currentSession.userName,
                    host=vim.event.HostEventArgument(host=host, name=host.name))
        if datacenter is not None:
            event.datacenter = vim.event.DatacenterEventArgument(datacenter=datacenter,
                                                                 name=datacenter.name)
            event.fullFormattedMessage = (
                f"Host {host.name} in {datacenter.name} has "
                f"{'entered' if enter else 'exited'} maintenance mode")
        if isinstance(host.parent, vim.ComputeResource):
            event.computeResource = vim.event.ComputeResourceEventArgument(
                computeResource=host.parent, name=host.parent.name)
        self.content.eventManager.PostEvent(event)
        state = "entered" if enter else "exited"
        subject = cls.__name__.rsplit(".", 1)[-1]
        return f"{where} {state} maintenance mode ({name} success, {subject} posted)"

    def power(self, vm: vim.VirtualMachine, on: bool) -> str:
        """Power a VM on or off with the real task; the simulator posts the events itself."""
        name = "PowerOnVM_Task" if on else "PowerOffVM_Task"
        task = vm.PowerOnVM_Task() if on else vm.PowerOffVM_Task()
        outcome = self._wait(task)
        where = f"VM {vm.name} ({vm._moId})"
        if outcome != "success":
            return f"{where}: {name} {outcome}"
        return f"{where} powered {'on' if on else 'off'} ({name} success)"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m vebaq.devtools.demo",
        description="Make things happen in a vCenter simulator (hosts in and out of maintenance "
                    "mode, VMs powered off and on) for the vebaq demo. Reads VCENTER_URL, "
                    "VCENTER_USER, VCENTER_PASSWORD and VCENTER_INSECURE_SSL.")
    parser.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                        help="seconds before each action (default: %(default)s)")
    parser.add_argument("--count", type=int, default=None, metavar="N",
                        help="stop after N actions (default: run until stopped)")
    parser.add_argument("--fake-vrops", default=None, metavar="URL",
                        help="register the simulator's hosts in this fake vROps first, e.g. "
                             "http://fake-vrops:8090")
    parser.add_argument("--wait", type=float, default=120.0, metavar="SECONDS",
                        help="how long to wait for the simulator and the fake vROps to answer "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    if args.interval < 0 or (args.count is not None and args.count < 0) or args.wait < 0:
        parser.error("--interval, --count and --wait must not be negative")
    return args


def run(args: argparse.Namespace, stop: threading.Event) -> int:
    settings = config.load().vcenter
    if not settings.url:
        raise ConfigError("VCENTER_URL is not set (the simulator's SDK URL, e.g. "
                          "https://vcsim:8989/sdk)")
    if not settings.username or not settings.password:
        # Any non-empty credentials log in to vcsim.
        settings = replace(settings, username=settings.username or "demo",
                           password=Secret(settings.password.reveal() or "demo"))
    deadline = time.monotonic() + args.wait
    retry(lambda: check_simulator(settings), f"the simulator at {settings.url}", deadline, stop,
          (VCenterError,))
    session = retry(lambda: connect(settings), f"the simulator at {settings.url}", deadline,
                    stop, (VCenterError,))
    try:
        driver = Driver(session, stop)
        logger.info("driving the simulator %s (instance %s): %d hosts, %d VMs, an action every "
                    "%gs%s", settings.url, session.instance_uuid, len(driver.hosts),
                    len(driver.vms), args.interval,
                    f", {args.count} actions" if args.count is not None else "")
        if args.fake_vrops:
            try:
                count = retry(lambda: driver.register_hosts(args.fake_vrops),
                              f"the fake vROps at {args.fake_vrops}", deadline, stop,
                              (OSError,))
            except OSError as exc:
                raise VebaqError(f"cannot register the hosts in the fake vROps at "
                                 f"{args.fake_vrops}: {getattr(exc, 'reason', exc)}") from None
            logger.info("registered %d hosts in the fake vROps at %s", count, args.fake_vrops)
        n = 0
        while args.count is None or n < args.count:
            if stop.wait(args.interval):
                break
            logger.info("%s", driver.step(n))
            n += 1
        logger.info("demo driver stopped after %d action(s)", n)
        return 0
    finally:
        session.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vebaq.devtools.demo``: a line per action; errors as one line and a status."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s demo: %(message)s",
                        stream=sys.stdout)
    logging.getLogger("urllib3").setLevel(logging.WARNING)
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        logger.info("%s: stopping", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return run(args, stop)
    except VebaqError as exc:
        print(f"vebaq.devtools.demo: error: {exc}", file=sys.stderr, flush=True)
        return exc.exit_code
    except OSError as exc:
        print(f"vebaq.devtools.demo: error: {exc}", file=sys.stderr, flush=True)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
