"""Worker processes: a source's connection and mapping, or a sink's publishing, on a core of
their own.

A source configured with ``workers: N`` runs in N child processes (``fieldbridge worker``), a
sink with ``workers`` in one; each is started by the daemon with one end of a private socket
pair, told what to run, and reports its status a few times a second. The daemon stays the one
owner of the store and the outbox: a source worker's events are stored by the daemon before
their upstream messages are settled, and a sink worker reads and deletes outbox rows through
the daemon. A worker process that exits is started again by the daemon's supervisor, with
backoff; a worker whose daemon is gone (its socket closes) exits.

The modules: ``frames`` (the wire format), ``lifecycle`` (spawning, status reports,
stopping), ``source_worker`` and ``sink_worker`` (both ends of each kind), ``process`` (the
worker process's main). This package may import the config models, the core, the registry,
the errors and the rest of the pipeline.
"""

from bridge.pipeline.worker.frames import SinkWorkerSpec, WorkerSpec
from bridge.pipeline.worker.process import run_worker
from bridge.pipeline.worker.sink_worker import SinkWorker
from bridge.pipeline.worker.source_worker import WorkerSource, build_worker_unit

__all__ = ["SinkWorker", "SinkWorkerSpec", "WorkerSource", "WorkerSpec", "build_worker_unit",
           "run_worker"]
