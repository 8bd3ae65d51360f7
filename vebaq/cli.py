"""The ``vebaq`` command: ``producer``, ``ingress``, ``worker``, ``dev``, ``status`` and friends.

Every :class:`~vebaq.core.errors.VebaqError` ends the command with one line on stderr and the
error's exit status; no traceback, no secret.

Each command imports the producer, the workers or the dev tools when it runs, not at the top:
``vebaq --help``, a usage error or a ``dlq`` command start without importing Celery's worker,
pyvmomi's ~450 event classes and every function module (these imports dodge no cycle: the CLI
is the top layer).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable
from functools import cached_property
from typing import TYPE_CHECKING

import click

from vebaq.core import config, deadletters, retrystore
from vebaq.core.errors import (
    BadOption,
    BrokerError,
    NoSuchDeadLetter,
    NotReplayable,
    VebaqError,
    error_line,
    one_line,
)
from vebaq.core.progress import Progress
from vebaq.core.secrets import redact_url

if TYPE_CHECKING:
    import redis

    from vebaq.core.publish import Publisher
    from vebaq.core.replay import Handler as ReplayHandler

logger = logging.getLogger("vebaq")


def load_settings(path: str | None) -> config.Settings:
    """Settings with triggers checked against the pools the function modules register (the
    producer too: a trigger naming a pool no worker serves would fill a queue nobody reads)."""
    from workers.settings import load_settings as load

    return load(path)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vebaq")
def cli() -> None:
    """vCenter events → CloudEvents → Celery worker pools on Redis."""


@cli.command()
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG).")
@click.option("--metrics-port", envvar="VEBAQ_METRICS_PORT", type=int, default=8080,
              show_default=True, help="Port for /metrics, /stats and /healthz; 0 disables.")
@click.option("--log-level", envvar="VEBAQ_LOG_LEVEL", default="INFO", show_default=True)
@click.option("--simulate", is_flag=True,
              help="Read the built-in simulated event source instead of vCenter.")
@click.option("--rate", type=float, default=2.0, show_default=True,
              help="With --simulate: events per second.")
@click.option("--backlog", type=int, default=0, show_default=True,
              help="With --simulate: events already waiting at start.")
def producer(config_path: str | None, metrics_port: int, log_level: str, simulate: bool,
             rate: float, backlog: int) -> None:
    """Read vCenter events and enqueue them to the worker pools.

    Reads every configured vCenter (vcenters in the config file), each in its own thread; several
    producers on one Redis share the vCenters out, each read by one of them at a time."""
    from vebaq.core import logs

    settings = load_settings(config_path)
    logs.setup(log_level, settings.secrets())
    from producer.metrics import serve
    from producer.supervisor import Supervisor

    service = Supervisor(settings, simulate={"rate": rate, "backlog": backlog}
                         if simulate else None)
    if metrics_port:
        serve(service.metrics, metrics_port)

    def stop(signum: int, _frame: object) -> None:
        logger.info("%s: finishing the current batch, then stopping",
                    signal.Signals(signum).name)
        service.stop.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    service.run()


@cli.command()
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG).")
@click.option("--bind", default=None, help="Address to listen on (default: ingress.bind, 0.0.0.0).")
@click.option("--port", type=int, default=None,
              help="Port (default: ingress.port or VEBAQ_INGRESS_PORT, 8081).")
@click.option("--log-level", envvar="VEBAQ_LOG_LEVEL", default="INFO", show_default=True)
def ingress(config_path: str | None, bind: str | None, port: int | None, log_level: str) -> None:
    """Accept CloudEvents over HTTP and enqueue them to the pools.

    Binary, structured and batch mode, with a bearer token (VEBAQ_INGRESS_TOKEN) or basic
    auth; routed by the same triggers as vCenter events. Answers 202 once Redis holds the tasks,
    503 while Redis is unavailable."""
    import threading

    from vebaq.core import logs

    settings = load_settings(config_path)
    logs.setup(log_level, settings.secrets())
    from producer.ingress import Ingress, serve

    service = Ingress(settings)
    if not service.healthy():
        logger.warning("Redis at %s does not answer yet: requests get 503 until it does",
                       redact_url(settings.broker_url))
    server = serve(service, bind, port)
    host, listening = server.server_address[:2]
    logger.info("ingress listening on http://%s:%d%s (%s auth); enqueueing to %s", host,
                listening, settings.ingress.path,
                "bearer token" if settings.ingress.token else "basic", redact_url(
                    settings.broker_url))
    stopping = threading.Event()

    def stop(signum: int, _frame: object) -> None:
        logger.info("%s: answering the requests in progress, then stopping",
                    signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    stopping.wait()
    server.stop()
    logger.info("ingress stopped")


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--pool", "pools", multiple=True, required=True,
              help="Pool (queue) to consume; repeat for several.")
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes/threads (default: CPU count; an HTTP pool's sink "
                   "concurrency).")
@click.option("--pool-impl", "-P", type=click.Choice(["prefork", "threads", "solo"]),
              default=None, help="Celery execution pool (default: prefork; threads for vrops "
                                 "and HTTP pools).")
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path())
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(pools: tuple[str, ...], concurrency: int | None, pool_impl: str | None,
           config_path: str | None, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker for POOL(s); extra arguments go to ``celery worker``."""
    if config_path:  # the worker app (and its prefork children) read it from there
        os.environ["VEBAQ_CONFIG"] = config_path
    from workers.pools import POOLS
    from workers.settings import settings

    sinks = settings().sinks  # once per process: the worker app below uses the same

    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise VebaqError(f"--pool: unknown pool {unknown[0]!r} (known: {', '.join(sorted(POOLS))})")
    from workers.celery import app

    argv = ["worker", "-Q", ",".join(pools), "-n", f"{'+'.join(pools)}@%h",
            "--loglevel", "INFO", "-E"]
    # HTTP pools and vrops wait on the network: threads, as many as the sinks allow at once.
    http_only = all(p in sinks for p in pools)
    if not concurrency and http_only:
        concurrency = max(sinks[p].concurrency for p in pools)
    if concurrency:
        argv += ["-c", str(concurrency)]
    if pool_impl or pools == ("vrops",) or http_only:
        argv += ["-P", pool_impl or "threads"]
    app.worker_main([*argv, *celery_args])


