"""The REST API: FastAPI app, routes by resource, auth, Server-Sent Events, metrics, server.

The API wraps the runtime through its facade (``bridge.runtime.RuntimeFacade``): latest values,
history, inventory, live read, write and the event stream. ``metrics`` reads the same facade.

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core``, ``bridge.pipeline``,
``bridge.registry`` and ``bridge.runtime``. The runtime never imports the API.
"""
