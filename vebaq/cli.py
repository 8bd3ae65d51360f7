"""The ``vebaq`` command: ``producer``, ``worker``, ``dev`` and friends.

Every :class:`~vebaq.errors.VebaqError` ends the command with one line on stderr and the
error's exit status; no traceback, no secret.
"""

from __future__ import annotations

import logging
import signal
import sys

import click

from vebaq import config
from vebaq.errors import VebaqError
from vebaq.secrets import scrub

logger = logging.getLogger("vebaq")


def load_settings(path: str | None) -> config.Settings:
    """Settings with triggers checked against the pools that really exist."""
    from workers.pools import load_functions

    base = config.load(path)
    return config.load(path, known_pools=load_functions(base.functions))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="vebaq")
def cli() -> None:
    """vCenter events → CloudEvents → Celery worker pools on Redis."""


@cli.command()
@click.option("--config", "config_path", envvar="VEBAQ_CONFIG", type=click.Path(),
              help="YAML configuration file (default: $VEBAQ_CONFIG).")
@click.option("--metrics-port", envvar="VEBAQ_METRICS_PORT", type=int, default=8080,
              show_default=True, help="Port for /metrics, /stats and /healthz; 0 disables.")
@click.option("--log-level", default="INFO", show_default=True)
@click.option("--simulate", is_flag=True,
              help="Read the built-in simulated event source instead of vCenter.")
@click.option("--rate", type=float, default=2.0, show_default=True,
              help="With --simulate: events per second.")
@click.option("--backlog", type=int, default=0, show_default=True,
              help="With --simulate: events already waiting at start.")
def producer(config_path: str | None, metrics_port: int, log_level: str, simulate: bool,
             rate: float, backlog: int) -> None:
    """Read vCenter events and enqueue them to the worker pools."""
    from vebaq import logs

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
    settings = load_settings(config_path)
    from workers.pools import POOLS

    unknown = [p for p in pools if p not in POOLS]
    if unknown:
        raise VebaqError(f"--pool: unknown pool {unknown[0]!r} (known: {', '.join(sorted(POOLS))})")
    from workers import app

    app.conf.broker_url = settings.broker_url
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
    from vebaq import dev as dev_mode

    load_settings(None)  # refuse a bad config before starting anything
    sys.exit(dev_mode.run(pools, simulate, rate, flower_port, metrics_port))


def main() -> None:
    """Entry point: run the CLI, turning vebaq's errors into one line and an exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except VebaqError as exc:
        secrets = ()
        click.echo(f"vebaq: error: {scrub(str(exc), secrets)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)
