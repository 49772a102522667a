"""`fieldbridge discover logix` against cpppo's simulator, which refuses the tag list upload:
the discovery says so plainly and writes a mapping of the identity object that validates and
runs `good`."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SourceRunner, free_port
from helpers.logix_server import LogixSimulator, build_unit

from bridge.core.discovery import DiscoveryContext
from bridge.core.model import Quality
from bridge.errors import ConnectorError
from bridge.registry import discoverable, load_config

pytestmark = pytest.mark.asyncio


async def test_discovery_against_a_controller_that_refuses_the_tag_list(
        tmp_path: Path) -> None:
    spec = discoverable()["logix"]
    async with LogixSimulator() as simulator:
        request = spec.request_model.model_validate(
            {**spec.target(f"127.0.0.1:{simulator.port}"), "timeout": 2})
        found = await spec.run(request, DiscoveryContext())
        assert any("refuses the tag list" in warning for warning in found.warnings)
        assert "1756-L61/B LOGIX5561" in found.yaml
        path = tmp_path / "discovered.yaml"
        path.write_text(found.yaml, encoding="utf-8")
        load_config(path)
        unit = build_unit(tmp_path / "run", found.yaml)
        async with SourceRunner(unit) as runner:
            await runner.wait_for(lambda: len({event.point for event in runner.events}) == 4)
        assert all(event.quality is Quality.GOOD for event in runner.events), runner.events
        product = next(event for event in runner.events
                       if event.point == "identity.product_name")
        assert product.value == "1756-L61/B LOGIX5561"


async def test_discovery_of_an_unreachable_controller_raises(tmp_path: Path) -> None:
    spec = discoverable()["logix"]
    request = spec.request_model.model_validate(
        {**spec.target(f"127.0.0.1:{free_port()}"), "timeout": 1})
    with pytest.raises(ConnectorError, match="cannot connect"):
        await spec.run(request, DiscoveryContext())
