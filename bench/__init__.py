"""displback's benchmark (issue "backend" §8): flip latency and overhead, backend CPU per
flip, DBUF_CREATE time, copy-path bandwidth and 60 fps capacity on the simulated Xen.

Run it with ``make bench`` (``python -m bench --json bench-results.json``); ``--quick`` is a
smoke run. Each measurement lives in its own module: :mod:`bench.flips` (guests in other
processes), :mod:`bench.buffers` (the buffer store driven directly), :mod:`bench.machine`
(the simulated machine and the flip probe), :mod:`bench.guestproc` (the guest processes),
:mod:`bench.report` (table and JSON). docs/benchmarks.md explains the methods.
"""
