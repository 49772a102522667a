"""The console in a real browser: Debian's headless Chromium driven by Playwright, against
the demo configuration bridging the plant simulator, all in this test's event loop.

Every test saves a screenshot of each page it opened under its ``tmp_path``, pass or fail.
Waits are Playwright's own (``expect``), bounded by ``SETTLE``: no test sleeps.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import re
import shutil
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from fastapi.responses import JSONResponse
from helpers import free_port
from helpers.discovery import CONSOLE_BODIES
from playwright.async_api import Browser, Page, Request, async_playwright, expect

from bridge.api.server import ApiServer
from bridge.config.models import ApiKey, Config
from bridge.demo.run import PORT_VARIABLE, demo_config_path, load_demo_config
from bridge.demo.simulator import PlantSimulator
from bridge.facade import ApiFacade
from bridge.registry import discoverable, load_config
from bridge.runtime import Runtime

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SETTLE = 15.0
"""Seconds any awaited condition may take before the test fails."""
KEYS = {"viewer": ("viewer-key-0123456789abcdef", ["read"]),
        "operator": ("operator-key-0123456789abcdef", ["read", "write"])}
DEMO_POINTS = {"boiler.supply_temp", "boiler.return_temp", "boiler.pressure", "boiler.energy",
               "boiler.pump_running", "boiler.mode", "boiler.setpoint"}
SCREENSHOT = Path(__file__).resolve().parents[1] / "screenshots" / "console.png"
"""The README's picture of the console."""

expect.set_options(timeout=SETTLE * 1000)


# --- the bridge -------------------------------------------------------------------------------


@dataclass
class Plant:
    """The demo configuration bridging the simulator, its API on a free port."""

    runtime: Runtime
    simulator: PlantSimulator
    task: asyncio.Task[None]

    @property
    def url(self) -> str:
        assert self.runtime.api_port is not None
        return f"http://127.0.0.1:{self.runtime.api_port}/"


def with_keys(config: Config) -> Config:
    keys = [ApiKey(name=name, sha256=hashlib.sha256(key.encode()).hexdigest(),
                   scopes=scopes)  # type: ignore[arg-type]
            for name, (key, scopes) in KEYS.items()]
    return dataclasses.replace(config, api=config.api.model_copy(update={"keys": keys}))


RouteStub = Callable[[ApiServer], None]


def with_unreachable_sink(config: Config, directory: Path) -> Config:
    """``config`` with a RabbitMQ sink on a loopback port where nothing listens: its events
    wait in the outbox."""
    text = demo_config_path().read_text()
    profiles = demo_config_path().parent / "profiles"
    text = text.replace("  - profiles/*.yaml", f"  - {profiles}/*.yaml")
    text += (f"\nsinks:\n  - id: rabbit\n    protocol: amqp\n"
             f"    url: amqp://guest:guest@127.0.0.1:{free_port()}/%2F\n")
    path = directory / "with-sink.yaml"
    path.write_text(text)
    return dataclasses.replace(load_config(path), bridge=config.bridge, api=config.api)


async def start_plant(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, keys: bool = False,
    stub: RouteStub | None = None, sink: bool = False,
) -> Plant:
    simulator = PlantSimulator(port=0, seed=3, interval=0.25)
    await simulator.start()
    monkeypatch.setenv(PORT_VARIABLE, str(simulator.port))
    config = load_demo_config(state_dir=tmp_path / "state", api_port=0)
    if sink:
        config = with_unreachable_sink(config, tmp_path)
    runtime = Runtime(with_keys(config) if keys else config)

    def api(facade: ApiFacade) -> ApiServer:
        server = ApiServer(facade)
        if stub is not None:
            stub(server)
        return server

    task = asyncio.create_task(runtime.run(services=[api]), name="test.runtime")
    async with asyncio.timeout(SETTLE):
        await runtime.ready.wait()
    return Plant(runtime, simulator, task)


