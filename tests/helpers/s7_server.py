"""python-snap7's S7 server on a free port, with areas the tests fill, and builders of S7
sources from YAML text."""

from __future__ import annotations

import logging
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from snap7.server import Server
from snap7.type import SrvArea

from bridge.core.source import BuildContext, SourceUnit
from bridge.registry import load_config, protocols
from helpers import free_port

_AREAS = {"M": SrvArea.MK, "I": SrvArea.PE, "Q": SrvArea.PA, "T": SrvArea.TM, "C": SrvArea.CT}


class S7TestServer:
    """An S7 server on 127.0.0.1 serving the given DBs (number → size) and areas; the
    bytes live in ``dbs`` and ``areas`` and change as clients write."""

    def __init__(self, dbs: dict[int, int] | None = None, *, area_size: int = 64) -> None:
        self.port = free_port()
        self.dbs = {number: bytearray(size) for number, size in (dbs or {}).items()}
        self.areas = {name: bytearray(area_size) for name in _AREAS}
        self.server: Server | None = None

    def start(self) -> None:
        """Listen (again, after ``stop``) on the same port, with the same memory."""
        logging.getLogger("snap7.server").setLevel(logging.ERROR)
        server = Server(log=False)
        for number, data in self.dbs.items():
            server.register_area(SrvArea.DB, number, data)
        for name, data in self.areas.items():
            server.register_area(_AREAS[name], 0, data)
        server.start_to("127.0.0.1", self.port)
        self.server = server

    def stop(self) -> None:
        """Stop listening and drop every client."""
        if self.server is not None:
            self.server.stop()
            self.server.destroy()
            self.server = None

    def __enter__(self) -> S7TestServer:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()


def s7_yaml(port: int, points: list[dict[str, Any]], **settings: Any) -> str:
    """A one-source S7 configuration as YAML text."""
    source = {"id": "plc", "protocol": "s7", "host": "127.0.0.1", "port": port,
              "interval": "50ms", "timeout": "500ms", **settings, "points": points}
    return yaml.safe_dump({"sources": [source]}, sort_keys=False)


def build_s7(tmp_path: Path, text: str) -> SourceUnit:
    """Load a one-source config written as YAML text and build its source and mapper."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text, encoding="utf-8")
    config = load_config(path)
    source = config.sources[0]
    return protocols()["s7"].source_unit(
        source, config.points[source.id], BuildContext(bridge_id="test", state_dir=tmp_path))
