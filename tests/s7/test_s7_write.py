"""S7 write-back through the runtime's one audited write path: the inverse transform, the
audit record, refusals, and a write the PLC refuses."""

from __future__ import annotations

import logging
import struct
from pathlib import Path

import pytest
import yaml
from helpers.brokers import SourceRun, wait_until
from helpers.s7_server import S7TestServer

from bridge.errors import ErrorCategory, NotWritableError, WriteError


def write_config(path: Path, port: int) -> Path:
    source = {"id": "plc", "protocol": "s7", "host": "127.0.0.1", "port": port,
              "interval": "50ms", "timeout": "2s", "points": [
                  {"name": "speed", "address": "MW2:INT", "scale": 0.1, "writable": True},
                  {"name": "mode", "address": "DB1.DBB0",
                   "enum": {1: "auto", 2: "manual"}, "writable": True},
                  {"name": "pump", "address": "DB1.DBX1.4", "writable": True},
                  {"name": "gone", "address": "DB9.DBW0", "writable": True},
                  {"name": "counter", "address": "DB1.DBW2"},
              ]}
    path.write_text(yaml.safe_dump({"bridge": {"id": "test"}, "sources": [source]}),
                    encoding="utf-8")
    return path


async def test_writes_go_through_the_audited_path(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    with S7TestServer({1: 8}) as server:
        server.dbs[1][1] = 0b1000_0001
        async with SourceRun(write_config(tmp_path / "config.yaml", server.port)) as run:
            # Connected once the plan is made (the refused DB9 turns it degraded at once).
            await wait_until(lambda: "pdu_size" in run.status.details, 20,
                             "the source connected")
            runtime = run.runtime
            with caplog.at_level(logging.INFO, logger="bridge.audit"):
                await runtime.write("plc.speed", 12.5, who="key operator")
                await runtime.write("plc.mode", "manual", who="key operator")
                await runtime.write("plc.pump", True, who="key operator")
                with pytest.raises(NotWritableError):
                    await runtime.write("plc.counter", 3, who="key operator")
                with pytest.raises(WriteError) as refused:
                    await runtime.write("plc.gone", 1, who="key operator")
                with pytest.raises(WriteError) as wrong:
                    await runtime.write("plc.mode", "off", who="key operator")
    assert struct.unpack_from(">h", server.areas["M"], 2)[0] == 125
    assert server.dbs[1][0] == 2
    assert server.dbs[1][1] == 0b1001_0001
    assert refused.value.category is ErrorCategory.DEVICE
    assert refused.value.reason.startswith("DB9.DBW0: ")
    assert wrong.value.category is ErrorCategory.CONFIG
    audit = [record.getMessage() for record in caplog.records if record.name == "bridge.audit"]
    assert "write: key operator, point plc.speed, value 12.5" in audit
    assert any(line.startswith("write failed: key operator, point plc.gone") for line in audit)
