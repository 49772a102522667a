"""The AMQP connection's error during a RabbitMQ outage (issue "Hardening", measured item 10):
`last_error` read `cannot connect: ` with nothing after it, because pika's errors and the
socket timeout they wrap often have an empty text."""

from __future__ import annotations

import pika.exceptions
import pytest
from pika.adapters.utils.connection_workflow import (
    AMQPConnectionWorkflowFailed,
    AMQPConnectorSocketConnectError,
)

from bridge.errors import ErrorCategory
from protocols.amqp.connection import open_error


@pytest.mark.parametrize(("error", "reason"), [
    (AMQPConnectorSocketConnectError(TimeoutError()), "cannot connect: TimeoutError"),
    (AMQPConnectionWorkflowFailed([AMQPConnectorSocketConnectError(
        ConnectionRefusedError(111, "Connection refused"))]),
     "cannot connect: [Errno 111] Connection refused"),
    (pika.exceptions.AMQPConnectionError(), "cannot connect: AMQPConnectionError"),
    (AMQPConnectionWorkflowFailed([]), "cannot connect: AMQPConnectionWorkflowFailed"),
])
def test_the_reason_is_never_empty(error: BaseException, reason: str) -> None:
    failure = open_error("amqp://guest@127.0.0.1:5672/%2F", error)
    assert failure.reason == reason
    assert failure.category is ErrorCategory.TRANSIENT
