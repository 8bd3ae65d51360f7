"""The shared kernel: everything producer and workers both need, defined once.

It imports neither :mod:`producer` nor :mod:`workers` (nor the CLI or dev tools), and importing
it builds no Celery app. Modules, bottom up:

* :mod:`~vebaq.core.errors`, :mod:`~vebaq.core.secrets`, :mod:`~vebaq.core.logs`,
  :mod:`~vebaq.core.progress` — one error tree, secrets that hide themselves, scrubbed logs;
* :mod:`~vebaq.core.routing`, :mod:`~vebaq.core.config` — triggers, and every setting;
* :mod:`~vebaq.core.envelope` — the CloudEvent in its structured JSON form;
* :mod:`~vebaq.core.messages` — the task message contract (name, kwargs, id, queue);
* :mod:`~vebaq.core.keys`, :mod:`~vebaq.core.redisdb` — every Redis key vebaq writes, the client
  and the one way Lua scripts run;
* :mod:`~vebaq.core.done`, :mod:`~vebaq.core.retrystore`, :mod:`~vebaq.core.deadletters` — the
  stores in Redis that both sides read or write;
* :mod:`~vebaq.core.broker`, :mod:`~vebaq.core.publish` — the Celery settings both sides share,
  and enqueueing task messages in pipelined batches;
* :mod:`~vebaq.core.archive`, :mod:`~vebaq.core.replay` — the event archive the producer
  appends to, and replaying a time range of it (``vebaq replay``);
* :mod:`~vebaq.core.throttle` — per-key throttles and batches of triggers, their state in
  Redis (the producer decides with it).
"""
