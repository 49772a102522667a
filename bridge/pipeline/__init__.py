"""The pipeline: sources and sinks under supervision, the router, the store and the outbox.

``source`` and ``sink`` are the contracts a connector implements; ``supervisor`` runs them and
owns reconnecting; ``router`` batches events into the ``store`` (SQLite: latest values,
history) and its ``outbox`` (events a sink has not confirmed), asking ``admission`` what of each
batch is stored now and what waits for a full sink; ``worker`` runs a source or a
sink in a process of its own; ``notify`` speaks systemd's notification protocol.

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core`` and ``bridge.registry``.
Never a protocol, the API, the runtime or the demo.
"""