@cli.command()
@click.option("--pool", "pools", multiple=True, default=("echo", "vrops"), show_default=True,
              help="Pools to run a worker for.")
@click.option("--simulate/--no-simulate", default=None,
              help="Use the built-in simulated event source (default: when VCENTER_URL is unset).")
@click.option("--rate", type=float, default=1.0, show_default=True,
              help="Simulated events per second.")
@click.option("--flower-port", type=int, default=5555, show_default=True)
@click.option("--metrics-port", type=int, default=8080, show_default=True)
def dev(pools: tuple[str, ...], simulate: bool | None, rate: float, flower_port: int,
        metrics_port: int) -> None:
    """Run the whole pipeline in one terminal: broker, producer, workers, Flower."""
    from vebaq.core import redisdb
    from vebaq.devtools import dev as dev_mode

    settings = load_settings(None)  # refuse a bad config before starting anything
    if os.environ.get("VEBAQ_BROKER_URL"):  # and a Redis that refuses us
        redisdb.check(settings.broker_url, settings.secrets())
    sys.exit(dev_mode.run(pools, simulate, rate, flower_port, metrics_port))


# --- dead letters, the archive and replays: commands on the broker's Redis


class CommandError(click.ClickException):
    """A :class:`VebaqError` raised inside a broker command (``dlq``, ``archive``, ``replay``),
    shown like :func:`main` shows one (``vebaq: error: …``, one line, the error's exit status),
    also when click runs the command itself (``standalone_mode``, ``CliRunner``)."""

    def __init__(self, error: VebaqError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code

    def show(self, file: object = None) -> None:
        click.echo(error_line(self.format_message()), err=True)


def _one_line_errors(ctx: click.Context, invoke: Callable[[click.Context], object]) -> object:
    import redis
    from kombu.exceptions import KombuError, OperationalError

    from vebaq.core.redisdb import explain_redis_error

    try:
        return invoke(ctx)
    except VebaqError as exc:
        raise CommandError(exc) from None
    except (redis.RedisError, OperationalError, KombuError) as exc:
        store = ctx.obj if isinstance(ctx.obj, BrokerStore) else None
        broker = store.broker() if store else "?"
        r = store.__dict__.get("redis") if store else None
        raise CommandError(BrokerError(f"broker {broker}: {explain_redis_error(exc, r)}")) \
            from None


class BrokerGroup(click.Group):
    """Turns vebaq's and the broker's errors in its commands into one line (see
    :class:`CommandError`)."""

    def invoke(self, ctx: click.Context) -> object:
        return _one_line_errors(ctx, super().invoke)


class BrokerCommand(click.Command):
    """:class:`BrokerGroup` for a command of its own."""

    def invoke(self, ctx: click.Context) -> object:
        return _one_line_errors(ctx, super().invoke)


class BrokerStore:
    """What the broker commands work on, made on first use: the settings, the broker's Redis,
    and a Celery app for replays."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    @cached_property
    def settings(self) -> config.Settings:
        return load_settings(self.config_path)

    @cached_property
    def redis(self) -> redis.Redis:
        from vebaq.core.redisdb import check, connect

        check(self.settings.broker_url, self.settings.secrets())  # one line if it refuses us
        return connect(self.settings.broker_url, socket_timeout=30)

    @cached_property
    def publisher(self) -> Publisher:
        from vebaq.core.broker import sender_app
        from vebaq.core.publish import Publisher

        return Publisher(sender_app(self.settings, "vebaq-dlq"))

    @property
    def pools(self) -> set[str]:
        """The pools the configured function modules and sinks register."""
        from workers.pools import load_functions
        from workers.sinks import register_sinks

        return load_functions(self.settings.functions) | register_sinks(self.settings)

    @property
    def handlers(self) -> dict[str, list[ReplayHandler]]:
        """Pool → the functions the configured modules register for it."""
        from vebaq.core.replay import Handler
        from workers.pools import POOLS

        self.pools  # noqa: B018 - imports the function modules
        return {pool: [Handler(f.name, f.subjects) for f in functions]
                for pool, functions in POOLS.items()}

    def broker(self) -> str:
        """The broker URL without its password, for error messages."""
        settings = self.__dict__.get("settings")
        return redact_url(settings.broker_url) if settings else "(not configured yet)"

    def close(self) -> None:
        if "publisher" in self.__dict__:
            self.__dict__["publisher"].app.close()
        if "redis" in self.__dict__:
            self.__dict__["redis"].close()


def _age(seconds: float) -> str:
    """``42s``, ``5m``, ``3h``, ``2d``."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(v)) for v in column) for column in zip(header, *rows, strict=True)]
    return "\n".join("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in (header, *rows))


def _cell(value: object) -> str:
    return "-" if value is None or value == "" else str(value)


#: Characters of the error shown by ``dlq list``.
LIST_ERROR_WIDTH = 60


@cli.group(cls=BrokerGroup)
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG); gives the broker URL.")
@click.pass_context
def dlq(ctx: click.Context, config_path: str | None) -> None:
    """Dead letters: list, show, replay, purge, stats.

    A dead letter is an event whose function failed for good (last retry, or a permanent
    error), or a message no worker could use."""
    ctx.obj = BrokerStore(config_path)
    ctx.call_on_close(ctx.obj.close)


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Full records as a JSON array.")
@click.option("--subject", help="Only dead letters of this event subject (task name).")
@click.option("--pool", help="Only dead letters of this pool.")
@click.pass_obj
def dlq_list(store: BrokerStore, as_json: bool, subject: str | None,
             pool: str | None) -> None:
    """List the dead letters, oldest first."""
    import time

    letters = deadletters.list_letters(store.redis, subject=subject, pool=pool)
    if as_json:
        click.echo(json.dumps(letters, indent=2, ensure_ascii=False))
        return
    if not letters:
        click.echo("no dead letters")
        return
    now = time.time()
    rows = [(rec["id"], _cell(rec.get("task")), _cell(rec.get("pool")), _cell(rec.get("attempts")),
             one_line(f"{rec.get('exception')}: {rec.get('error')}", LIST_ERROR_WIDTH),
             _age(now - float(rec.get("last_failed_at") or rec.get("failed_at") or now)))
            for rec in letters]
    click.echo(_table(("ID", "SUBJECT", "POOL", "ATTEMPTS", "LAST ERROR", "AGE"), rows))


@dlq.command("show")
@click.argument("letter_id", metavar="ID")
@click.pass_obj
def dlq_show(store: BrokerStore, letter_id: str) -> None:
    """Print one dead letter as JSON (CloudEvent, error, traceback)."""
    click.echo(json.dumps(deadletters.get(store.redis, letter_id), indent=2,
                          ensure_ascii=False))


@dlq.command("replay")
@click.argument("letter_id", metavar="[ID]", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter (see the filters).")
@click.option("--subject", help="With --all: only this event subject.")
@click.option("--pool", help="With --all: only this pool.")
@click.pass_obj
def dlq_replay(store: BrokerStore, letter_id: str | None, replay_all: bool,
               subject: str | None, pool: str | None) -> None:
    """Send dead letters to their pool again.

    Each goes as a first attempt of the function that failed, and its record is deleted once
    the broker has the message. An event the producer could not convert is converted again and
    sent to the pools today's triggers route it to."""
    from producer import unconverted

    if bool(letter_id) == replay_all:
        raise click.UsageError("give one dead letter ID, or --all")
    if not replay_all and (subject or pool):
        raise click.UsageError("--subject and --pool go with --all")
    r, pools = store.redis, store.pools

    def replay(record: dict) -> str:
        """Replay one record; returns where it went, for the output."""
        if unconverted.is_producer_letter(record):
            sent: set[str] = set()

            def reconverted(record: dict) -> list:
                messages = list(unconverted.replay_messages(record, store.settings))
                sent.update(message.pool for message in messages)
                return messages

            deadletters.replay(store.publisher, r, record["id"], reconverted)
            return (f"converted again, sent to {', '.join(sorted(sent))}" if sent else
                    "converted again; no trigger routes it to a pool today, nothing sent")
        if record.get("pool") not in pools:
            raise NotReplayable(
                f"dead letter {record['id']}: pool {record.get('pool')!r} is not a pool of this "
                f"configuration (known: {', '.join(sorted(pools))})")
        deadletters.replay(store.publisher, r, record["id"])
        return ""

    if letter_id:
        where = replay(deadletters.get(r, letter_id))
        click.echo(f"replayed 1 dead letter ({letter_id})" + (f": {where}" if where else ""))
        return
    letters = deadletters.list_letters(r, subject=subject, pool=pool)
    replayed, skipped = 0, []
    progress = Progress("replaying dead letters", len(letters))
    for record in letters:
        try:
            replay(record)
        except NoSuchDeadLetter:
            continue  # replayed or purged meanwhile
        except NotReplayable as exc:
            skipped.append(str(exc))
            continue
        replayed += 1
        progress.update(replayed)
    progress.finish(replayed)
    for reason in skipped:
        click.echo(f"skipped: {reason}", err=True)
    click.echo(f"replayed {replayed} dead letter(s)"
               + (f", skipped {len(skipped)}" if skipped else ""))


@dlq.command("purge")
@click.argument("letter_ids", metavar="[ID]...", nargs=-1)
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@click.pass_obj
def dlq_purge(store: BrokerStore, letter_ids: tuple[str, ...], yes: bool) -> None:
    """Delete the given dead letters, or all of them, for good."""
    count = len(letter_ids) if letter_ids else deadletters.depth(store.redis)
    if count == 0:
        click.echo("no dead letters")
        return
    if not yes:
        click.confirm(f"Delete {count} dead letter(s) for good?", abort=True)
    purged = deadletters.purge(store.redis, list(letter_ids) or None)
    click.echo(f"purged {purged} dead letter(s)")


@dlq.command("stats")
@click.option("--json", "as_json", is_flag=True, help="As a JSON object.")
@click.pass_obj
def dlq_stats(store: BrokerStore, as_json: bool) -> None:
    """Dead letters per subject and pool, and retries waiting."""
    counts = sorted(deadletters.counts(store.redis).items(), key=lambda kv: (-kv[1], str(kv[0])))
    depth, pending = deadletters.depth(store.redis), retrystore.pending(store.redis)
    if as_json:
        click.echo(json.dumps({
            "depth": depth, "retries_pending": pending,
            "counts": [{"subject": s, "pool": p, "count": n} for (s, p), n in counts]}, indent=2))
        return
    if counts:
        click.echo(_table(("SUBJECT", "POOL", "COUNT"),
                          [(_cell(s), _cell(p), str(n)) for (s, p), n in counts]))
    click.echo(f"dead letters: {depth}")
    click.echo(f"retries pending: {pending}")


# --- the event archive


def _moment(moment: object) -> str:
    from datetime import datetime

    if not isinstance(moment, datetime):
        return "-"
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


def _size(count: int | None) -> str:
    if count is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.1f} {unit}"
    return f"{count} B"


@cli.group(cls=BrokerGroup)
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG); gives the broker URL.")
@click.pass_context
def archive(ctx: click.Context, config_path: str | None) -> None:
    """The event archive: every event the producer enqueued, kept for `vebaq replay`."""
    ctx.obj = BrokerStore(config_path)
    ctx.call_on_close(ctx.obj.close)