async def stop_plant(plant: Plant) -> None:
    plant.runtime.stop()
    async with asyncio.timeout(SETTLE):
        await plant.task
    await plant.simulator.stop()


@pytest.fixture
async def plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Plant]:
    running = await start_plant(tmp_path, monkeypatch)
    try:
        yield running
    finally:
        await stop_plant(running)


@pytest.fixture
async def secured_plant(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                        ) -> AsyncIterator[Plant]:
    running = await start_plant(tmp_path, monkeypatch, keys=True)
    try:
        yield running
    finally:
        await stop_plant(running)


# --- the browser ------------------------------------------------------------------------------


@dataclass
class Pages:
    """Opens pages that record every request and script error, and screenshots them all at
    the end of the test."""

    browser: Browser
    directory: Path
    opened: list[Page] = field(default_factory=list)
    requests: list[Request] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def open(self, url: str, *, width: int = 1280, height: int = 900,
                   key: str | None = None) -> Page:
        """A new page (its own session storage; ``key`` already entered) at ``url``."""
        context = await self.browser.new_context(viewport={"width": width, "height": height})
        page = await context.new_page()
        page.on("request", lambda request: self.requests.append(request))
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        if key is not None:
            await page.add_init_script(
                f"sessionStorage.setItem('fieldbridge.console.key', {key!r})")
        self.opened.append(page)
        await page.goto(url)
        return page

    async def screenshots(self) -> None:
        for index, page in enumerate(self.opened):
            if not page.is_closed():
                await page.screenshot(path=self.directory / f"page-{index}.png", full_page=True)

    def hosts(self) -> set[str]:
        """Every host a request went to (data: URLs have none)."""
        return {urlsplit(request.url).hostname or "" for request in self.requests
                if not request.url.startswith(("data:", "blob:"))}


