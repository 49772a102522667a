"""BACnet engineering units as the unit names the rest of Fieldbridge uses.

Fieldbridge writes units the way its examples and profiles do (``degC``, ``kWh``, ``%``,
``m3/h``). The common BACnet units are translated to those; any other unit keeps its BACnet
name (``cubic-feet-per-minute``), which is still readable, and ``no-units`` is no unit.
"""

from __future__ import annotations

from typing import Any

UNIT_NAMES: dict[str, str] = {
    "degrees-celsius": "degC",
    "degrees-fahrenheit": "degF",
    "degrees-kelvin": "K",
    "delta-degrees-fahrenheit": "delta_degF",
    "delta-degrees-kelvin": "delta_K",
    "percent": "%",
    "percent-relative-humidity": "%RH",
    "parts-per-million": "ppm",
    "parts-per-billion": "ppb",
    "volts": "V",
    "millivolts": "mV",
    "kilovolts": "kV",
    "amperes": "A",
    "milliamperes": "mA",
    "watts": "W",
    "kilowatts": "kW",
    "megawatts": "MW",
    "watt-hours": "Wh",
    "kilowatt-hours": "kWh",
    "megawatt-hours": "MWh",
    "volt-amperes": "VA",
    "kilovolt-amperes": "kVA",
    "volt-amperes-reactive": "var",
    "kilovolt-amperes-reactive": "kvar",
    "power-factor": "PF",
    "hertz": "Hz",
    "pascals": "Pa",
    "kilopascals": "kPa",
    "bars": "bar",
    "millibars": "mbar",
    "pounds-force-per-square-inch": "psi",
    "cubic-meters-per-hour": "m3/h",
    "cubic-meters-per-second": "m3/s",
    "liters-per-second": "L/s",
    "liters-per-minute": "L/min",
    "liters-per-hour": "L/h",
    "cubic-meters": "m3",
    "liters": "L",
    "meters-per-second": "m/s",
    "meters": "m",
    "millimeters": "mm",
    "seconds": "s",
    "minutes": "min",
    "hours": "h",
    "days": "d",
    "luxes": "lx",
    "revolutions-per-minute": "rpm",
    "kilograms": "kg",
    "kilograms-per-hour": "kg/h",
    "joules": "J",
    "kilojoules": "kJ",
    "megajoules": "MJ",
    "btus": "BTU",
    "btus-per-hour": "BTU/h",
    "tons-refrigeration": "TR",
    "square-meters": "m2",
    "decibels": "dB",
}
"""BACnet unit name → Fieldbridge unit name, for the units sites use most."""


def unit_name(units: Any) -> str | None:
    """The Fieldbridge unit of a BACnet ``units`` value (an ``EngineeringUnits`` or its name);
    ``None`` for ``no-units`` or nothing."""
    if units is None:
        return None
    name = str(units)
    if not name or name == "no-units":
        return None
    return UNIT_NAMES.get(name, name)
