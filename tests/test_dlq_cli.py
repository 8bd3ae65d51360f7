"""``vebaq dlq``: list, show, replay, purge and stats on real Redis, through click's runner."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis
from click.testing import CliRunner, Result

from tests import flaky_functions as flaky
from tests.support import ROOT
from vebaq.cli import cli
from vebaq.core import deadletters, retrystore
from vebaq.core.messages import TaskMessage


@pytest.fixture
def runner(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.delenv("VEBAQ_CONFIG", raising=False)
    monkeypatch.setenv("VEBAQ_BROKER_URL", redis_url)
    monkeypatch.setenv("VEBAQ_FUNCTIONS", "tests.flaky_functions")
    yield CliRunner()


def dlq(runner: CliRunner, *args: str, **kwargs: object) -> Result:
    return runner.invoke(cli, ["dlq", *args], catch_exceptions=False, **kwargs)


def add(r: redis.Redis, subject: str = "DoomedEvent", pool: str = "flaky",
        message: str = "downstream is down") -> str:
    return deadletters.add(r, task_name=subject, pool=pool, function="doomed",
                           event=flaky.structured_event(subject), error=RuntimeError(message),
                           attempt=4)


def test_list_shows_a_table_and_json(runner: CliRunner, redis_client: redis.Redis) -> None:
    assert dlq(runner, "list").output == "no dead letters\n"
    first = add(redis_client, message="x" * 200)
    second = add(redis_client, "OtherEvent", "echo", "line one\nline two")

    result = dlq(runner, "list")
    assert result.exit_code == 0
    header, row1, row2 = result.output.splitlines()
    assert header.split() == ["ID", "SUBJECT", "POOL", "ATTEMPTS", "LAST", "ERROR", "AGE"]
    assert row1.split()[:4] == [first, "DoomedEvent", "flaky", "4"]
    assert "RuntimeError: xxx" in row1 and "x" * 60 not in row1 and "…" in row1
    assert row1.endswith("s")  # age in seconds
    assert "RuntimeError: line one line two" in row2  # one line per dead letter

    listed = json.loads(dlq(runner, "list", "--json").output)
    assert listed == deadletters.list_letters(redis_client)
    assert [r["id"] for r in json.loads(dlq(runner, "list", "--json", "--pool", "echo").output)
            ] == [second]
    only = dlq(runner, "list", "--subject", "DoomedEvent").output
    assert first in only and second not in only


def test_show_prints_one_record(runner: CliRunner, redis_client: redis.Redis) -> None:
    letter_id = add(redis_client)
    result = dlq(runner, "show", letter_id)
    assert result.exit_code == 0
    assert json.loads(result.output) == deadletters.get(redis_client, letter_id)
    assert result.output.startswith("{\n  ")


def test_an_unknown_id_is_one_clear_line(runner: CliRunner) -> None:
    result = dlq(runner, "show", "nope")
    assert result.exit_code == 1
    assert result.stderr == "vebaq: error: no dead letter 'nope' (see `vebaq dlq list`)\n"
    assert result.stdout == ""
    result = dlq(runner, "replay", "nope")
    assert (result.exit_code, result.stderr.count("\n")) == (1, 1)


def test_the_real_command_prints_the_same_line(redis_url: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VEBAQ_")}
    result = subprocess.run([sys.executable, "-m", "vebaq", "dlq", "show", "nope"],
                            env={**env, "VEBAQ_BROKER_URL": redis_url}, cwd=ROOT,
                            capture_output=True, text=True, timeout=60)
    assert (result.returncode, result.stdout) == (1, "")
    assert result.stderr == "vebaq: error: no dead letter 'nope' (see `vebaq dlq list`)\n"


def test_an_unreachable_broker_is_one_line(runner: CliRunner,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEBAQ_BROKER_URL", "redis://:hunter2@127.0.0.1:1/0")
    result = dlq(runner, "stats")
    assert result.exit_code == 4
    assert result.stderr.startswith("vebaq: error: cannot reach Redis at "
                                    "redis://:***@127.0.0.1:1/0: ")
    assert result.stderr.count("\n") == 1 and "hunter2" not in result.stderr


def test_replay_one_or_all_with_filters(runner: CliRunner, redis_client: redis.Redis) -> None:
    first = add(redis_client)
    doomed = [add(redis_client) for _ in range(2)]
    other = add(redis_client, "OtherEvent")
    elsewhere = add(redis_client, pool="echo")

    result = dlq(runner, "replay", first)
    assert (result.exit_code, result.output) == (0, f"replayed 1 dead letter ({first})\n")
    assert redis_client.llen("flaky") == 1

    result = dlq(runner, "replay", "--all", "--subject", "DoomedEvent", "--pool", "flaky")
    assert (result.exit_code, result.output) == (0, "replayed 2 dead letter(s)\n")
    assert redis_client.llen("flaky") == 3
    remaining = {r["id"] for r in deadletters.list_letters(redis_client)}
    assert remaining == {other, elsewhere} and remaining.isdisjoint(doomed)

    result = dlq(runner, "replay", "--all")
    assert result.output == "replayed 2 dead letter(s)\n"
    assert (redis_client.llen("flaky"), redis_client.llen("echo")) == (4, 1)
    assert deadletters.depth(redis_client) == 0


def test_replay_refuses_what_it_cannot_send(runner: CliRunner,
                                            redis_client: redis.Redis) -> None:
    assert dlq(runner, "replay").exit_code == 2  # neither an ID nor --all
    assert dlq(runner, "replay", "x", "--all").exit_code == 2
    assert dlq(runner, "replay", "x", "--pool", "flaky").exit_code == 2

    lost = add(redis_client, pool="gone")
    result = dlq(runner, "replay", lost)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"vebaq: error: dead letter {lost}: pool 'gone' is not a "
                                    "pool of this configuration")
    undecodable = deadletters.add(redis_client, task_name="GoodEvent", pool="flaky",
                                  function=None, event=None, error=ValueError("bad body"),
                                  attempt=1)
    good = add(redis_client)
    result = dlq(runner, "replay", "--all")
    assert result.exit_code == 0
    assert result.stdout == "replayed 1 dead letter(s), skipped 2\n"
    assert f"skipped: dead letter {lost}" in result.stderr
    assert f"skipped: dead letter {undecodable}" in result.stderr
    assert {r["id"] for r in deadletters.list_letters(redis_client)} == {lost, undecodable}
    assert good not in result.stderr


def test_replaying_many_shows_progress(runner: CliRunner, redis_client: redis.Redis,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("vebaq.core.progress.LOG_INTERVAL", 0.0)  # a line per replay, not per 5 s
    for _ in range(250):
        add(redis_client)
    result = dlq(runner, "replay", "--all")
    assert result.stdout == "replayed 250 dead letter(s)\n"
    lines = result.stderr.splitlines()
    assert lines[0].startswith("replaying dead letters [") and " 1/250 " in lines[0]
    assert lines[-1].startswith("replaying dead letters [########################] 100% 250/250")
    assert redis_client.llen("flaky") == 250 and deadletters.depth(redis_client) == 0


def test_purge_asks_first_unless_yes(runner: CliRunner, redis_client: redis.Redis) -> None:
    assert dlq(runner, "purge").output == "no dead letters\n"
    kept = add(redis_client)
    for _ in range(2):
        add(redis_client)

    result = dlq(runner, "purge", input="n\n")
    assert result.exit_code == 1 and "Aborted" in result.output
    assert deadletters.depth(redis_client) == 3

    result = dlq(runner, "purge", kept, input="y\n")
    assert "Delete 1 dead letter(s) for good? [y/N]" in result.output
    assert result.output.endswith("purged 1 dead letter(s)\n")
    assert deadletters.depth(redis_client) == 2

    result = dlq(runner, "purge", "--yes")
    assert (result.exit_code, result.output) == (0, "purged 2 dead letter(s)\n")
    assert deadletters.depth(redis_client) == 0


def test_stats_counts_per_subject_and_pool(runner: CliRunner, redis_client: redis.Redis) -> None:
    for _ in range(2):
        add(redis_client)
    add(redis_client, "OtherEvent", "echo")
    retrystore.schedule(redis_client, TaskMessage("FlakyEvent", {}, "flaky", 2, ("flaky",)),
                        delay=60, last_error="x")

    lines = dlq(runner, "stats").output.splitlines()
    assert [line.split() for line in lines] == [
        ["SUBJECT", "POOL", "COUNT"], ["DoomedEvent", "flaky", "2"], ["OtherEvent", "echo", "1"],
        ["dead", "letters:", "3"], ["retries", "pending:", "1"]]
    assert json.loads(dlq(runner, "stats", "--json").output) == {
        "depth": 3, "retries_pending": 1,
        "counts": [{"subject": "DoomedEvent", "pool": "flaky", "count": 2},
                   {"subject": "OtherEvent", "pool": "echo", "count": 1}]}
