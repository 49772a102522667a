"""The API's routes, one module per resource, each an ``APIRouter`` that ``create_app``
includes: points, events, inventory (sources and sinks), health (and ``/metrics``)."""
