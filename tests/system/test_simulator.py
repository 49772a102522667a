"""The demo plant: its model, its register encoding, and its Modbus TCP server."""

from __future__ import annotations

import asyncio
import itertools
import struct
from collections.abc import AsyncIterator, Sequence

import pytest
from pymodbus.client import AsyncModbusTcpClient

from bridge.demo.simulator import (
    INPUT_REGISTER_COUNT,
    MODE_ALARM,
    MODE_HEATING,
    MODE_IDLE,
    MODE_STANDBY,
    STATUS_ALARM,
    STATUS_BURNER_ON,
    STATUS_PUMP_RUNNING,
    PlantModel,
    PlantSimulator,
    PlantState,
)

UNIT = 1


@pytest.fixture
async def simulator() -> AsyncIterator[PlantSimulator]:
    async with PlantSimulator(port=0, seed=7, interval=0.05) as running:
        yield running
    assert not [task for task in asyncio.all_tasks() if "simulator" in task.get_name()]


@pytest.fixture
async def client(simulator: PlantSimulator) -> AsyncIterator[AsyncModbusTcpClient]:
    modbus = AsyncModbusTcpClient("127.0.0.1", port=simulator.port, timeout=2, retries=0)
    assert await modbus.connect()
    yield modbus
    modbus.close()


def decode(registers: Sequence[int]) -> dict[str, float | int]:
    """The input registers, decoded by hand as the register map documents them."""
    supply, return_, pressure_low, pressure_high, energy_high, energy_low, status, mode = (
        registers)
    signed = struct.unpack(">hh", struct.pack(">HH", supply, return_))
    return {
        "supply_temp": signed[0] / 10,
        "return_temp": signed[1] / 10,
        "pressure": struct.unpack(">f", struct.pack(">HH", pressure_high, pressure_low))[0],
        "energy": energy_high << 16 | energy_low,
        "status": status,
        "mode": mode,
    }


def run_model(seed: int, steps: int, seconds: float = 0.5) -> list[PlantState]:
    model = PlantModel(seed=seed)
    return [model.step(seconds) for _ in range(steps)]


# --- the model ------------------------------------------------------------------------


def test_same_seed_same_plant() -> None:
    assert run_model(42, 300) == run_model(42, 300)
    assert run_model(42, 300) != run_model(43, 300)


def test_temperatures_drift_smoothly_around_their_working_points() -> None:
    states = run_model(1, 1200)
    supplies = [state.supply_temp for state in states]
    returns = [state.return_temp for state in states]
    assert min(supplies) > 58
    assert max(supplies) < 72
    assert min(returns) > 40
    assert max(returns) < 52
    assert max(supplies) - min(supplies) > 3, "the supply should swing with the burner"
    steps = [abs(after - before) for before, after in itertools.pairwise(supplies)]
    assert max(steps) < 1.0, "no jumps between two half-second steps"


def test_energy_counter_only_increases() -> None:
    model = PlantModel(seed=3)
    energies = [model.step(0.5).energy for _ in range(400)]
    model.command_pump(False)  # burner off: the counter stands still, never goes back
    energies += [model.step(0.5).energy for _ in range(100)]
    assert all(after >= before for before, after in itertools.pairwise(energies))
    assert energies[-1] > energies[0]
    assert energies[-1] == energies[-100]
    assert energies[0] > 0xFFFF, "the counter uses both words"


def test_alarm_trips_the_burner_now_and_then() -> None:
    states = run_model(5, 4000)
    alarms = [state for state in states if state.alarm]
    assert alarms, "an alarm should occur within half an hour of simulated time"
    assert len(alarms) < len(states) / 5, "alarms are occasional"
    assert not any(state.burner_on for state in alarms)
    assert all(state.mode == MODE_ALARM for state in alarms)
    assert {state.mode for state in states} >= {MODE_HEATING, MODE_IDLE, MODE_ALARM}


def test_status_word_and_mode_follow_the_state() -> None:
    model = PlantModel(seed=9)
    for state in (model.step(0.5) for _ in range(200)):
        assert bool(state.status_word & STATUS_PUMP_RUNNING) == state.pump_running
        assert bool(state.status_word & STATUS_BURNER_ON) == state.burner_on
        assert bool(state.status_word & STATUS_ALARM) == state.alarm
    model.command_pump(False)
    state = model.step(0.5)
    assert not state.pump_running
    assert not state.burner_on
    assert not state.flow
    assert state.mode in (MODE_STANDBY, MODE_ALARM)


