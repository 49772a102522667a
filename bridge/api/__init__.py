"""The REST API: FastAPI app, routes by resource, auth, Server-Sent Events, metrics, server.

The API wraps the runtime through its facade (``bridge.facade.ApiFacade``): latest values,
history, inventory, live read, write and the event stream. ``metrics`` reads the same facade.

``app`` builds the application (``create_app``) from ``routes`` (points, events, inventory,
health), ``models`` (request and response models), ``context`` (what handlers share: the
facade, keys, ``authorize``), ``handlers`` (structured errors), ``auth`` (API keys),
``event_hub`` and ``sse_response`` (the live event stream: the hub that fans stored events
out to subscriptions, and the response that writes one to its client) and ``metrics``
(Prometheus collectors).
``server`` serves it on uvicorn as a runtime service (``ApiServer``), with the connection
limits of ``connections``; ``uvicorn_adapter`` is the one module that touches uvicorn's
internals (its HTTP/1.1 protocol, ASGI types and server state).

May import: ``bridge.errors``, ``bridge.config``, ``bridge.core``, ``bridge.pipeline``,
``bridge.registry``, ``bridge.inventory``, ``bridge.facade`` and ``bridge.runtime``. The
runtime never imports the API.
"""
