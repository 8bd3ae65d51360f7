"""vebaq's benchmarks: every figure measured next to its baseline, in the same run.

Run ``python -m bench`` (``make bench``); ``--quick`` for a smoke run. The sections:

:mod:`bench.raw`        redis-py pipelines pushing and popping the same messages: the ceiling.
:mod:`bench.drain`      producer drain rate from the vCenter simulator vs pyvmomi reading only.
:mod:`bench.backlog`    a 100k-event simulated backlog: events/s and peak RSS vs generating only.
:mod:`bench.throughput` echo worker tasks/s vs a bare no-op Celery task, 1 and 2 processes.
:mod:`bench.latency`    vCenter event created → function started, idle and under load.
:mod:`bench.vrops`      vROps calls per maintenance event, events/s per pool implementation.
:mod:`bench.routing`    µs per event routed by 20 triggers on data vs on attributes; throttling.

Results go to ``bench/results/`` (``bench.json``, ``bench.png``, ``RESULTS.md``); ``--publish``
also copies the report and the figure to ``bench/RESULTS.md`` and ``bench/results.png``.
The machine is shared and noisy, so no figure is meaningful alone: each is a median of repeats
and a ratio against a baseline measured in the same run.
"""
