"""The one place that reaches into the asyncua client's internals.

asyncua 2.1 gives no public way to do three things a clean close of a session needs:

- wait for the publish loop: ``Client.disconnect`` cancels the loop's task but does not wait
  for it, so a closed source would leave it running; the task is the private
  ``UaClient._publish_task``;
- tear down our side of a connection asyncua already gave up on (a failed keep-alive leaves a
  socket open): ``UaClient.protocol``, its ``is_closed`` and ``disconnect_socket``, set back to
  ``None`` so ``disconnect`` does not send a CloseSession nobody answers;
- keep quiet about a connection that is gone, which the source reports once itself: a
  ``logging.Filter`` on asyncua's module loggers that drops the traceback of its publish loop
  and the warnings of closing such a session, matched by their message text.

``tests/opcua/test_asyncua_adapter.py`` fails, naming the installed version, when one of these
changes; asyncua is pinned to its minor version in pyproject.toml for the same reason.
"""

from __future__ import annotations

import asyncio
import logging

from asyncua.client.client import Client

LOGGERS = ("asyncua.client.ua_session.UaSession", "asyncua.client.ua_client.UaClient")
"""asyncua's loggers (named after its private modules) that write about a lost connection."""


class LostConnectionNoise(logging.Filter):
    """Drops what asyncua logs about a connection that is gone: a traceback from its publish
    loop and warnings from closing a session nobody can answer."""

    TEARDOWN = frozenset({
        "close_session but connection wasn't established",
        "close_session was called but connection is closed",
        "close_secure_channel was called but connection is closed",
    })
    """asyncua's messages, word for word, when closing a session over a lost connection."""
    PUBLISH_CRASHED = "Publish iteration crashed"
    """The start of the message logged with the traceback of a failed publish loop."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record unless it is one of the messages above."""
        message = record.msg if isinstance(record.msg, str) else ""
        if message in self.TEARDOWN:
            return False
        if message.startswith(self.PUBLISH_CRASHED) and record.exc_info:
            return not isinstance(record.exc_info[1], ConnectionError)
        return True


def quiet_lost_connections() -> None:
    """Install ``LostConnectionNoise`` on asyncua's loggers (once per process is enough)."""
    noise = LostConnectionNoise()
    for name in LOGGERS:
        logging.getLogger(name).addFilter(noise)


def publish_task(client: Client) -> asyncio.Task[None] | None:
    """The task of ``client``'s publish loop, if one runs; ``disconnect`` does not wait for it."""
    return client.uaclient._publish_task


def drop_lost_transport(client: Client) -> None:
    """Close the socket of a connection asyncua gave up on and forget it, so that
    ``disconnect`` tears down only our side."""
    uaclient = client.uaclient
    if uaclient.protocol is not None:
        if not uaclient.protocol.is_closed:
            uaclient.protocol.disconnect_socket()
        uaclient.protocol = None
