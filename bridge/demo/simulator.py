"""A small simulated heating plant behind a real Modbus TCP server (pymodbus), for the demo
and the tests.

The registers move like a boiler with a circulation pump: the supply temperature swings
around its setpoint as the burner cycles on its thermostat, the return follows it, the heat
counter only ever increases, and now and then an alarm trips the burner for a few seconds.
Given a seed, the sequence of states is the same on every run.

Register map (unit id 1 by default; Modicon numbers are 1-based, protocol addresses 0-based):

==========  =====  =========================  ====================================  =========
Modicon     Addr.  Point                      Encoding                              Access
==========  =====  =========================  ====================================  =========
30001       ir 0   supply temperature         int16, x10 (°C)                       read
30002       ir 1   return temperature         int16, x10 (°C)                       read
30003-4     ir 2   loop pressure              float32, word order CDAB (bar)        read
30005-6     ir 4   heat delivered             uint32, word order ABCD (Wh),          read
                                              only increases
30007       ir 6   status word                bit 0 pump running, bit 1 burner on,  read
                                              bit 2 alarm
30008       ir 7   operating mode             uint16: 0 standby, 1 idle,            read
                                              2 heating, 3 alarm
40001       hr 0   supply setpoint            int16, x10 (°C), clamped to 30-85     read/write
coil 1      co 0   pump command               bool                                  read/write
10001       di 0   flow switch                bool                                  read
==========  =====  =========================  ====================================  =========

Writing the coil stops or starts the pump on the next update; writing the setpoint moves the
thermostat. ``mappings/profiles/demo-plant.yaml`` maps exactly these registers.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final

from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

logger = logging.getLogger(__name__)

INPUT_REGISTER_COUNT: Final = 8
"""Input registers 0-7 (30001-30008) hold the measurements."""
HOLDING_REGISTER_COUNT: Final = 1
"""Holding register 0 (40001) holds the setpoint."""
BIT_COUNT: Final = 16
"""Coils and discrete inputs are served in one block of 16 each."""

STATUS_PUMP_RUNNING: Final = 1 << 0
STATUS_BURNER_ON: Final = 1 << 1
STATUS_ALARM: Final = 1 << 2

MODE_STANDBY: Final = 0
MODE_IDLE: Final = 1
MODE_HEATING: Final = 2
MODE_ALARM: Final = 3

# Modbus function codes used to reach each table of the datastore.
_READ_COILS: Final = 1
_READ_DISCRETE_INPUTS: Final = 2
_READ_HOLDING_REGISTERS: Final = 3
_READ_INPUT_REGISTERS: Final = 4


@dataclass(frozen=True, slots=True)
class PlantState:
    """One snapshot of the simulated plant, in engineering units."""

    elapsed: float
    """Simulated seconds since start (the sum of the steps, not wall-clock time)."""
    supply_temp: float
    """°C"""
    return_temp: float
    """°C"""
    pressure: float
    """bar"""
    energy: int
    """Heat delivered, Wh; never decreases."""
    setpoint: float
    """°C"""
    pump_command: bool
    pump_running: bool
    burner_on: bool
    alarm: bool
    flow: bool

    @property
    def status_word(self) -> int:
        """The status bits as the plant reports them."""
        return ((STATUS_PUMP_RUNNING if self.pump_running else 0)
                | (STATUS_BURNER_ON if self.burner_on else 0)
                | (STATUS_ALARM if self.alarm else 0))

    @property
    def mode(self) -> int:
        """The operating mode code (``MODE_*``)."""
        if self.alarm:
            return MODE_ALARM
        if not self.pump_running:
            return MODE_STANDBY
        return MODE_HEATING if self.burner_on else MODE_IDLE

    def input_registers(self) -> list[int]:
        """Input registers 0-7, encoded as in the register map."""
        pressure_high, pressure_low = _words(struct.pack(">f", self.pressure))
        energy_high, energy_low = _words(struct.pack(">I", self.energy & 0xFFFF_FFFF))
        return [
            _int16(self.supply_temp * 10),
            _int16(self.return_temp * 10),
            pressure_low, pressure_high,  # CDAB: low word first
            energy_high, energy_low,  # ABCD: high word first
            self.status_word,
            self.mode,
        ]


def _words(data: bytes) -> tuple[int, int]:
    high, low = struct.unpack(">HH", data)
    return high, low


def _int16(value: float) -> int:
    """A signed value as the unsigned register that carries it."""
    clamped = max(-32768, min(32767, round(value)))
    return clamped & 0xFFFF


def _from_int16(register: int) -> int:
    return register - 0x10000 if register & 0x8000 else register


class PlantModel:
    """The plant's behaviour, without any I/O: deterministic for a given seed."""

    AMBIENT = 20.0
    """°C the water cools towards with the pump stopped."""
    BURNER_TARGET = 82.0
    """°C the supply heats towards with the burner on."""
    IDLE_TARGET = 48.0
    """°C the supply cools towards with the pump running and the burner off."""
    HYSTERESIS = 2.5
    """°C either side of the setpoint where the thermostat switches the burner."""
    BURNER_POWER = 24_000.0
    """W of heat while the burner is on."""
    ALARM_RATE = 1 / 180
    """Alarms per simulated second, on average."""
    ALARM_DURATION = 8.0
    """Simulated seconds an alarm keeps the burner off."""
    SETPOINT_RANGE = (30.0, 85.0)

    def __init__(self, *, seed: int | None = None) -> None:
        self._random = random.Random(seed)
        self._elapsed = 0.0
        self._supply = 64.0 + self._random.uniform(-1.0, 1.0)
        self._return = 46.0 + self._random.uniform(-1.0, 1.0)
        self._pressure = 1.8
        self._energy = 1_250_000.0
        self._setpoint = 65.0
        self._pump_command = True
        self._burner = True
        self._alarm_left = 0.0
        self.state = self._snapshot()
        """The latest state."""

    def command_pump(self, running: bool) -> None:
        """Start or stop the circulation pump (takes effect on the next step)."""
        self._pump_command = running

    def set_setpoint(self, celsius: float) -> float:
        """Set the supply setpoint; returns it clamped to the plant's range."""
        low, high = self.SETPOINT_RANGE
        self._setpoint = max(low, min(high, celsius))
        self.state = self._snapshot()
        return self._setpoint

    def step(self, seconds: float) -> PlantState:
        """Advance the plant by ``seconds`` of simulated time and return the new state."""
        if seconds <= 0:
            raise ValueError("a step must be longer than zero seconds")
        noise = self._random.gauss
        self._elapsed += seconds
        pump = self._pump_command
        if self._alarm_left > 0:
            self._alarm_left = max(0.0, self._alarm_left - seconds)
        elif self._random.random() < self.ALARM_RATE * seconds:
            self._alarm_left = self.ALARM_DURATION
        alarm = self._alarm_left > 0
        # Thermostat with hysteresis; no burner without flow or during an alarm.
        if not pump or alarm or self._supply > self._setpoint + self.HYSTERESIS:
            self._burner = False
        elif self._supply < self._setpoint - self.HYSTERESIS:
            self._burner = True
        if self._burner:
            supply_target, supply_rate = self.BURNER_TARGET, 0.04
        elif pump:
            supply_target, supply_rate = self.IDLE_TARGET, 0.03
        else:
            supply_target, supply_rate = self.AMBIENT, 0.004
        self._supply = _approach(self._supply, supply_target, supply_rate, seconds)
        self._supply += noise(0.0, 0.03)
        return_target = self._supply - 18.0 if pump else self.AMBIENT
        self._return = _approach(self._return, return_target, 0.02 if pump else 0.004, seconds)
        self._return += noise(0.0, 0.03)
        pressure_target = 1.2 + (0.6 if pump else 0.0)
        pressure_target += 0.05 * math.sin(2 * math.pi * self._elapsed / 45.0)
        self._pressure = _approach(self._pressure, pressure_target, 0.5, seconds)
        self._pressure += noise(0.0, 0.004)
        if self._burner:
            self._energy += self.BURNER_POWER * seconds / 3600.0
        self.state = self._snapshot()
        return self.state

    def _snapshot(self) -> PlantState:
        pump = self._pump_command
        return PlantState(
            elapsed=self._elapsed,
            supply_temp=self._supply,
            return_temp=self._return,
            pressure=self._pressure,
            energy=int(self._energy),
            setpoint=self._setpoint,
            pump_command=pump,
            pump_running=pump,
            burner_on=self._burner,
            alarm=self._alarm_left > 0,
            flow=pump and self._pressure > 1.5,
        )


