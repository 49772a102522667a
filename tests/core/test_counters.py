"""Counters declared once: only declared counters count, every declaration says what it counts,
no module addresses a counter by a string key, and the README's table is the declarations'."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from bridge.core.counters import (
    READINGS,
    REJECTED,
    TABLE_END,
    TABLE_START,
    CounterSpec,
    Counts,
    Owner,
    UndeclaredCounterError,
    declarations,
    declare,
    declared,
    markdown_table,
)
from bridge.core.status import ConnectionState, EndpointStatus, StatusSnapshot
from bridge.pipeline.worker.lifecycle import add_counters

ROOT = Path(__file__).resolve().parents[2]
STRING_KEY = re.compile(r"""counters\[\s*f?["']""")


def status() -> EndpointStatus:
    return EndpointStatus(name="plant", kind="source", protocol="modbus", endpoint="x")


def test_declared_counters_count_and_read_by_constant_or_name() -> None:
    counts = Counts()
    counts.add(READINGS)
    counts.add(READINGS, 4)
    assert counts[READINGS] == counts["readings"] == 5
    assert counts["rejected"] == 0
    assert counts.to_dict() == {"readings": 5}
    assert Counts({"readings": 5}) == counts


def test_a_counter_nobody_declared_is_refused() -> None:
    counts = Counts()
    forged = CounterSpec("readings_forged", "Made without declare.", "readings",
                         frozenset({Owner.SOURCE}))
    with pytest.raises(UndeclaredCounterError) as raised:
        counts.add(forged)
    assert "readings_forged" in str(raised.value)
    # A spec with a declared name that declare() did not make is refused as well.
    with pytest.raises(UndeclaredCounterError):
        counts.add(CounterSpec("readings", READINGS.help, READINGS.unit, READINGS.owners))
    with pytest.raises(UndeclaredCounterError):
        counts.get("readngs")
    with pytest.raises(UndeclaredCounterError):
        Counts({"readngs": 1})
    with pytest.raises(UndeclaredCounterError):
        declared("readngs")
    assert counts.to_dict() == {}


def test_mirroring_a_status_frame_checks_its_counter_names() -> None:
    snapshot = StatusSnapshot(state=ConnectionState.UP, since=1.0,
                              counters={"readings": 3, "rejected": 1})
    daemon = status()
    daemon.mirror(snapshot)
    assert daemon.counters.to_dict() == {"readings": 3, "rejected": 1}
    with pytest.raises(UndeclaredCounterError):
        daemon.mirror(StatusSnapshot(state=ConnectionState.UP, since=1.0,
                                     counters={"readings": 3, "surprises": 1}))


def test_a_workers_counters_are_added_by_declared_name() -> None:
    daemon = status()
    mark = add_counters(daemon, {}, {"readings": 3})
    mark = add_counters(daemon, mark, {"readings": 5, "rejected": 2})
    assert daemon.counters[READINGS] == 5
    assert daemon.counters[REJECTED] == 2
    assert mark == {"readings": 5, "rejected": 2}
    with pytest.raises(UndeclaredCounterError):
        add_counters(daemon, mark, {"surprises": 1})


def test_a_counter_is_declared_once_with_one_meaning() -> None:
    assert declare("readings", READINGS.help, Owner.SOURCE, unit=READINGS.unit) is READINGS
    with pytest.raises(ValueError, match="different meanings"):
        declare("readings", "Something else.", Owner.SOURCE, unit="readings")
    with pytest.raises(ValueError, match="lower-case"):
        declare("Bad-Name", "A counter.", Owner.SOURCE, unit="things")
    with pytest.raises(ValueError, match="help text"):
        declare("unexplained", " ", Owner.SOURCE, unit="things")
    with pytest.raises(UndeclaredCounterError):
        declared("unexplained")


def test_every_declared_counter_says_what_it_counts() -> None:
    specs = declarations()
    assert len(specs) >= 30
    for spec in specs:
        assert spec.help.strip(), spec.name
        assert spec.help.endswith("."), spec.name
        assert spec.unit.strip(), spec.name
        assert spec.owners, spec.name
        assert declared(spec.name) is spec
    assert {spec.name for spec in declarations(Owner.ROUTER)} >= {
        "events", "backpressure_waits", "outbox_full_waits", "store_full_waits", "not_stored"}


def test_no_module_counts_by_a_string_key() -> None:
    sites = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
             for folder in ("bridge", "protocols")
             for path in sorted((ROOT / folder).rglob("*.py"))
             for number, line in enumerate(path.read_text().splitlines(), 1)
             if STRING_KEY.search(line)]
    assert not sites, "counters addressed by a string key (use a declared CounterSpec):\n" + (
        "\n".join(sites))


def test_the_readme_table_is_the_declarations() -> None:
    readme = (ROOT / "README.md").read_text()
    start, end = readme.index(TABLE_START), readme.index(TABLE_END) + len(TABLE_END)
    assert readme[start:end] == markdown_table(), (
        "README's counter table differs from the declarations; replace it with:\n"
        + markdown_table())