@pytest.fixture
def chromium() -> Path:
    """Debian's Chromium; the tests fail, naming the packages, without it."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: install Debian's packages chromium and "
                    "chromium-driver (apt-get install chromium chromium-driver; tests/run "
                    "does it)")
    return CHROMIUM


@pytest.fixture
async def pages(chromium: Path, tmp_path: Path) -> AsyncIterator[Pages]:
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=str(chromium),
                                                   args=CHROMIUM_ARGS)
        opened = Pages(browser, tmp_path)
        try:
            yield opened
        finally:
            try:
                await opened.screenshots()
            finally:
                await browser.close()


def row(page: Page, point: str) -> Any:
    return page.locator(f'#points-body tr[data-point="{point}"]')


def source_state(page: Page, source: str) -> Any:
    return page.locator(f'#sources-body tr.source[data-id="{source}"] td:nth-child(2) .badge')


# --- the tests --------------------------------------------------------------------------------


async def test_the_console_shows_the_demo_plant_without_leaving_the_box(
    plant: Plant, pages: Pages, tmp_path: Path
) -> None:
    page = await pages.open(plant.url)
    for point in DEMO_POINTS:
        await expect(row(page, point).locator("td.quality")).to_contain_text("good")
    await expect(row(page, "boiler.supply_temp").locator("td.value")).to_contain_text("degC")
    await expect(source_state(page, "plant")).to_have_text("up")
    await expect(source_state(page, "opcua-plant")).to_have_text("disabled")
    await expect(page.locator("#live")).to_have_text("Live")
    await expect(page.locator("#sinks-body")).to_contain_text("No sinks configured")
    # Sparklines: drawn from the history of each visible row and the live events.
    await expect(row(page, "boiler.supply_temp").locator("svg.spark polyline")).to_have_count(1)
    # Discovery works in the demo: the panel offers it (the README's picture once said it
    # was not available).
    await expect(page.locator("#discover-availability")).to_contain_text(
        "Browse an OPC-UA server")
    await expect(page.locator("#discover-run")).to_be_enabled()
    assert pages.hosts() == {"127.0.0.1"}, sorted(request.url for request in pages.requests)
    assert not pages.errors
    await page.screenshot(path=tmp_path / "console.png", full_page=True)
    if os.environ.get("FIELDBRIDGE_SCREENSHOT") == "update":
        # How the README's picture is made: FIELDBRIDGE_SCREENSHOT=update pytest -k this test.
        shutil.copyfile(tmp_path / "console.png", SCREENSHOT)


async def test_a_value_changes_on_screen_within_seconds(plant: Plant, pages: Pages) -> None:
    page = await pages.open(plant.url)
    value = row(page, "boiler.supply_temp").locator("td.value .v")
    await expect(value).not_to_have_text("—")
    before = await value.text_content()
    assert before is not None
    await expect(value).not_to_have_text(before, timeout=5000)


async def test_stopping_the_simulator_turns_the_source_down_on_screen(
    plant: Plant, pages: Pages
) -> None:
    page = await pages.open(plant.url)
    await expect(source_state(page, "plant")).to_have_text("up")
    await plant.simulator.stop()
    await expect(source_state(page, "plant")).to_have_text("down")
    plant_row = page.locator('#sources-body tr.source[data-id="plant"]')
    await expect(plant_row.locator(".badge.cat-transient")).to_have_count(1)
    await expect(row(page, "boiler.supply_temp").locator("td.quality")).to_contain_text("bad")


async def test_search_narrows_the_points_by_id_tag_or_source(
    plant: Plant, pages: Pages
) -> None:
    page = await pages.open(plant.url)
    rows = page.locator("#points-body tr[data-point]")
    await expect(rows).to_have_count(14)
    await page.fill("#search", "_temp")
    await expect(rows).to_have_count(3)  # supply, return, and the OPC-UA temperature
    await page.fill("#search", "opcua-plant")
    await expect(rows).to_have_count(3)
    await page.fill("#search", "site=demo pump")
    await expect(rows).to_have_count(3)  # pump_command, pump_running, opcua.pump_speed
    await page.fill("#search", "no-such-point")
    await expect(page.locator("#points-body")).to_contain_text("No point matches")


async def test_a_point_opens_by_keyboard_with_its_history_chart(
    plant: Plant, pages: Pages
) -> None:
    page = await pages.open(plant.url)
    link = row(page, "boiler.pressure").locator("button.point-link")
    await expect(row(page, "boiler.pressure").locator("td.quality")).to_contain_text("good")
    await link.focus()
    await page.keyboard.press("Enter")
    dialog = page.locator("#detail")
    await expect(dialog).to_be_visible()
    await expect(page.locator("#detail-title")).to_have_text("boiler.pressure")
    await expect(dialog.locator(".uplot canvas")).to_have_count(1)
    await expect(page.locator("#detail-note")).to_contain_text("over the last 15 minutes")
    await page.select_option("#detail-range", "6h")
    await expect(page.locator("#detail-note")).to_contain_text("over the last 6 hours")
    await expect(page.locator("#detail-write")).to_be_hidden()  # not writable
    await page.keyboard.press("Escape")
    await expect(dialog).to_be_hidden()
    await expect(link).to_be_focused()


async def test_a_wrong_key_shows_the_401_message(secured_plant: Plant, pages: Pages) -> None:
    page = await pages.open(secured_plant.url)
    message = page.locator("#auth-message")
    await expect(message).to_contain_text("Not authorized (401)")
    await expect(message).to_contain_text("“read” scope")
    await page.fill("#key-input", "not-the-key")
    await page.press("#key-input", "Enter")
    await expect(message).to_contain_text("the API key is not known")
    await expect(message).to_contain_text("“read” scope")
    await expect(page.locator("#points-body tr[data-point]")).to_have_count(0)


async def test_write_back_needs_the_write_scope_and_a_confirmation(
    secured_plant: Plant, pages: Pages
) -> None:
    viewer_key = KEYS["viewer"][0]
    page = await pages.open(secured_plant.url, key=viewer_key)
    await expect(row(page, "boiler.setpoint").locator("td.quality")).to_contain_text("good")
    await row(page, "boiler.setpoint").locator("button.point-link").click()
    await expect(page.locator("#write-start")).to_be_disabled()
    await expect(page.locator("#write-result")).to_contain_text("“write” scope")

    operator_key = KEYS["operator"][0]
    page = await pages.open(secured_plant.url, key=operator_key)
    await expect(row(page, "boiler.setpoint").locator("td.quality")).to_contain_text("good")
    await row(page, "boiler.setpoint").locator("button.point-link").click()
    await page.fill("#write-value", "52.5")
    await page.click("#write-start")
    await expect(page.locator("#write-question")).to_contain_text("Write 52.5 degC to "
                                                                  "boiler.setpoint")
    await page.click("#write-no")
    await expect(page.locator("#write-result")).to_contain_text("nothing was written")
    assert secured_plant.simulator.model.state.setpoint != 52.5
    await page.click("#write-start")
    await page.click("#write-yes")
    await expect(page.locator("#write-result")).to_contain_text("Written: 52.5")
    # The next poll brings the new setpoint back from the device.
    await expect(page.locator("#detail-value")).to_have_text("52.5")
    async with asyncio.timeout(SETTLE):  # the plant takes it on its next step
        assert (await secured_plant.simulator.next_update()).setpoint == 52.5
    # The key went in a header, never in a URL.
    for key in (viewer_key, operator_key):
        assert not [request.url for request in pages.requests if key in request.url]
    api_calls = [request for request in pages.requests if "/v1/" in request.url]
    assert api_calls
    for request in api_calls:
        assert (await request.all_headers()).get("authorization", "").startswith("Bearer ")


async def test_docs_render_offline(plant: Plant, pages: Pages) -> None:
    page = await pages.open(plant.url + "docs")
    await expect(page.locator(".swagger-ui .info .title")).to_contain_text("Fieldbridge")
    await expect(page.locator(".opblock-summary-path").first).to_be_visible()
    assert pages.hosts() == {"127.0.0.1"}, sorted(request.url for request in pages.requests)


def first_route(server: ApiServer, path: str, endpoint: Callable[..., Any],
                methods: list[str]) -> None:
    """Serve ``endpoint`` at ``path`` ahead of the API's own routes."""
    server.app.add_api_route(path, endpoint, methods=methods, include_in_schema=False)
    routes = server.app.router.routes
    routes.insert(0, routes.pop())


