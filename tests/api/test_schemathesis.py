"""The API against its own OpenAPI document, with schemathesis, on the daemon run as a
subprocess: the simulated plant of the demo on Modbus TCP (a writable setpoint among its
points) and API keys with each scope.

Every operation the document lists gets a bounded number of generated requests (examples,
boundary values and random data, valid and invalid, then sequences that follow the links
between operations) with a fixed seed, sent with the admin key; then a few with a read-only
and a write-only key, which the routes outside their scope refuse. Each response must not be
a 5xx and must conform to the document: its status code, its content type, its body (and
each message of an event stream), its headers, and the ``Allow`` of a 405.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from helpers import WAIT
from helpers.daemon import running_daemon
from schemathesis import BaseSchema
from schemathesis.engine import Status, StopReason, events
from schemathesis.engine.recorder import ScenarioRecorder

from bridge.demo.run import demo_config_path
from bridge.demo.simulator import PlantSimulator

ADMIN_KEY = "admin-key-0123456789abcdef"
READ_KEY = "read-key-0123456789abcdef"
WRITE_KEY = "write-key-0123456789abcdef"

EXAMPLES = 10
"""Generated requests per operation and phase: enough to reach every documented response
of this API, few enough that the whole run stays within a minute on two busy cores."""

STREAM_SECONDS = 1.0
"""How long one request to an event stream is read at most (schemathesis reads a stream
until its request timeout, or up to ``max-stream-events`` messages); the plant moves and is
polled faster than that."""

CHECKS = ("not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_schema_conformance", "response_headers_conformance",
          "allow_header_conformance")


def _config(directory: Path, modbus_port: int) -> Path:
    """The demo's plant and profiles, with keys for each scope."""
    keys = "".join(
        f"    - {{name: {name}, sha256: {hashlib.sha256(key.encode()).hexdigest()}, "
        f"scopes: [{scope}]}}\n"
        for name, key, scope in (("admin", ADMIN_KEY, "admin"), ("reader", READ_KEY, "read"),
                                 ("operator", WRITE_KEY, "write")))
    profiles = demo_config_path().parent / "profiles" / "*.yaml"
    path = directory / "fieldbridge.yaml"
    path.write_text(f"""\
bridge: {{id: conformance, state_dir: state}}
api:
  host: 127.0.0.1
  port: 0
  keys:
{keys}include: ["{profiles}"]
sources:
  - id: plant
    protocol: modbus
    host: 127.0.0.1
    port: {modbus_port}
    timeout: 1s
    retries: 1
    devices:
      - id: boiler
        unit: 1
        interval: 200ms
        profile: demo-plant
        prefix: "boiler."
        tags: {{site: demo}}
""")
    return path


