"""What a running mesh shows to the people who run it: ``choreo traces``, ``trace``, ``top``, ``dlq``.

Nobody holds the whole flow of a choreography, so these commands assemble it: they ask one
node (the ``--peer`` seed) who is in the mesh, then ask every live node at once through the
system queries each one answers (:mod:`choreo.client`), and put the answers together. The
pieces, each with one job:

- ``mesh``: who is in the mesh, and one system query to many nodes at once;
- ``traces``: every node's summary of its recent traces -> the flows of the mesh, filtered
  (failed, slow, by type or key), each with the id ``choreo trace`` takes (``choreo-traces/1``);
- ``trace_view``: spans of one trace from every node -> a tree by cause, timings, the critical
  path and the failing step; text and a stable JSON document (``choreo-trace/1``);
- ``top``: two snapshots of every node's counters -> rates, in flight, lag per partition
  (``choreo-top/1``);
- ``dlq``: the dead letters of the whole mesh: list, show, replay;
- ``commands``: the ``traces``, ``trace``, ``top`` and ``dlq`` subcommands of the CLI.

The node's side lives in :mod:`choreo.introspect` (the system queries) and
:mod:`choreo.metrics` (Prometheus). This package imports the client, never the node runtime.
"""
