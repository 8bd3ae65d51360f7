"""The ``vebaq`` command: ``producer``, ``worker``, ``dev`` and friends.

Every :class:`~vebaq.core.errors.VebaqError` ends the command with one line on stderr and the
error's exit status; no traceback, no secret.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from functools import cached_property
from typing import TYPE_CHECKING

import click

from vebaq.core import config, deadletters, retrystore
from vebaq.core.errors import (
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
    """Read vCenter events and enqueue them to the worker pools."""
    from vebaq.core import logs

    settings = load_settings(config_path)
    logs.setup(log_level, settings.secrets())
    from producer.metrics import serve
    from producer.service import ProducerService

    service = ProducerService(settings, simulate={"rate": rate, "backlog": backlog}
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


@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("--pool", "pools", multiple=True, required=True,
              help="Pool (queue) to consume; repeat for several.")
@click.option("--concurrency", "-c", type=int, default=None,
              help="Worker processes/threads (default: CPU count).")
@click.option("--pool-impl", "-P", type=click.Choice(["prefork", "threads", "solo"]),
              default=None, help="Celery execution pool (default: prefork; threads for vrops).")
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path())
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def worker(pools: tuple[str, ...], concurrency: int | None, pool_impl: str | None,
           config_path: str | None, celery_args: tuple[str, ...]) -> None:
    """Run a Celery worker for POOL(s); extra arguments go to ``celery worker``."""
    if config_path:  # the worker app (and its prefork children) read it from there
        os.environ["VEBAQ_CONFIG"] = config_path
    from workers.pools import POOLS
    from workers.settings import settings

    settings()  # once per process: the worker app below uses the same

    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise VebaqError(f"--pool: unknown pool {unknown[0]!r} (known: {', '.join(sorted(POOLS))})")
    from workers.celery import app

    argv = ["worker", "-Q", ",".join(pools), "-n", f"{'+'.join(pools)}@%h",
            "--loglevel", "INFO", "-E"]
    if concurrency:
        argv += ["-c", str(concurrency)]
    if pool_impl or pools == ("vrops",):
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


# --- dead letters


class CommandError(click.ClickException):
    """A :class:`VebaqError` raised inside a ``dlq`` command, shown like :func:`main` shows one
    (``vebaq: error: …``, one line, the error's exit status), also when click runs the command
    itself (``standalone_mode``, ``CliRunner``)."""

    def __init__(self, error: VebaqError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code

    def show(self, file: object = None) -> None:
        click.echo(error_line(self.format_message()), err=True)


class DeadLetterGroup(click.Group):
    """Turns vebaq's and the broker's errors in its commands into one line (see
    :class:`CommandError`)."""

    def invoke(self, ctx: click.Context) -> object:
        import redis
        from kombu.exceptions import KombuError, OperationalError

        try:
            return super().invoke(ctx)
        except VebaqError as exc:
            raise CommandError(exc) from None
        except (redis.RedisError, OperationalError, KombuError) as exc:
            from vebaq.core.redisdb import explain_redis_error

            store = ctx.obj if isinstance(ctx.obj, DeadLetterStore) else None
            broker = store.broker() if store else "?"
            r = store.__dict__.get("redis") if store else None
            raise CommandError(BrokerError(f"broker {broker}: {explain_redis_error(exc, r)}")) \
                from None


class DeadLetterStore:
    """What the ``dlq`` commands work on, made on first use: the settings, the broker's Redis,
    and a Celery app for replays."""

    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path

    @cached_property
    def settings(self) -> config.Settings:
        return load_settings(self.config_path)

    @cached_property
    def redis(self) -> redis.Redis:
        import redis

        from vebaq.core.redisdb import check

        check(self.settings.broker_url, self.settings.secrets())  # one line if it refuses us
        return redis.Redis.from_url(self.settings.broker_url, socket_connect_timeout=5,
                                    socket_timeout=30)

    @cached_property
    def publisher(self) -> Publisher:
        from vebaq.core.broker import sender_app
        from vebaq.core.publish import Publisher

        return Publisher(sender_app(self.settings, "vebaq-dlq"))

    @property
    def pools(self) -> set[str]:
        """The pools the configured function modules register."""
        from workers.pools import load_functions

        return load_functions(self.settings.functions)

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


@cli.group(cls=DeadLetterGroup)
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG); gives the broker URL.")
@click.pass_context
def dlq(ctx: click.Context, config_path: str | None) -> None:
    """Dead letters: list, show, replay, purge, stats.

    A dead letter is an event whose function failed for good (last retry, or a permanent
    error), or a message no worker could use."""
    ctx.obj = DeadLetterStore(config_path)
    ctx.call_on_close(ctx.obj.close)


@dlq.command("list")
@click.option("--json", "as_json", is_flag=True, help="Full records as a JSON array.")
@click.option("--subject", help="Only dead letters of this event subject (task name).")
@click.option("--pool", help="Only dead letters of this pool.")
@click.pass_obj
def dlq_list(store: DeadLetterStore, as_json: bool, subject: str | None,
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
def dlq_show(store: DeadLetterStore, letter_id: str) -> None:
    """Print one dead letter as JSON (CloudEvent, error, traceback)."""
    click.echo(json.dumps(deadletters.get(store.redis, letter_id), indent=2,
                          ensure_ascii=False))


@dlq.command("replay")
@click.argument("letter_id", metavar="[ID]", required=False)
@click.option("--all", "replay_all", is_flag=True, help="Every dead letter (see the filters).")
@click.option("--subject", help="With --all: only this event subject.")
@click.option("--pool", help="With --all: only this pool.")
@click.pass_obj
def dlq_replay(store: DeadLetterStore, letter_id: str | None, replay_all: bool,
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
def dlq_purge(store: DeadLetterStore, letter_ids: tuple[str, ...], yes: bool) -> None:
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
def dlq_stats(store: DeadLetterStore, as_json: bool) -> None:
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
