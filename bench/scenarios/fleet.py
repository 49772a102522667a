"""A fleet of Modbus devices for the daemon: S4, S5 and the idle footprint share it."""

from __future__ import annotations

from typing import Any


def device_id(port_index: int, unit: int) -> str:
    """``g2-u017``: gateway (server port) 2, unit 17."""
    return f"g{port_index}-u{unit:03d}"


def fleet_config(ports: list[int], units: int, points_per_device: int, interval: str,
                 mode: str = "always") -> dict[str, Any]:
    """One source per server port (a gateway), ``units`` devices behind each, each with
    ``points_per_device`` int16 holding registers from address 0 (one request per device)."""
    profile_points = [{"name": f"p{index:03d}", "table": "holding", "address": index,
                       "type": "int16"} for index in range(points_per_device)]
    return {
        "profiles": {"bench-device": {"protocol": "modbus", "points": profile_points,
                                      "report": {"mode": mode}}},
        "sources": [{
            "id": f"gw{port_index}", "protocol": "modbus", "host": "127.0.0.1", "port": port,
            "timeout": "2s", "retries": 1,
            "devices": [{"id": device_id(port_index, unit), "unit": unit,
                         "profile": "bench-device", "interval": interval}
                        for unit in range(1, units + 1)],
        } for port_index, port in enumerate(ports)],
    }
