"""``/v1/discover/{protocol}``: browse, scan or sample an endpoint and return its mapping.

The request body takes the parameters of ``fieldbridge discover <protocol>`` as JSON; the
response holds the generated configuration (YAML) and a JSON listing of what was found. A
discovery talks to a device on the user's behalf, so it needs the ``admin`` scope; it is
bounded in time (``MAX_SECONDS``) and size (``MAX_POINTS``), and one runs at a time.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Path, Request
from pydantic import BaseModel, Field, ValidationError

from bridge.api.auth import Principal
from bridge.api.context import Context, authorize_admin
from bridge.api.handlers import JsonBody
from bridge.api.models import ERROR_RESPONSES, ErrorResponse
from bridge.core.discovery import Budget, DiscoveryContext
from bridge.errors import ApiError, ConnectorError, ErrorCategory
from bridge.registry import discoverable

audit = logging.getLogger("bridge.audit")

MAX_SECONDS = 120.0
"""A discovery over REST stops after this long and returns what it found, partial."""
GRACE = 15.0
"""How long past ``MAX_SECONDS`` a discovery may take to stop before it is abandoned."""
MAX_POINTS = 10_000
"""A discovery over REST stops at this many points, partial."""


class DiscoveredItemModel(BaseModel):
    """One thing found; protocols add their own fields (browse path, table, JMESPath …)."""

    model_config = {"extra": "allow"}

    name: str = Field(description="The point name in the generated configuration.")
    address: str = Field(description="Where it lives, in the protocol's notation.")
    type: str = Field(description="Its data type as the endpoint describes it.")
    unit: str | None = Field(description="Engineering unit, when the endpoint says.")
    writable: bool = Field(description="Whether the endpoint allows writing it.")
    description: str | None = Field(default=None, description="The endpoint's description.")


class DiscoveryResponse(BaseModel):
    """The generated configuration and the listing."""

    protocol: str
    yaml: str = Field(description="A configuration file that `fieldbridge validate` accepts.")
    items: list[DiscoveredItemModel]
    partial: bool = Field(description="Part of the endpoint was not covered (an error, or a "
                          "time or size bound); the warnings say why.")
    warnings: list[str]


Admin = Depends(authorize_admin)

router = APIRouter(prefix="/v1", responses=ERROR_RESPONSES, tags=["discovery"])

_FAILURES = {
    ErrorCategory.CONFIG: (422, "rejected", "the endpoint refused these settings (a security "
                           "policy it does not offer, a node it does not have): change them"),
    ErrorCategory.AUTH: (502, "endpoint_denied", "the endpoint refused the credentials or "
                         "certificate; check them, or have the endpoint trust the bridge"),
    ErrorCategory.TRANSIENT: (504, "endpoint_unavailable", "the endpoint did not answer; check "
                              "the address, the port and that it runs"),
    ErrorCategory.PROTOCOL: (502, "protocol_error", "the endpoint answered something that is "
                             "not valid"),
    ErrorCategory.DEVICE: (502, "device_error", "the device refused the requests"),
}


@router.post(
    "/discover/{protocol}", response_model=DiscoveryResponse,
    responses={
        404: {"model": ErrorResponse, "description": "The protocol offers no discovery."},
        409: {"model": ErrorResponse, "description": "A discovery is already running."},
        502: {"model": ErrorResponse, "description": "The endpoint refused or answered "
              "garbage."},
        504: {"model": ErrorResponse, "description": "The endpoint did not answer, or the "
              "discovery overran its time bound."},
    })
async def discover(
    context: Context,
    request: Request,
    protocol: Annotated[str, Path(description="`opcua`, `modbus` or `mqtt`.")],
    parameters: Annotated[dict[str, Any], Body(
        description="The options of `fieldbridge discover <protocol>` as JSON, e.g. "
        "`{\"url\": \"opc.tcp://plc:4840\", \"root\": \"i=85\", \"depth\": 5}`, "
        "`{\"host\": \"10.0.0.5\", \"port\": 502, \"units\": \"1-3\"}` or "
        "`{\"host\": \"broker\", \"filter\": \"#\", \"seconds\": 5}`.")],
    principal: Annotated[Principal, Admin],
) -> JsonBody:
    """Browse an OPC-UA server, scan a Modbus device or sample an MQTT broker, and return a
    configuration for it; needs the `admin` scope.

    The discovery stops after 120 s or 10,000 points and returns what it found, with
    `partial` set and the reason in `warnings`; a failure part-way does the same. One
    discovery runs at a time: a second request meanwhile gets 409. Nothing is configured
    or started: the YAML is for the caller to review and install.
    """
    specs = discoverable()
    spec = specs.get(protocol)
    if spec is None:
        raise ApiError(404, "not_found", f"protocol '{protocol}' offers no discovery",
                       f"discovery is offered for: {', '.join(sorted(specs)) or 'none'}")
    try:
        discovery_request = spec.request_model.model_validate(parameters)
    except ValidationError as exc:
        details: list[dict[str, object]] = [
            {"location": ".".join(["body", *(str(part) for part in issue["loc"])]),
             "message": issue["msg"]} for issue in exc.errors()]
        first = details[0]
        raise ApiError(422, "invalid_request", f"{first['location']}: {first['message']}",
                       "fix the listed parameters; they are those of 'fieldbridge discover "
                       f"{protocol}'", details=details) from None
    lock = context.discovery
    if lock.locked():
        raise ApiError(409, "discovery_running", "a discovery is already running",
                       "wait for it to finish, then try again", headers={"Retry-After": "10"})
    async with lock:
        audit.info("discovery: key %s, protocol %s", principal.name, protocol)
        budget = Budget(max_seconds=MAX_SECONDS, max_items=MAX_POINTS)
        run_context = DiscoveryContext(budget=budget, state_dir=context.runtime.state_dir,
                                       command=f"POST {request.url.path}")
        try:
            async with asyncio.timeout(MAX_SECONDS + GRACE):
                result = await spec.run(discovery_request, run_context)
        except TimeoutError:
            raise ApiError(504, "discovery_timeout", f"the discovery did not finish in "
                           f"{MAX_SECONDS + GRACE:g} s", "narrow it (a deeper root, fewer "
                           "units or a shorter range)") from None
        except ConnectorError as exc:
            status, code, hint = _FAILURES[exc.category]
            raise ApiError(status, code, f"{exc.endpoint}: {exc.reason}", hint) from exc
    return JsonBody(result.to_dict())
