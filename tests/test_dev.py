"""``vebaq dev`` (the README's run command): the whole pipeline in one terminal, from nothing."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from tests.support import ROOT, free_port, wait_until

pytestmark = pytest.mark.slow


def test_dev_runs_everything_with_no_broker_and_no_vcenter(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("VCENTER_", "VROPS_", "VEBAQ_", "vrops"))}
    flower_port, metrics_port = free_port(), free_port()
    log = tmp_path / "dev.log"
    with log.open("wb") as out:
        dev = subprocess.Popen([sys.executable, "-m", "vebaq", "dev", "--rate", "3",
                                "--flower-port", str(flower_port), "--metrics-port",
                                str(metrics_port)], cwd=ROOT, env={**env, "PYTHONUNBUFFERED": "1"},
                               stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        text = lambda: log.read_text(errors="replace")  # noqa: E731
        wait_until(lambda: re.search(r"echo \| .*Task \S+\[\S+:echo\] succeeded", text()), 90,
                   "an event echoed")
        wait_until(lambda: re.search(r"vrops \| .*Task \S+MaintenanceModeEvent\[\S+:vrops\] "
                                     r"succeeded", text()), 90, "a maintenance event mirrored")
        output = text()
        assert "broker: embedded (no VEBAQ_BROKER_URL set)" in output
        assert "no vCenter configured" in output and "--simulate" in output
        assert re.search(r"echo \|   data:", output), "the echo pool prints the data"
        state_url = re.search(r"state: (http://127\.0\.0\.1:\d+/_fake/state)", output).group(1)
        with urllib.request.urlopen(state_url, timeout=5) as response:
            states = {r["resourceState"] for r in json.load(response)["resources"].values()}
        assert "MAINTAINED_MANUAL" in states or "STARTED" in states
        with urllib.request.urlopen(f"http://127.0.0.1:{flower_port}/api/tasks",
                                    timeout=5) as response:
            tasks = json.load(response)
        assert any(t["name"].endswith("Event") for t in tasks.values())
    finally:
        dev.send_signal(signal.SIGINT)  # Ctrl-C
        status = dev.wait(60)
    output = log.read_text(errors="replace")
    assert status == 0, output[-3000:]
    assert output.rstrip().endswith("vebaq dev | stopped")
    assert "Traceback" not in output