@archive.command("stats")
@click.option("--json", "as_json", is_flag=True, help="As a JSON object.")
@click.pass_obj
def archive_stats(store: BrokerStore, as_json: bool) -> None:
    """Per vCenter: events, bytes, oldest and newest event, events per subject."""
    from vebaq.core.archive import Archive

    bounds = store.settings.archive
    archived = Archive(store.redis, bounds)
    stats = [archived.stats(uuid, memory=True) for uuid in sorted(archived.sources())]
    limits = {"enabled": bounds.enabled, "max_age_seconds": bounds.max_age,
              "max_entries": bounds.max_entries, "max_bytes": bounds.max_bytes}
    if as_json:
        click.echo(json.dumps({"bounds": limits, "sources": [
            {"source": s.source, "vcenter_uuid": s.instance_uuid, "events": s.length,
             "bytes": s.bytes, "memory_usage": s.memory, "oldest": _moment(s.oldest),
             "newest": _moment(s.newest),
             "bytes_per_event": round(s.memory / s.length) if s.length and s.memory else None,
             "subjects": dict(sorted(s.subjects.items(), key=lambda kv: (-kv[1], kv[0])))}
            for s in stats]}, indent=2))
        return
    state = "on" if bounds.enabled else "off (archive.enabled: false)"
    click.echo(f"archive {state}; bounds per vCenter: {_age(bounds.max_age)}, "
               f"{bounds.max_entries:,} events, {_size(bounds.max_bytes)}")
    if not stats:
        click.echo("no archived events")
        return
    click.echo(_table(("SOURCE", "EVENTS", "BYTES", "MEMORY USAGE", "OLDEST", "NEWEST"),
                      [(s.source, f"{s.length:,}", _size(s.bytes), _size(s.memory),
                        _moment(s.oldest), _moment(s.newest)) for s in stats]))
    for s in stats:
        if s.subjects:
            click.echo(f"\n{s.source}")
            rows = sorted(s.subjects.items(), key=lambda kv: (-kv[1], kv[0]))
            click.echo(_table(("SUBJECT", "EVENTS"), [(k, f"{v:,}") for k, v in rows]))


