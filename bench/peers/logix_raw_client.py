"""Baseline for the Logix scenario: pycomm3 alone, reading the same multi-service packets
back to back for a while (with the same tag definitions the connector declares).

Prints one JSON line: cycles, requests and seconds.
"""

from __future__ import annotations

import argparse
import json
import time

from bench.peers.control import say
from protocols.logix.client import Declared, definition


def main() -> None:
    """Read ``--packets`` (a JSON list of lists of tag requests) for ``--seconds``."""
    from pycomm3 import LogixDriver

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--packets", required=True, help="JSON: [[request, ...], ...]")
    parser.add_argument("--types", required=True, help="JSON: {tag: [type, elements]}")
    parser.add_argument("--connection-size", type=int, default=4002)
    parser.add_argument("--seconds", type=float, default=5.0)
    options = parser.parse_args()
    packets: list[list[str]] = json.loads(options.packets)
    types: dict[str, list[object]] = json.loads(options.types)
    driver = LogixDriver(f"127.0.0.1:{options.port}/1/0", init_tags=False,
                         init_program_name=False, init_info=False)
    driver._cfg["connection_size"] = options.connection_size
    driver._cfg["extended forward open"] = options.connection_size > 511
    driver.open()  # type: ignore[no-untyped-call]
    driver._cfg["use_instance_ids"] = False
    driver._tags = {name: definition(name, Declared(str(type_name), int(str(elements))))
                    for name, (type_name, elements) in types.items()}
    say({"ready": {}})
    cycles = requests = 0
    started = time.monotonic()
    deadline = started + options.seconds
    while time.monotonic() < deadline:
        for packet in packets:
            tags = driver.read(*packet)
            listed = tags if isinstance(tags, list) else [tags]
            failed = [tag for tag in listed if tag.error]
            if failed:
                raise RuntimeError(f"read failed: {failed[0]}")
            requests += 1
        cycles += 1
    seconds = time.monotonic() - started
    driver.close()  # type: ignore[no-untyped-call]
    say({"cycles": cycles, "requests": requests, "seconds": seconds})


if __name__ == "__main__":
    main()