class _Plant(threading.Thread):
    """The simulator and the daemon, on an event loop of their own: schemathesis calls the
    API synchronously, and the simulator must keep answering the daemon meanwhile."""

    def __init__(self, directory: Path) -> None:
        super().__init__(name="conformance-plant")
        self.directory = directory
        self.url = ""
        self.failure: BaseException | None = None
        self.started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None

    def run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:  # handed to the test's thread, which raises it
            self.failure = exc
        finally:
            self.started.set()

    async def _serve(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        async with PlantSimulator(port=0, seed=1, interval=0.2) as simulator, \
                running_daemon(_config(self.directory, simulator.port)) as daemon:
            self.url = daemon.url
            self.started.set()
            await self._stopping.wait()

    def stop(self) -> None:
        """Stop the daemon and the simulator, and wait for the thread to end."""
        if self._loop is not None and self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        self.join(2 * WAIT)
        assert not self.is_alive(), "the daemon did not stop"


@pytest.fixture(scope="module")
def live_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The base URL of a running daemon bridging the simulated plant."""
    plant = _Plant(tmp_path_factory.mktemp("conformance"))
    plant.start()
    try:
        assert plant.started.wait(3 * WAIT), "the daemon did not start"
        if plant.failure is not None:
            raise plant.failure
        yield plant.url
    finally:
        plant.stop()
    if plant.failure is not None:
        raise plant.failure


def _schema(url: str, key: str, *, phases: tuple[str, ...], examples: int) -> BaseSchema:
    """The daemon's OpenAPI document, loaded to be tested with ``key``."""
    # A stream is read up to its first message: it ends at once, and conforms or not. Its
    # boundary cases are the invalid ones (answered at once); the valid ones that filter
    # out every event would each wait out the timeout.
    streams = {"request-timeout": STREAM_SECONDS, "max-stream-events": 1,
               "phases": {"coverage": {"generation": {"mode": "negative"}}}}
    config = schemathesis.Config.from_dict({
        "seed": 1,
        "headers": {"Authorization": f"Bearer {key}"},
        "request-timeout": WAIT,
        "generation": {"max-examples": examples, "database": "none"},
        "phases": {phase: {"enabled": phase in phases}
                   for phase in ("examples", "coverage", "fuzzing", "stateful")},
        "checks": {"enabled": False, **{name: {"enabled": True} for name in CHECKS}},
        "operations": [
            {"include-path": "/v1/events/stream", **streams},
            {"include-path": "/v1/status/stream", **streams},
            # Real points, so reads return data and writes reach the simulated device.
            {"include-name": "PUT /v1/points/{point_id}",
             "parameters": {"point_id": "boiler.setpoint"}},
            {"include-name": ["GET /v1/points/{point_id}", "GET /v1/points/{point_id}/history",
                              "GET /v1/points/{point_id}/live"],
             "parameters": {"point_id": "boiler.supply_temp"}},
            {"include-path": "/v1/sources/{source_id}", "parameters": {"source_id": "plant"}},
        ],
    })
    return schemathesis.openapi.from_url(f"{url}/openapi.json", config=config)


ALL_PHASES = ("examples", "coverage", "fuzzing", "stateful")


@pytest.mark.parametrize(("key", "phases", "examples"), [
    pytest.param(ADMIN_KEY, ALL_PHASES, EXAMPLES, id="admin"),
    # Keys with one scope: every route the key may not use answers the documented 403.
    pytest.param(READ_KEY, ("fuzzing",), 3, id="read"),
    pytest.param(WRITE_KEY, ("fuzzing",), 3, id="write"),
])
def test_the_api_conforms_to_its_openapi_document(
    live_api: str, key: str, phases: tuple[str, ...], examples: int
) -> None:
    # schemathesis' engine, as its command line runs it (its pytest plugin's lazily loaded
    # schema does not run under pytest 9.2): every failed check is collected, and reported
    # with the request that reproduces it.
    schema = _schema(live_api, key, phases=phases, examples=examples)
    cases = 0
    problems: list[str] = []
    finished: events.EngineFinished | None = None
    for event in schemathesis.engine.from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            cases += len(event.recorder.cases)
            problems.extend(_failed_checks(event.recorder))
        elif isinstance(event, events.NonFatalError):
            problems.append(f"{event.label}: {event.info.format()}")
        elif isinstance(event, events.FatalError):
            problems.append(f"the run failed: {event.exception!r}")
        elif isinstance(event, events.EngineFinished):
            finished = event
    assert finished is not None, "the run did not finish"
    assert finished.stop_reason is StopReason.COMPLETED, finished.stop_reason
    assert cases > 0
    assert not problems, f"{len(problems)} failed checks in {cases} cases:\n" + "\n".join(
        problems)


def _failed_checks(recorder: ScenarioRecorder) -> list[str]:
    """Each failed check of a scenario, with the request that reproduces it."""
    found = []
    for checks in recorder.checks.values():
        for check in checks:
            if check.status not in (Status.FAILURE, Status.ERROR):
                continue
            info = check.failure_info
            if info is None:
                found.append(f"{recorder.label}: {check.name}: {check.status}")
            else:
                found.append(f"{recorder.label}: {check.name}: {info.failure.title}\n    "
                             f"{info.failure.message}\n    {info.code_sample}")
    return found