@cli.command(cls=BrokerCommand)
@click.option("--since", required=True, metavar="WHEN",
              help="Events created at or after this: a duration back from now (2h, 7d) or an "
                   "RFC 3339 time (2025-06-03T14:00:00Z).")
@click.option("--until", metavar="WHEN", help="… and at or before this (default: now).")
@click.option("--subject", "subjects", multiple=True,
              help="Only this event subject; repeat for several.")
@click.option("--source", "sources", multiple=True,
              help="Only this vCenter (its source URL); repeat for several.")
@click.option("--pool", help="Send to this pool instead of where today's triggers route.")
@click.option("--function", "function", help="Run only this function.")
@click.option("--dry-run", is_flag=True, help="Count what would be replayed; send nothing.")
@click.option("--force", is_flag=True,
              help="Run functions again that already ran for the event (after a fix).")
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG).")
@click.pass_context
def replay(ctx: click.Context, since: str, until: str | None, subjects: tuple[str, ...],
           sources: tuple[str, ...], pool: str | None, function: str | None, dry_run: bool,
           force: bool, config_path: str | None) -> None:
    """Re-enqueue archived events, in their original order.

    They go to the pools today's triggers route them to (or to --pool), marked with the
    CloudEvent extensions replayed and replayedat, with their ids unchanged. Functions that
    already ran for an event are not run again unless --force. Ctrl-C stops after the batch
    being sent."""
    from datetime import UTC, datetime

    from vebaq.core import replay as replays
    from vebaq.core.archive import Archive

    store = ctx.obj = BrokerStore(config_path)
    ctx.call_on_close(store.close)
    now = datetime.now(UTC)
    begin = replays.parse_moment(since, now, "--since")
    end = replays.parse_moment(until, now, "--until") if until else None
    if end is not None and end < begin:
        raise BadOption(f"--until ({_moment(end)}) is before --since ({_moment(begin)})")
    settings = store.settings
    handlers = store.handlers
    if pool is not None and pool not in handlers:
        raise BadOption(f"--pool: unknown pool {pool!r} (known: "
                               f"{', '.join(sorted(handlers))})")
    if function is not None:
        offered = {h.name for p, hs in handlers.items() if pool in (None, p) for h in hs}
        if function not in offered:
            where = f"pool {pool!r}" if pool else "any pool"
            raise BadOption(f"--function: no function {function!r} in {where} (known: "
                                   f"{', '.join(sorted(offered)) or 'none'})")
    archived = Archive(store.redis, settings.archive)
    request = replays.Request(
        since=begin, until=end, instance_uuids=replays.resolve_sources(archived, sources),
        triggers=settings.triggers, pools=handlers, subjects=subjects or None, pool=pool,
        function=function, force=force)
    stop = threading.Event()

    def interrupt(_signum: int, _frame: object) -> None:
        click.echo("\nstopping after the batch being sent (Ctrl-C again to abort at once)",
                   err=True)
        stop.set()
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, interrupt)
    try:
        summary = replays.run(archived, None if dry_run else store.publisher, request, stop=stop,
                              progress=Progress("replaying", None), now=now)
    finally:
        signal.signal(signal.SIGINT, previous)
    window = f"{_moment(begin)} – {_moment(end) if end else 'now'}"
    click.echo(f"{'dry run: ' if dry_run else ''}{window}: "
               f"{replays.describe(summary, dry_run)}")
    if summary.stopped_at is not None:
        sys.exit(130)  # interrupted, as a shell reports Ctrl-C


