"""Replays from the archive on real Redis (the queued messages are read back, no worker): time
windows in order, today's routing, done markers, --force, --pool, --function, dry runs, Ctrl-C
between batches, the time options; the worker's side of --force; and ``vebaq replay`` /
``vebaq archive stats`` through click's runner."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any

import pytest
import redis
from celery import Celery
from click.testing import CliRunner

from tests import flaky_functions as flaky
from tests.archived_events import BASE, NOW, SOURCE, UUID, events, ids
from vebaq.cli import cli
from vebaq.core import deadletters, done, keys, retrystore
from vebaq.core.archive import Archive
from vebaq.core.broker import sender_app
from vebaq.core.config import Settings
from vebaq.core.messages import TaskMessage
from vebaq.core.publish import Publisher
from vebaq.core.replay import BadTime, Handler, Request, describe, parse_moment, run
from vebaq.core.routing import DEFAULT_TRIGGERS
from workers import execution, retries
from workers.retries import Failure

MAINTENANCE = frozenset({"EnteredMaintenanceModeEvent", "ExitMaintenanceModeEvent"})
#: The built-in pools as the replay sees them.
POOLS = {"echo": [Handler("echo")], "vrops": [Handler("vrops", MAINTENANCE)]}


@pytest.fixture
def app(redis_url: str) -> Iterator[Celery]:
    sender = sender_app(Settings(broker_url=redis_url), "vebaq-test-replay")
    yield sender
    sender.close()


@pytest.fixture
def archived(redis_client: redis.Redis) -> list[tuple[dict[str, Any], datetime]]:
    """300 events one second apart from :data:`BASE`, archived."""
    stream = events(300)
    archive = Archive(redis_client)
    archive.append(UUID, SOURCE, stream, now=NOW)
    archive.settle(UUID, ids(stream))
    return stream


def request(**fields: Any) -> Request:
    window = {"since": BASE + timedelta(seconds=100), "until": BASE + timedelta(seconds=199)}
    return Request(**{**window, "instance_uuids": (UUID,), "triggers": DEFAULT_TRIGGERS,
                      "pools": POOLS, **fields})


def queued(r: redis.Redis, pool: str) -> list[dict[str, Any]]:
    """The messages in a pool's queue in the order workers take them (kombu pushes on the left
    and pops on the right)."""
    return list(reversed(flaky.queued(r, pool)))


def test_a_window_goes_out_in_order_marked_with_the_same_ids(
        redis_client: redis.Redis, app: Celery, archived: list) -> None:
    summary = run(Archive(redis_client), Publisher(app), request(), batch=40)
    window = [e for e, _ in archived[100:200]]
    maintenance = [e for e in window if e["subject"] in MAINTENANCE]
    assert (summary.matched, summary.enqueued, summary.skipped) == (100, 100, 0)
    assert summary.per_pool == {"echo": 100, "vrops": len(maintenance)} and maintenance

    echo = queued(redis_client, "echo")
    assert [m["kwargs"]["event"]["id"] for m in echo] == [e["id"] for e in window]
    first = echo[0]
    assert first["headers"]["id"] == f"{window[0]['id']}:echo:replay-{summary.token}"
    assert first["headers"]["task"] == window[0]["subject"]
    event = first["kwargs"]["event"]
    assert event["replayed"] is True and event["replayedat"].endswith("Z")
    assert {k: v for k, v in event.items() if k not in ("replayed", "replayedat")} == window[0]
    assert "force" not in first["kwargs"] and "functions" not in first["kwargs"]
    assert [m["kwargs"]["event"]["id"] for m in queued(redis_client, "vrops")] == \
        [e["id"] for e in maintenance]
    assert "replay-" in describe(summary)


def test_done_markers_suppress_what_ran_and_force_runs_it_again(
        redis_client: redis.Redis, app: Celery, archived: list) -> None:
    window = [e for e, _ in archived[100:200]]
    for event in window[:60]:  # echo ran for these; vrops for every maintenance event
        done.mark_done(redis_client, "echo", "echo", event["id"])
    for event in window:
        if event["subject"] in MAINTENANCE:
            done.mark_done(redis_client, "vrops", "vrops", event["id"])
    summary = run(Archive(redis_client), Publisher(app), request())
    assert (summary.matched, summary.enqueued, summary.already_done) == (100, 40, 60)
    assert [m["kwargs"]["event"]["id"] for m in queued(redis_client, "echo")] == \
        [e["id"] for e in window[60:]]
    assert redis_client.llen("vrops") == 0

    redis_client.delete("echo")
    forced = run(Archive(redis_client), Publisher(app), request(force=True))
    assert (forced.enqueued, forced.already_done) == (100, 0)
    messages = queued(redis_client, "echo")
    assert len(messages) == 100
    assert {m["kwargs"]["force"] for m in messages} == {forced.token} != {summary.token}


def test_pool_function_and_subject_choose_what_is_sent(
        redis_client: redis.Redis, app: Celery, archived: list) -> None:
    window = [e for e, _ in archived[100:200]]
    maintenance = [e for e in window if e["subject"] in MAINTENANCE]
    only_vrops = run(Archive(redis_client), Publisher(app), request(function="vrops"))
    assert (only_vrops.enqueued, only_vrops.not_routed) == \
        (len(maintenance), 100 - len(maintenance))
    messages = queued(redis_client, "vrops")
    assert {tuple(m["kwargs"]["functions"]) for m in messages} == {("vrops",)}
    assert redis_client.llen("echo") == 0

    redis_client.delete("vrops")
    to_echo = run(Archive(redis_client), Publisher(app),
                  request(pool="echo", subjects=("EnteredMaintenanceModeEvent",)))
    entered = [e["id"] for e in window if e["subject"] == "EnteredMaintenanceModeEvent"]
    assert [m["kwargs"]["event"]["id"] for m in queued(redis_client, "echo")] == entered
    assert to_echo.matched == len(entered) and redis_client.llen("vrops") == 0


def test_a_dry_run_counts_and_sends_nothing(redis_client: redis.Redis, app: Celery,
                                            archived: list) -> None:
    for event, _ in archived[100:150]:
        done.mark_done(redis_client, "echo", "echo", event["id"])
    summary = run(Archive(redis_client), None, request(pool="echo"))
    assert (summary.matched, summary.enqueued, summary.already_done) == (100, 50, 50)
    assert redis_client.llen("echo") == 0 and "would enqueue 50" in describe(summary, True)


class StopAfter(Publisher):
    """Ctrl-C pressed while the first batch is being sent."""

    def __init__(self, app: Celery, stop: threading.Event) -> None:
        super().__init__(app)
        self.stop = stop

    def publish(self, messages: Sequence[TaskMessage]) -> int:
        sent = super().publish(messages)
        self.stop.set()
        return sent


def test_ctrl_c_stops_between_batches_and_names_where_to_resume(
        redis_client: redis.Redis, app: Celery, archived: list) -> None:
    stop = threading.Event()
    summary = run(Archive(redis_client), StopAfter(app, stop), request(pool="echo"), stop=stop,
                  batch=30)
    window = [e for e, _ in archived[100:200]]
    assert [m["kwargs"]["event"]["id"] for m in queued(redis_client, "echo")] == \
        [e["id"] for e in window[:30]]
    assert (summary.matched, summary.enqueued) == (30, 30)
    assert summary.stopped_at.event["id"] == window[30]["id"]
    resume = archived[130][1].isoformat().replace("+00:00", "Z")
    assert f"resume with --since {resume}" in describe(summary)

    # resuming from there sends the rest, nothing twice
    rest = run(Archive(redis_client), Publisher(app),
               request(pool="echo", since=archived[130][1]))
    assert rest.enqueued == 70
    assert [m["kwargs"]["event"]["id"] for m in queued(redis_client, "echo")] == \
        [e["id"] for e in window]


def test_since_and_until_take_durations_and_rfc3339_times() -> None:
    now = datetime(2025, 6, 10, 12, 0, tzinfo=UTC)
    assert parse_moment("2h", now, "--since") == now - timedelta(hours=2)
    assert parse_moment("7d", now, "--since") == now - timedelta(days=7)
    assert parse_moment("PT15M", now, "--since") == now - timedelta(minutes=15)
    assert parse_moment("now", now, "--until") == now
    assert parse_moment("2025-06-03T14:00:00Z", now, "--since") == BASE
    assert parse_moment("2025-06-03T16:00:00+02:00", now, "--since") == BASE
    with pytest.raises(BadTime, match=r"^--since: .* has no time zone: add Z"):
        parse_moment("2025-06-03T14:00:00", now, "--since")
    with pytest.raises(BadTime, match=r"^--until: expected a duration such as 2h or 7d, or an "
                                      r"RFC 3339 time .*got 'last tuesday'$"):
        parse_moment("last tuesday", now, "--until")


# --- the worker's side of --force


def handle(redis_url: str, message: TaskMessage) -> dict[str, Any]:
    task = SimpleNamespace(name=message.subject, request=SimpleNamespace(id=message.task_id),
                           app=SimpleNamespace(conf=SimpleNamespace(broker_url=redis_url)))
    return execution.handle(task, message.kwargs())


def test_a_forced_replay_runs_a_function_once_more_and_not_on_its_redelivery(
        redis_url: str, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VEBAQ_BROKER_URL", redis_url)  # where the test functions count
    event = flaky.structured_event("GoodEvent")
    first = TaskMessage("GoodEvent", event, "flaky")
    assert handle(redis_url, first)["ran"] == ["good"]
    assert handle(redis_url, first)["duplicates_suppressed"] == ["good"]
    forced = TaskMessage("GoodEvent", {**event, "replayed": True}, "flaky",
                         id_suffix="replay-aaaa", force="aaaa")
    parsed = TaskMessage.parse("GoodEvent", forced.kwargs())
    assert parsed.force == "aaaa"
    assert handle(redis_url, parsed)["ran"] == ["good"]
    assert handle(redis_url, parsed)["duplicates_suppressed"] == ["good"]  # its redelivery
    assert handle(redis_url, first)["duplicates_suppressed"] == ["good"]  # still done
    again = TaskMessage("GoodEvent", event, "flaky", id_suffix="replay-bbbb", force="bbbb")
    assert handle(redis_url, again)["ran"] == ["good"]
    assert redis_client.lrange(flaky.successes_key("good"), 0, -1) == [event["id"].encode()] * 3


def test_a_forced_replay_that_fails_stays_forced_in_its_retry_and_dead_letter(
        redis_client: redis.Redis) -> None:
    event = flaky.structured_event("FlakyEvent", {"fail_times": 9})
    done.mark_done(redis_client, "flaky", "flaky", event["id"])  # ran before the "fix"
    forced = TaskMessage("FlakyEvent", event, "flaky", force="cafe")
    task = SimpleNamespace(name="FlakyEvent", request=SimpleNamespace(id="t"))
    with pytest.raises(retries.Retry):
        retries.handle_failures(task, redis_client, forced, [Failure("flaky", ValueError("x"))])
    redis_client.zadd(keys.RETRIES_DUE, {k: 0 for k in redis_client.zrange(keys.RETRIES_DUE,
                                                                           0, -1)})
    [claimed] = retrystore.claim(redis_client)
    assert claimed.message.force == "cafe" and claimed.message.attempt == 2
    with pytest.raises(retries.DeadLettered) as raised:
        retries.handle_failures(task, redis_client, TaskMessage(
            "FlakyEvent", event, "flaky", 9, force="cafe"), [Failure("flaky", ValueError("x"))])
    letter = deadletters.get(redis_client, raised.value.letter_ids[0])
    assert deadletters.replay_message(letter).force == "cafe"


# --- the commands


@pytest.fixture
def runner(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.delenv("VEBAQ_CONFIG", raising=False)
    monkeypatch.delenv("VEBAQ_FUNCTIONS", raising=False)
    monkeypatch.setenv("VEBAQ_BROKER_URL", redis_url)
    yield CliRunner()


def test_replay_and_archive_stats_commands(runner: CliRunner, redis_client: redis.Redis,
                                           archived: list) -> None:
    window = ["--since", "2025-06-03T14:01:40Z", "--until", "2025-06-03T14:03:19Z"]
    result = runner.invoke(cli, ["replay", *window, "--pool", "echo", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("dry run: 2025-06-03T14:01:40Z – 2025-06-03T14:03:19Z: "
                                    "matched 100 event(s); would enqueue 100 (100 task(s): "
                                    "echo: 100)")
    assert redis_client.llen("echo") == 0
    result = runner.invoke(cli, ["replay", *window, "--subject", "UserLoginSessionEvent",
                                 "--source", SOURCE])
    logins = [e for e, _ in archived[100:200] if e["subject"] == "UserLoginSessionEvent"]
    assert result.exit_code == 0 and f"enqueued {len(logins)} " in result.stdout
    assert redis_client.llen("echo") == len(logins)

    stats = runner.invoke(cli, ["archive", "stats"])
    assert stats.exit_code == 0
    assert "archive on; bounds per vCenter: 7d, 1,000,000 events, 256.0 MiB" in stats.stdout
    assert SOURCE in stats.stdout and "300" in stats.stdout
    as_json = json.loads(runner.invoke(cli, ["archive", "stats", "--json"]).stdout)
    [source] = as_json["sources"]
    assert source["events"] == 300 and sum(source["subjects"].values()) == 300
    assert source["oldest"] == "2025-06-03T14:00:00Z" and source["bytes_per_event"] > 500


@pytest.mark.parametrize(("args", "message"), [
    (["--since", "yesterday"], "vebaq: error: --since: expected a duration such as 2h"),
    (["--since", "1h", "--until", "2h"], "vebaq: error: --until ("),
    (["--since", "1h", "--pool", "nope"], "--pool: unknown pool 'nope' (known: "),
    (["--since", "1h", "--function", "nope"], "--function: no function 'nope' in any pool"),
    (["--since", "1h", "--source", "https://other/sdk"],
     "vebaq: error: --source: no archive of 'https://other/sdk' (archived sources: "),
])
def test_bad_replay_options_are_one_line(runner: CliRunner, archived: list, args: list[str],
                                         message: str) -> None:
    result = runner.invoke(cli, ["replay", *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_progress_is_a_line_per_interval_off_a_terminal(
        redis_client: redis.Redis, app: Celery, archived: list,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from vebaq.core.progress import Progress

    monkeypatch.setattr("vebaq.core.progress.LOG_INTERVAL", 0.0)
    out = io.StringIO()
    run(Archive(redis_client), Publisher(app), request(pool="echo"), batch=25,
        progress=Progress("replaying", None, stream=out))
    lines = out.getvalue().splitlines()
    assert len(lines) == 5  # after each of the 4 batches, and the end
    assert lines[0].startswith("replaying [######------------------]  24% 25 (")
    assert lines[-1].startswith("replaying [########################] 100% 100 (")
