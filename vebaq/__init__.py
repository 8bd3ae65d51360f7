"""vebaq: vCenter events as CloudEvents, delivered to Celery worker pools over Redis.

The code is layered; imports point down only (checked by import-linter in ``make lint``):

* :mod:`vebaq.cli` — the ``vebaq`` command, on top;
* :mod:`vebaq.devtools` — dev mode, the embedded broker, the fake vROps, the demo driver;
* :mod:`producer` and :mod:`workers` — independent of each other: the producer reads vCenter and
  enqueues tasks, the workers run them;
* :mod:`vebaq.core` — the shared kernel both sides use: configuration, errors, secrets, logs,
  the task message contract, the CloudEvent envelope, Redis keys and the stores in Redis.
"""

__version__ = "0.1.0"
