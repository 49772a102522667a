"""The core of the flow: Reading in, Event out, and what turns one into the other.

``model`` declares the normalized event once (its JSON Schema, the API's models, the store's
rows and the worker frames derive from it); ``codec`` decodes and encodes register values;
``mapping`` holds the compiled per-point programs (scale, deadband, report-by-exception);
``payload`` extracts values from JSON payloads and topics for the message protocols;
``status`` is the state and counters of one endpoint.

May import: ``bridge.errors`` and ``bridge.config``. Never a protocol, the pipeline or the API.
"""
