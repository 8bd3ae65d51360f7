"""vebaq: vCenter events as CloudEvents, delivered to Celery worker pools over Redis.

The code is split the way the data flows:

* :mod:`producer` reads vCenter, converts events and enqueues them;
* :mod:`workers` is the Celery app, its pools and their functions;
* :mod:`vebaq` (this package) holds what both sides share: configuration, secrets and the CLI.
"""

__version__ = "0.1.0"