@cli.command(cls=BrokerCommand)
@click.option("--json", "as_json", is_flag=True, help="As a JSON object.")
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG); gives the broker URL and "
                   "the vCenters.")
@click.pass_context
def status(ctx: click.Context, as_json: bool, config_path: str | None) -> None:
    """Which producer reads which vCenter, its state, lag and checkpoint; the live producers.

    Read from Redis (leases, heartbeats, checkpoints): any host that reaches the broker can ask.
    Lag: seconds since every event of the vCenter was last known enqueued, as its producer
    reported it at its last heartbeat."""
    from producer import status as cluster

    store = ctx.obj = BrokerStore(config_path)
    ctx.call_on_close(store.close)
    found = cluster.read(store.redis, store.settings.vcenters)
    if as_json:
        click.echo(json.dumps(found, indent=2))
        return
    rows = []
    for vc in found["vcenters"]:
        checkpoint = vc["checkpoint"]
        where = (f"event {checkpoint['key']}, written {_age(checkpoint['age_seconds'])} ago"
                 if checkpoint else "-")
        lag = vc["lag_seconds"]
        rows.append((vc["url"] + ("" if vc["configured"] else " (not configured here)"),
                     _cell(vc["reader"]), one_line(vc["state"], LIST_ERROR_WIDTH),
                     "-" if lag is None else f"{lag:.1f}s", where))
    click.echo(_table(("VCENTER", "READ BY", "STATE", "LAG", "CHECKPOINT"), rows))
    click.echo("")
    if not found["producers"]:
        click.echo("no live producer")
        return
    click.echo(_table(("PRODUCER", "HEARTBEAT", "READING", "SHARE"), [
        (p["id"], f"{p['heartbeat_age_seconds']:.1f}s ago", str(len(p["reading"])),
         _cell(p["share"])) for p in found["producers"]]))


def main() -> None:
    """Entry point: run the CLI, turning vebaq's errors into one line and an exit status."""
    try:
        cli.main(standalone_mode=False, prog_name="vebaq")
    except click.exceptions.Abort:
        sys.exit(130)
    except click.UsageError as exc:  # one line too, not click's usage block
        command = exc.ctx.command_path if exc.ctx is not None else "vebaq"
        click.echo(error_line(f"{exc.format_message().rstrip('.')} (see '{command} --help')"),
                   err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VebaqError as exc:
        click.echo(error_line(str(exc)), err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