def no_discovery(server: ApiServer) -> None:
    """The API of a bridge older than discovery: ``/v1/discover/...`` is not a route."""

    async def absent(protocol: str) -> JSONResponse:
        return JSONResponse({"error": {"code": "not_found", "message": "no route"}},
                            status_code=404)

    first_route(server, "/v1/discover/{protocol}", absent, ["GET", "POST"])


async def test_discovery_says_it_is_not_available_without_the_endpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pages: Pages
) -> None:
    plant = await start_plant(tmp_path, monkeypatch, stub=no_discovery)
    try:
        page = await pages.open(plant.url)
        await expect(page.locator("#discover-availability")).to_contain_text(
            "Discovery is not available on this bridge")
        await expect(page.locator("#discover-run")).to_be_disabled()
    finally:
        await stop_plant(plant)


DISCOVERED = {
    "protocol": "modbus",
    "yaml": "sources:\n  - id: found\n    protocol: modbus\n",
    "items": [{"name": "hr_0", "address": "hr 0", "type": "uint16", "unit": None,
               "writable": True}],
    "partial": True,
    "warnings": ["unit 2 did not answer"],
}


def discovery_stub(server: ApiServer, received: list[dict[str, Any]]) -> None:
    """A stand-in for ``POST /v1/discover/{protocol}`` that answers as its contract says and
    keeps what it was asked in ``received``: a body the protocol's request model refuses
    fails the test."""

    async def discover(protocol: str, body: dict[str, Any]) -> dict[str, Any]:
        received.append({"protocol": protocol, **body})
        discoverable()[protocol].request_model.model_validate(body)
        return {**DISCOVERED, "protocol": protocol,
                "yaml": str(DISCOVERED["yaml"]).replace("modbus", protocol)}

    first_route(server, "/v1/discover/{protocol}", discover, ["POST"])


