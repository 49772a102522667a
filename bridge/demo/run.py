"""``fieldbridge demo``: a simulated plant and the daemon bridging it, in one process.

Starts ``PlantSimulator`` (a Modbus TCP server on a free loopback port), loads the packaged
demo configuration (``mappings/demo.yaml``) against it, keeps the store in a temporary
directory, and serves the REST API and the console until SIGINT or SIGTERM; the first line it
prints is the console's URL. Needs no root, no broker and no
file in the current directory.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.resources
import os
import signal
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from bridge.api.server import api_services
from bridge.config.models import Config
from bridge.demo.simulator import PlantSimulator
from bridge.errors import BridgeError
from bridge.registry import load_config
from bridge.runtime import Runtime

PORT_VARIABLE = "FIELDBRIDGE_DEMO_MODBUS_PORT"
"""The environment variable the demo configuration takes the simulator's port from."""

DEMO_POINT = "boiler.supply_temp"
"""The point the printed ``curl`` line asks for."""


def demo_config_path() -> Path:
    """The demo configuration: the installed ``bridge.mappings`` package, else the
    repository's ``mappings/`` next to the ``bridge`` package (running from a checkout)."""
    candidates: list[Path] = []
    try:
        packaged = importlib.resources.files("bridge.mappings").joinpath("demo.yaml")
    except ModuleNotFoundError:
        pass
    else:
        # Only a file on disk will do: the configuration includes its profiles by path.
        if isinstance(packaged, Path):
            candidates.append(packaged)
    candidates.append(Path(__file__).resolve().parent.parent / "mappings" / "demo.yaml")
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    searched = ", ".join(str(candidate) for candidate in candidates)
    raise BridgeError(f"cannot find the demo configuration (looked for {searched}); "
                      "reinstall fieldbridge")


def load_demo_config(*, state_dir: Path, api_port: int) -> Config:
    """The demo configuration with its state directory and API port replaced.

    The simulator's port comes from ``$FIELDBRIDGE_DEMO_MODBUS_PORT`` (5020 when unset).
    Raises ``ConfigError`` if the packaged configuration is invalid.
    """
    config = load_config(demo_config_path())
    for source in config.sources:
        # ${...} in the demo's file carries the addresses the demo itself chose, no secret:
        # its console and inventory show them.
        source.substituted(())
    return dataclasses.replace(
        config,
        bridge=config.bridge.model_copy(update={"state_dir": state_dir.resolve()}),
        api=config.api.model_copy(update={"port": api_port}),
    )


@contextlib.contextmanager
def _environment(name: str, value: str) -> Iterator[None]:
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def _state_directory(state_dir: str | None) -> Iterator[Path]:
    if state_dir is not None:
        yield Path(state_dir)
        return
    with tempfile.TemporaryDirectory(prefix="fieldbridge-demo-") as temporary:
        yield Path(temporary)


async def run_demo(*, port: int, state_dir: str | None, opcua: bool = False) -> int:
    """Run the simulator and the daemon on it until SIGINT or SIGTERM; returns the exit status.

    ``port`` is the API port (0: any free port); ``state_dir`` keeps the store, else a
    temporary directory removed on exit; ``opcua`` also runs an OPC-UA server and the
    demo's OPC-UA source.
    """
    with _state_directory(state_dir) as directory:
        async with contextlib.AsyncExitStack() as stack:
            simulator = await stack.enter_async_context(
                PlantSimulator(host="127.0.0.1", port=0))
            stack.enter_context(_environment(PORT_VARIABLE, str(simulator.port)))
            if opcua:
                await _start_opcua(stack)
            config = load_demo_config(state_dir=directory, api_port=port)
            runtime = Runtime(config)
            announcer = asyncio.create_task(
                _announce(runtime, simulator, config), name="demo.announce")
            loop = asyncio.get_running_loop()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, runtime.stop)
            try:
                await runtime.run(services=api_services(config))
            finally:
                for signum in (signal.SIGTERM, signal.SIGINT):
                    loop.remove_signal_handler(signum)
                announcer.cancel()
                await asyncio.wait([announcer])
    return 0


async def _start_opcua(stack: contextlib.AsyncExitStack) -> None:
    """An in-process OPC-UA server whose variables move, and the demo source turned on."""
    from bridge.demo.opcua_plant import PlantServer

    server = await stack.enter_async_context(PlantServer(host="127.0.0.1", port=0))
    animation = asyncio.create_task(server.animate(0.5), name="demo.opcua.animate")

    async def stop_animation() -> None:
        animation.cancel()
        await asyncio.gather(animation, return_exceptions=True)

    stack.push_async_callback(stop_animation)
    stack.enter_context(_environment("FIELDBRIDGE_DEMO_OPCUA", "true"))
    stack.enter_context(_environment("FIELDBRIDGE_DEMO_OPCUA_URL", server.url))


async def _announce(runtime: Runtime, simulator: PlantSimulator, config: Config) -> None:
    await runtime.ready.wait()
    base = f"http://{_url_host(config.api.host)}:{runtime.api_port}"
    # The count is what /v1/points lists: every configured point, those of a disabled
    # source included (they show no value until it is turned on).
    per_source = Counter(point.source for point in runtime.points.values())
    parts = []
    for source_id, running in runtime.sources.items():
        source = running.unit.source
        if running.enabled:
            parts.append(f"{per_source[source_id]} over {source.protocol} {source.endpoint}")
        else:
            parts.append(f"{per_source[source_id]} of {source_id}, disabled"
                         + (" (add --opcua)" if source.protocol == "opcua" else ""))
    lines = [
        f"Console: {base}/",
        f"Fieldbridge demo: {len(runtime.points)} points of a simulated plant "
        f"({'; '.join(parts)}).",
        f"  REST API: {base}/v1/points",
        f"  try:      curl -s {base}/v1/points/{DEMO_POINT}",
        f"  docs:     {base}/docs",
        f"  store:    {config.store_path}",
        "Press Ctrl-C to stop.",
    ]
    if runtime.api_port is None:
        lines[0:1] = []
        lines[1:4] = ["  (the REST API is disabled in the demo configuration)"]
    print("\n".join(lines), flush=True)


def _url_host(host: str) -> str:
    if host in ("", "0.0.0.0", "::"):
        return "127.0.0.1"
    return f"[{host}]" if ":" in host else host
