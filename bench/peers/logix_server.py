"""cpppo's EtherNet/IP Logix simulator for the Logix scenario: started as a child process on a
free port with the tags given, ready once it accepts connections; ends with stdin.

Prints ``{"ready": {"ports": [port]}}``.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys

from bench.peers.control import say, serve_commands


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _answers(port: int) -> bool:
    """Whether the simulator opens an EtherNet/IP connection."""
    from pycomm3 import LogixDriver
    from pycomm3.exceptions import PycommError

    driver = LogixDriver(f"127.0.0.1:{port}/1/0", init_tags=False, init_program_name=False,
                         init_info=False)
    driver._cfg["socket_timeout"] = 1.0
    try:
        opened: bool = driver.open()  # type: ignore[no-untyped-call]
        driver.close()  # type: ignore[no-untyped-call]
    except PycommError:
        return False
    return opened


async def main() -> None:
    """Run the simulator until stdin closes."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("tags", nargs="+", help="NAME=TYPE or NAME=TYPE[N]")
    options = parser.parse_args()
    port = _free_port()
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cpppo.server.enip", "--address", f"127.0.0.1:{port}",
        *options.tags, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(60):
            while True:
                try:
                    _, writer = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.05)  # the child is still starting
                    continue
                writer.close()
                await writer.wait_closed()
                # cpppo listens before its tags are set up: wait for a real session.
                if await asyncio.to_thread(_answers, port):
                    break
        say({"ready": {"ports": [port]}})
        await serve_commands(lambda request: {"error": "no commands"})
    finally:
        process.terminate()
        await process.wait()


if __name__ == "__main__":
    asyncio.run(main())