def test_setpoint_is_clamped_and_moves_the_supply() -> None:
    model = PlantModel(seed=11)
    assert model.set_setpoint(120.0) == 85.0
    assert model.set_setpoint(-5.0) == 30.0
    model.set_setpoint(75.0)
    late = [model.step(0.5).supply_temp for _ in range(400)][-100:]
    assert 70 < sum(late) / len(late) < 80


def test_registers_encode_the_state() -> None:
    state = run_model(2, 50)[-1]
    registers = state.input_registers()
    assert len(registers) == INPUT_REGISTER_COUNT
    assert all(0 <= register <= 0xFFFF for register in registers)
    decoded = decode(registers)
    assert decoded["supply_temp"] == pytest.approx(state.supply_temp, abs=0.05)
    assert decoded["return_temp"] == pytest.approx(state.return_temp, abs=0.05)
    assert decoded["pressure"] == pytest.approx(state.pressure, rel=1e-6)
    assert decoded["energy"] == state.energy
    assert decoded["status"] == state.status_word
    assert decoded["mode"] == state.mode


def test_step_must_move_forward() -> None:
    with pytest.raises(ValueError, match="longer than zero"):
        PlantModel(seed=1).step(0)


# --- the server -------------------------------------------------------------------------


async def test_serves_on_a_free_port(simulator: PlantSimulator) -> None:
    assert simulator.port > 0


async def test_a_modbus_client_reads_moving_registers(
    simulator: PlantSimulator, client: AsyncModbusTcpClient
) -> None:
    reads = []
    for _ in range(6):
        response = await client.read_input_registers(0, count=INPUT_REGISTER_COUNT,
                                                     device_id=UNIT)
        assert not response.isError(), response
        reads.append(decode(response.registers))
        await simulator.next_update()
    assert len({read["pressure"] for read in reads}) > 1, "the pressure should move"
    energies = [read["energy"] for read in reads]
    assert energies == sorted(energies)
    for read in reads:
        assert 55 < read["supply_temp"] < 75
        assert 1.0 < read["pressure"] < 2.2


async def test_registers_match_the_state_after_each_update(
    simulator: PlantSimulator, client: AsyncModbusTcpClient
) -> None:
    state = await simulator.next_update()
    response = await client.read_input_registers(0, count=INPUT_REGISTER_COUNT, device_id=UNIT)
    # The next step may have come in between: accept this state or the one after.
    assert response.registers in (state.input_registers(), simulator.state.input_registers())


async def test_pump_coil_stops_the_pump(
    simulator: PlantSimulator, client: AsyncModbusTcpClient
) -> None:
    coil = await client.read_coils(0, count=1, device_id=UNIT)
    assert coil.bits[0] is True
    flow = await client.read_discrete_inputs(0, count=1, device_id=UNIT)
    assert flow.bits[0] is True
    assert not (await client.write_coil(0, False, device_id=UNIT)).isError()
    await simulator.next_update()
    state = await simulator.next_update()
    assert not state.pump_running
    assert not state.burner_on
    response = await client.read_input_registers(6, count=1, device_id=UNIT)
    assert response.registers[0] & STATUS_PUMP_RUNNING == 0


async def test_setpoint_register_is_clamped_by_the_plant(
    simulator: PlantSimulator, client: AsyncModbusTcpClient
) -> None:
    setpoint = await client.read_holding_registers(0, count=1, device_id=UNIT)
    assert setpoint.registers == [650]
    assert not (await client.write_register(0, 9000, device_id=UNIT)).isError()
    await simulator.next_update()
    assert simulator.state.setpoint == 85.0
    setpoint = await client.read_holding_registers(0, count=1, device_id=UNIT)
    assert setpoint.registers == [850]


async def test_unmapped_address_is_an_exception_response(
    client: AsyncModbusTcpClient,
) -> None:
    response = await client.read_input_registers(100, count=1, device_id=UNIT)
    assert response.isError()
    assert response.exception_code == 2  # illegal data address


async def test_stop_closes_the_port_and_the_task() -> None:
    simulator = PlantSimulator(port=0, seed=1, interval=0.05)
    with pytest.raises(RuntimeError, match="not running"):
        _ = simulator.port
    await simulator.start()
    port = simulator.port
    with pytest.raises(RuntimeError, match="already running"):
        await simulator.start()
    await simulator.next_update()
    await simulator.stop()
    with pytest.raises(RuntimeError, match="not running"):
        _ = simulator.port
    assert not [task for task in asyncio.all_tasks() if "simulator" in task.get_name()]
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)


@pytest.mark.parametrize(
    ("arguments", "message"),
    [({"port": 70000}, "port"), ({"unit": 0}, "unit"), ({"interval": 0}, "interval")],
)
def test_arguments_are_checked_at_once(arguments: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PlantSimulator(**arguments)  # type: ignore[arg-type]