def _approach(value: float, target: float, rate: float, seconds: float) -> float:
    """First-order lag: move ``value`` towards ``target`` at ``rate`` per second."""
    return target + (value - target) * math.exp(-rate * seconds)


class PlantSimulator:
    """The simulated plant served over Modbus TCP, as an async context manager.

    ``async with PlantSimulator(port=0) as simulator:`` starts the server on a free port
    (``simulator.port``) and a task that steps the plant every ``interval`` seconds; leaving
    the block stops both. Clients' writes to the pump coil and the setpoint register act on
    the plant at the next step.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        unit: int = 1,
        interval: float = 0.5,
        seed: int | None = None,
    ) -> None:
        if not 0 <= port <= 65535:
            raise ValueError(f"port must be 0-65535, got {port}")
        if not 1 <= unit <= 247:
            raise ValueError(f"unit must be 1-247, got {unit}")
        if interval <= 0:
            raise ValueError(f"interval must be positive, got {interval}")
        self.host = host
        self.unit = unit
        self.interval = interval
        self.model = PlantModel(seed=seed)
        """The plant behind the registers."""
        self.updates = 0
        """Steps taken since start."""
        self._requested_port = port
        self._port: int | None = None
        self._server: Any = None  # pymodbus' server classes are only partly annotated
        self._task: asyncio.Task[None] | None = None
        self._stepped = asyncio.Condition()

    @property
    def port(self) -> int:
        """The port the server listens on (the real one when started with port 0)."""
        if self._port is None:
            raise RuntimeError("the simulator is not running")
        return self._port

    @property
    def state(self) -> PlantState:
        """The latest state of the plant."""
        return self.model.state

    async def start(self) -> None:
        """Start serving and stepping the plant."""
        if self._server is not None:
            raise RuntimeError("the simulator is already running")
        device = SimDevice(id=self.unit, simdata=(
            [SimData(0, values=[False] * BIT_COUNT, datatype=DataType.BITS)],
            [SimData(0, values=[False] * BIT_COUNT, datatype=DataType.BITS)],
            [SimData(0, count=HOLDING_REGISTER_COUNT, values=0, datatype=DataType.REGISTERS)],
            [SimData(0, count=INPUT_REGISTER_COUNT, values=0, datatype=DataType.REGISTERS)],
        ))
        server = ModbusTcpServer(device, address=(self.host, self._requested_port))
        try:
            await server.serve_forever(background=True)
        except RuntimeError as exc:  # pymodbus' way of saying "could not listen"
            raise OSError(f"cannot listen on {self.host}:{self._requested_port}") from exc
        self._server = server
        try:
            # asyncio's Server, or uvloop's, which does not derive from it.
            sockets: Sequence[Any] = getattr(server.transport, "sockets", ())
            self._port = int(sockets[0].getsockname()[1])
            state = self.model.state
            await self._set(_READ_COILS, 0, [state.pump_command])
            await self._set(_READ_HOLDING_REGISTERS, 0, [_int16(state.setpoint * 10)])
            await self._publish(state)
        except BaseException:
            await self.stop()
            raise
        # A plain task, not a TaskGroup: its lifetime spans __aenter__ to __aexit__.
        self._task = asyncio.create_task(
            self._run(), name=f"simulator[{self.host}:{self._port}].update")
        logger.info("plant simulator serving Modbus TCP on %s:%d (unit %d)",
                    self.host, self._port, self.unit)

    async def stop(self) -> None:
        """Stop stepping and serving; re-raises a failure of the update task."""
        task, self._task = self._task, None
        server, self._server = self._server, None
        self._port = None
        failure: BaseException | None = None
        if task is not None:
            task.cancel()
            await asyncio.wait([task])
            if not task.cancelled():
                failure = task.exception()
        if server is not None:
            listener = server.transport
            await server.shutdown()
            if listener is not None:
                await listener.wait_closed()
        if failure is not None:
            raise RuntimeError("the plant simulator failed") from failure

    async def next_update(self) -> PlantState:
        """Wait for the next step of the plant and return its state."""
        async with self._stepped:
            seen = self.updates
            await self._stepped.wait_for(lambda: self.updates > seen)
        return self.model.state

    async def __aenter__(self) -> PlantSimulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._step()

    async def _step(self) -> None:
        (pump_command,) = await self._get(_READ_COILS, 0, 1)
        (setpoint_register,) = await self._get(_READ_HOLDING_REGISTERS, 0, 1)
        self.model.command_pump(bool(pump_command))
        requested = _from_int16(int(setpoint_register)) / 10
        accepted = self.model.set_setpoint(requested)
        if accepted != requested:
            await self._set(_READ_HOLDING_REGISTERS, 0, [_int16(accepted * 10)])
        state = self.model.step(self.interval)
        await self._publish(state)
        async with self._stepped:
            self.updates += 1
            self._stepped.notify_all()

    async def _publish(self, state: PlantState) -> None:
        await self._set(_READ_INPUT_REGISTERS, 0, state.input_registers())
        await self._set(_READ_DISCRETE_INPUTS, 0, [state.flow])

    async def _get(self, function_code: int, address: int, count: int) -> list[int | bool]:
        values = await self._server.async_getValues(self.unit, function_code, address, count)
        return list(values)

    async def _set(self, function_code: int, address: int, values: list[int] | list[bool]) -> None:
        # The datastore picks its table from the function code, reads and writes alike.
        await self._server.async_setValues(self.unit, function_code, address, values)