async def test_discovery_panel_shows_a_result(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pages: Pages
) -> None:
    received: list[dict[str, Any]] = []
    plant = await start_plant(tmp_path, monkeypatch,
                              stub=lambda server: discovery_stub(server, received))
    try:
        page = await pages.open(plant.url)
        await expect(page.locator("#discover-availability")).to_contain_text("Browse an OPC-UA")
        await page.select_option("#discover-protocol", "modbus")
        fieldset = page.locator('fieldset[data-protocol="modbus"]')
        await fieldset.locator('[name="host"]').fill("127.0.0.1")
        await fieldset.locator('[name="units"]').fill("1, 2")
        await page.click("#discover-run")
        await expect(page.locator("#discover-items")).to_contain_text("hr_0")
        await expect(page.locator("#discover-warnings")).to_contain_text("unit 2 did not answer")
        await expect(page.locator("#discover-warnings")).to_contain_text("partial")
        await expect(page.locator("#discover-yaml")).to_contain_text("protocol: modbus")
        # The other protocols' forms, with their default values.
        for protocol, field_name, target in (("opcua", "url", "opc.tcp://127.0.0.1:4840/"),
                                             ("mqtt", "host", "127.0.0.1")):
            await page.select_option("#discover-protocol", protocol)
            await page.locator(f'fieldset[data-protocol="{protocol}"] [name="{field_name}"]'
                               ).fill(target)
            await page.click("#discover-run")
            await expect(page.locator("#discover-yaml")).to_contain_text(
                f"protocol: {protocol}")
        # Exactly the fields of each protocol's request model, in the forms it takes.
        assert received == [{"protocol": protocol, **CONSOLE_BODIES[protocol]}
                            for protocol in ("modbus", "opcua", "mqtt")]
    finally:
        await stop_plant(plant)


async def test_the_console_is_usable_at_phone_width(plant: Plant, pages: Pages) -> None:
    page = await pages.open(plant.url, width=390, height=844)
    await expect(row(page, "boiler.supply_temp").locator("td.quality")).to_contain_text("good")
    await expect(row(page, "boiler.supply_temp").locator("button.point-link")).to_be_visible()
    overflow = await page.evaluate(
        "document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, f"the page is {overflow} px wider than the phone"


async def test_sinks_show_their_state_and_outbox(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pages: Pages
) -> None:
    plant = await start_plant(tmp_path, monkeypatch, sink=True)
    try:
        page = await pages.open(plant.url)
        sink = page.locator('#sinks-body tr[data-id="rabbit"]')
        await expect(sink.locator("td:nth-child(2) .badge")).to_have_text("down")
        await expect(sink.locator(".badge.cat-transient")).to_have_count(1)
        # Events wait for a broker that is not there; the count grows as the plant is polled.
        outbox = sink.locator("td:nth-child(3) b")
        await expect(outbox).to_have_text(re.compile(r"^[1-9]\d*$"))
        before = int(await outbox.text_content() or "0")
        await expect(outbox).not_to_have_text(str(before))
        await expect(sink.locator("td:nth-child(3)")).to_contain_text("/ 1000000")
        await expect(sink.locator("td:nth-child(4)")).to_have_text("0")  # confirmed
    finally:
        await stop_plant(plant)


def test_the_readme_screenshot_is_committed() -> None:
    assert SCREENSHOT.is_file()
    assert SCREENSHOT.read_bytes().startswith(b"\x89PNG")
