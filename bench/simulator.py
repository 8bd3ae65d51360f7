"""govmomi's vCenter simulator for the benchmark: started once, restarted if it hangs.

govmomi 0.24's simulator can deadlock: ``PostEvent`` runs holding the EventManager's lock and
then locks every collector, while ``DestroyCollector`` runs holding its collector's lock and then
locks the EventManager (``simulator/event_manager.go``). The producer's reader destroys a
collector whenever it re-reads the collector window (it does so under load, when keys are
missing), so posting events while it does can hang the simulator for good. The latency runs
detect that (every call has a timeout) and start over on a fresh simulator.
"""

from __future__ import annotations

import contextlib
import http.client
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

from pyVim.connect import Disconnect, SmartConnect
from pyVmomi import vim

from tests.support import Simulator, build_vcsim

#: Seconds any one SOAP call of the benchmark may take before the simulator counts as hung.
CALL_TIMEOUT = 10


class SimulatorHung(RuntimeError):
    """The simulator stopped answering (see the module docstring)."""


class VcSim:
    """A running simulator; :meth:`restart` replaces it (with a new URL).

    :param log_dir: where ``vcsim.log`` goes; a hung simulator's goroutine dump is kept there
        as ``vcsim-hung-<n>.log``.
    """

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.binary = build_vcsim()
        self.restarts = 0
        self._sim = Simulator(self.binary, log_dir)

    @property
    def url(self) -> str:
        return self._sim.url

    def restart(self) -> str:
        """Stop the simulator (dumping its goroutines to the log first) and start a new one."""
        self.restarts += 1
        self._sim.popen.send_signal(3)  # SIGQUIT: Go prints every goroutine's stack and exits
        try:
            self._sim.popen.wait(10)
        except subprocess.TimeoutExpired:
            self._sim.popen.kill()
        self._sim.stop()
        shutil.copyfile(self._sim.log_path, self.log_dir / f"vcsim-hung-{self.restarts}.log")
        self._sim = Simulator(self.binary, self.log_dir)
        return self.url

    def stop(self) -> None:
        if self._sim.popen.poll() is None:
            self._sim.stop()


class Client:
    """A pyvmomi session whose every call gives up after :data:`CALL_TIMEOUT` seconds."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        try:
            self.si = SmartConnect(protocol=parts.scheme, host=parts.hostname, port=parts.port,
                                   user="vebaq-bench", pwd="bench-password",
                                   disableSslCertValidation=True,
                                   httpConnectionTimeout=CALL_TIMEOUT)
        except Exception as exc:
            raise SimulatorHung(f"cannot log in to the simulator: {exc}") from exc
        self.content = self.si.RetrieveContent()

    def post(self, event: vim.event.Event) -> None:
        """``PostEvent``; raises :class:`SimulatorHung` if the simulator does not answer."""
        try:
            self.content.eventManager.PostEvent(event)
        except (OSError, http.client.HTTPException) as exc:  # timeouts are OSErrors
            raise SimulatorHung(f"PostEvent: {type(exc).__name__}: {exc}") from exc

    def check(self) -> None:
        """Raise :class:`SimulatorHung` unless the simulator answers a trivial call."""
        try:
            self.si.CurrentTime()
        except (OSError, http.client.HTTPException) as exc:
            raise SimulatorHung(f"CurrentTime: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with contextlib.suppress(Exception):  # the simulator may be the reason we close
            Disconnect(self.si)
