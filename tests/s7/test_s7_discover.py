"""S7 discovery: the CPU's identity and DB list from python-snap7's server, written as a
mapping that validates and runs good; a PLC that refuses block listing (a fake at the
client seam: the server always lists) is said plainly."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import SourceRunner
from helpers.discovery import in_thread
from helpers.s7_server import S7TestServer, build_s7

from bridge import cli
from bridge.core.discovery import Budget, DiscoveryContext, StreamProgress
from bridge.core.model import Quality
from protocols.s7.address import Area
from protocols.s7.client import PUT_GET_HINT, Identity, RefusedError, access_reason
from protocols.s7.config import S7SourceConfig
from protocols.s7.discover import S7DiscoverRequest, discover


def _context() -> DiscoveryContext:
    return DiscoveryContext(progress=StreamProgress(io.StringIO(), tty=False), budget=Budget())


@pytest.fixture
def server() -> Iterator[S7TestServer]:
    with S7TestServer({1: 16, 7: 32}) as running:
        yield running


async def test_the_command_writes_a_mapping_that_validates_and_runs(
        server: S7TestServer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    output = tmp_path / "plc.yaml"
    status = await in_thread(cli.main, [
        "discover", "s7", f"127.0.0.1:{server.port}", "--output", str(output)])
    assert status == 0, capsys.readouterr().err
    text = output.read_text()
    assert "module: CPU 315-2 PN/DP" in text
    assert "CPU state: RUN" in text
    assert "address: DB1.DBB0" in text
    assert "address: DB7.DBB0" in text
    assert await in_thread(cli.main, ["validate", str(output)]) == 0
    async with SourceRunner(build_s7(tmp_path / "run", text), supervised=True) as run:
        await run.wait_for(lambda: run.has("plc.db1.byte0") and run.has("plc.db7.byte0"))
        assert {event.quality for event in run.events} == {Quality.GOOD}


async def test_the_listing_and_identity(server: S7TestServer) -> None:
    result = await discover(S7DiscoverRequest(host="127.0.0.1", port=server.port), _context())
    assert [item.address for item in result.items] == ["DB1.DBB0", "DB7.DBB0"]
    assert result.items[0].extra["pdu_size"] == 480
    assert result.items[0].extra["state"] == "RUN"
    assert not result.partial


class _RefusingPlc:
    """A PLC that connects and tells who it is, but refuses to list its blocks, as an
    S7-1500 without PUT/GET does."""

    def __init__(self, config: S7SourceConfig) -> None:
        self.closed = False

    async def connect(self) -> int:
        return 960

    async def read(self, area: Area, db: int, start: int, count: int) -> bytes:
        return bytes(count)

    async def write(self, area: Area, db: int, start: int, data: bytes) -> None:
        raise RefusedError("read-only")

    async def identity(self) -> Identity:
        return Identity(order_code="6ES7 515-2AM02-0AB0", module_name="PLC_1", state="RUN")

    async def data_blocks(self) -> list[int]:
        raise RefusedError(access_reason("Function not permitted in current protection level"))

    async def block_size(self, db: int) -> int | None:
        return None

    async def close(self) -> None:
        self.closed = True


async def test_a_refused_block_listing_is_said_plainly(tmp_path: Path) -> None:
    result = await discover(S7DiscoverRequest(host="192.0.2.1"), _context(),
                            client_factory=_RefusingPlc)
    assert result.partial
    assert any("refuses to list its blocks" in warning and "PUT/GET" in warning
               for warning in result.warnings)
    assert result.yaml.startswith("# PARTIAL: the PLC refuses to list its blocks")
    assert "NO BLOCK LIST" in result.yaml
    assert "order code: 6ES7 515-2AM02-0AB0" in result.yaml
    path = tmp_path / "plc.yaml"
    path.write_text(result.yaml, encoding="utf-8")
    assert await in_thread(cli.main, ["validate", str(path)]) == 0


def test_an_access_refusal_explains_put_get() -> None:
    assert access_reason("Function not permitted in current protection level").endswith(
        PUT_GET_HINT)
    assert "PUT/GET" in PUT_GET_HINT
    assert access_reason("Object does not exist") == "Object does not exist"
