"""Hostile and careless configuration files (issue "Hardening", measured items 1 to 3).

Each test reproduces one failure that was measured on the daemon before: reading
``/dev/zero``, includes that never end, errors that echo a file's content or a huge value,
a multi-line host, and a reload that stalled ``/health/live``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from helpers.daemon import MIB, running_daemon

from bridge.errors import ConfigError
from bridge.registry import load_config

VALID = "bridge: {id: t, state_dir: state}\napi: {host: 127.0.0.1, port: 0}\n"


def _issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return [str(issue) for issue in caught.value.issues]


def _validate_in_a_process(path: Path) -> tuple[str, int]:
    """``load_config(path)`` in a fresh interpreter: its error text and its peak RSS
    (``VmHWM`` from ``/proc/self/status``, read after loading)."""
    script = textwrap.dedent(f"""
        import sys
        from bridge.errors import ConfigError
        from bridge.registry import load_config
        try:
            load_config({str(path)!r})
            print("ok")
        except ConfigError as exc:
            print(exc)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                print("VmHWM", int(line.split()[1]) * 1024, file=sys.stderr)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, check=True)
    peak = int(done.stderr.split("VmHWM")[-1].split()[0])
    return done.stdout, peak


@pytest.mark.parametrize("text", ["include: [/dev/zero]\n",
                                  "bridge: {id: '${file:/dev/zero}'}\n"])
def test_dev_zero_is_refused_without_reading_it(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text)
    started = time.monotonic()
    output, peak = _validate_in_a_process(path)
    assert "/dev/zero" in output
    assert "a device, not a regular file" in output
    assert time.monotonic() - started < 30
    # Before: a MemoryError at 5.4 GB. An interpreter with the connectors loaded is ~100 MB.
    assert peak < 200 * MIB, f"VmHWM {peak / MIB:.0f} MiB"


def test_a_fifo_and_a_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.yaml"
    os.mkfifo(fifo)
    (tmp_path / "folder.yaml").mkdir()
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(f"include: [pipe.yaml, folder.yaml]\nbridge: {{id: '${{file:{fifo}}}'}}\n")
    (issue,) = _issues(path)  # substitution fails first, before any include is read
    assert "a FIFO, not a regular file" in issue
    path.write_text("include: [pipe.yaml, folder.yaml]\n")
    issues = _issues(path)
    assert any("pipe.yaml: cannot read file: a FIFO, not a regular file" in i for i in issues)
    assert any("folder.yaml: cannot read file: a directory" in i for i in issues)


def test_files_past_the_size_cap_are_refused(tmp_path: Path) -> None:
    big = tmp_path / "big.yaml"
    with big.open("wb") as file:
        file.truncate(17 * MIB)  # sparse: the loader must not read it to find out
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("include: [big.yaml]\n")
    (issue,) = _issues(path)
    assert issue.endswith("big.yaml: cannot read file: larger than 16 MiB")
    secret = tmp_path / "secret"
    secret.write_bytes(b"x" * (MIB + 1))
    path.write_text(f"bridge: {{id: '${{file:{secret}}}'}}\n")
    (issue,) = _issues(path)
    assert "cannot read secret file" in issue
    assert "larger than 1 MiB" in issue


def test_a_file_that_includes_itself_is_a_cycle(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("include: [fieldbridge.yaml]\n")
    (issue,) = _issues(path)
    assert f"include[0]: include cycle: {path} → {path}" in issue


def test_two_files_that_include_each_other_are_a_cycle_named_by_its_chain(
    tmp_path: Path
) -> None:
    main, first, second = (tmp_path / name for name in ("main.yaml", "a.yaml", "b.yaml"))
    main.write_text("include: [a.yaml]\n")
    first.write_text("include: [b.yaml]\n")
    second.write_text("include: [a.yaml]\n")
    (issue,) = _issues(main)
    assert issue.startswith(f"{second}:1: include[0]: ")
    assert issue.endswith(f"include cycle: {first} → {second} → {first}")


def test_a_file_included_along_two_branches_is_not_a_cycle(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("include: [common.yaml]\n")
    (tmp_path / "b.yaml").write_text("include: [common.yaml]\n")
    (tmp_path / "common.yaml").write_text(
        "profiles:\n  meter:\n    protocol: modbus\n"
        "    points: [{name: voltage, address: 30001, type: float32}]\n")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(VALID + "include: [a.yaml, b.yaml]\n")
    config = load_config(path)
    assert list(config.profiles) == ["meter"]


SECRET_LINES = "root:$y$j9T$secrethash0123:20228:0:99999:7:::\ndaemon:*:20228:0:99999:7:::\n"


def test_an_included_file_that_is_not_yaml_is_not_echoed(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text(SECRET_LINES)
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(f"include: [{shadow}]\n")
    issues = _issues(path)
    assert issues == [f"{shadow}: not a mapping file: an included file may only hold "
                      "`profiles` and `include` (found 2 other top-level keys, the first at "
                      "line 1)"]
    assert "secrethash" not in "".join(issues)
    assert "daemon" not in "".join(issues)


def test_a_configuration_that_is_not_yaml_is_not_echoed(tmp_path: Path) -> None:
    shadow = tmp_path / "shadow"
    shadow.write_text(SECRET_LINES)
    issues = _issues(shadow)
    assert issues == [f"{shadow}:1: not a Fieldbridge configuration: 2 top-level keys are not "
                      "a section name"]
    # A misspelt section is still named.
    path = tmp_path / "fieldbridge.yaml"
    path.write_text("sourcse: []\n")
    assert _issues(path) == [f"{path}:1: sourcse: unknown key"]


def test_a_huge_value_is_quoted_as_an_excerpt_with_its_length(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    value = "9" * 2_000_000
    path.write_text(f"api: {{port: '{value}x'}}\n")
    (issue,) = _issues(path)
    assert len(issue) < 400
    assert "(2,000,001 characters)" in issue


@pytest.mark.parametrize("key", ["host", "id"])
def test_a_multi_line_host_or_id_from_a_file_is_refused(tmp_path: Path, key: str) -> None:
    secret = tmp_path / "host.txt"
    secret.write_text("plc.local\nsecond line\n")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(f"bridge: {{id: t}}\nsources:\n  - id: s\n    protocol: mqtt\n"
                    f"    host: plc\n    {key}: ${{file:{secret}}}\n")
    (issue,) = _issues(path)
    assert f"sources[0].{key}:" in issue
    assert "second line" not in issue  # a value from ${file:} is a secret: never echoed


@pytest.mark.parametrize(("section", "text"), [
    ("api", "api: {host: \"127.0.0.1\\n\"}"),
    ("modbus", "sources: [{id: m, protocol: modbus, host: \"plc\\r\"}]"),
    ("amqp", "sources: [{id: a, protocol: amqp, host: \"rabbit\\u0000\", "
             "queue: {name: q}, points: []}]"),
    ("amqp queue", "sources: [{id: a, protocol: amqp, queue: {name: \"q\\nx\"}, points: []}]"),
    ("opcua", "sources: [{id: o, protocol: opcua, url: \"opc.tcp://h:4840/\\u2028\"}]"),
])
def test_hosts_and_names_refuse_control_characters(
    tmp_path: Path, section: str, text: str
) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text + "\n")
    issues = _issues(path)
    assert any("must be one line without control characters" in issue for issue in issues), \
        issues


async def test_reloading_a_huge_file_does_not_stall_health_live(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(VALID)
    async with running_daemon(path) as daemon, httpx.AsyncClient(base_url=daemon.url) as client:
        # A file the loader takes seconds over (a 4 MB comment), then a hostile one.
        path.write_text(VALID + "#" + "x" * 4_000_000 + "\n")
        daemon.process.send_signal(signal.SIGHUP)
        slowest = 0.0
        answered = 0
        while not any("configuration reloaded" in line for line in daemon.log):
            started = time.monotonic()
            response = await client.get("/health/live", timeout=1.0)
            assert response.status_code == 200
            slowest = max(slowest, time.monotonic() - started)
            answered += 1
        assert answered > 5
        assert slowest < 1.0
        path.write_text(VALID + "include: [/dev/zero]\n")
        daemon.process.send_signal(signal.SIGHUP)
        line = await daemon.until("reload refused")
        assert "/dev/zero: cannot read file: a device, not a regular file" in line
        assert (await client.get("/health/live", timeout=1.0)).status_code == 200


# --- issue 20: P1 to P4, files that ended the daemon or gave a traceback --------------------

def _hostile(tmp_path: Path) -> dict[str, tuple[str, str]]:
    """Files that once escaped the loader as an exception, by name: (text, expected issue)."""
    return {
        "nested": (VALID + "x: " + "[" * 100_000 + "\n",
                   "fieldbridge.yaml:3: collections nest more than 100 levels deep"),
        "digits": ("api: {port: " + "9" * 5_000 + "}\n",
                   "fieldbridge.yaml:1: api.port: not a valid value: Exceeds the limit"),
        "environ": (VALID + "include: [/proc/self/environ]\n",
                    "/environ:1: not a YAML text file: character #x0000"),
    }


@pytest.mark.parametrize("name", ["nested", "digits", "environ"])
@pytest.mark.parametrize("command", ["validate", "run"])
def test_hostile_files_are_a_located_error_with_exit_2(
    tmp_path: Path, name: str, command: str
) -> None:
    text, expected = _hostile(tmp_path)[name]
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text)
    arguments = [str(path)] if command == "validate" else ["-c", str(path)]
    done = subprocess.run([sys.executable, "-m", "bridge", command, *arguments],
                          capture_output=True, text=True, timeout=60, check=False)
    # Before: a RecursionError, ValueError or ReaderError traceback (up to 200 KB), exit 1.
    assert done.returncode == 2, done.stderr[-2_000:]
    assert "Traceback" not in done.stderr
    assert len(done.stderr) < 1_000
    assert expected in done.stderr


@pytest.mark.parametrize("text", [
    "bridge: {id: t}\nx: .nan\n",
    "bridge: {id: t}\nx: [1, .inf]\n",
    "bridge: {id: t}\nx: 1.0e+400\n",
])
def test_a_number_that_is_not_finite_is_refused_anywhere(tmp_path: Path, text: str) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(text)
    (issue,) = _issues(path)
    assert issue.startswith(f"{path}:2: x")
    assert "a number must be finite" in issue


MODBUS_POINT = """\
sources:
  - id: plc
    protocol: modbus
    host: 127.0.0.1
    devices:
      - id: meter
        interval: {interval}
        points:
          - {{name: t, address: 40001, type: float64, scale: {scale}, offset: {offset}}}
"""


@pytest.mark.parametrize(("key", "values", "line"), [
    ("scale", {"scale": ".nan"}, 9),
    ("offset", {"offset": "-.inf"}, 9),
    ("interval", {"interval": ".inf"}, 7),
])
def test_non_finite_scale_offset_and_interval_are_refused_at_load(
    tmp_path: Path, key: str, values: dict[str, str], line: int
) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(VALID + MODBUS_POINT.format(**{"interval": "1s", "scale": 1, "offset": 0,
                                                   **values}))
    (issue,) = _issues(path)
    assert issue.startswith(f"{path}:{line + 2}: sources[0]")
    assert f".{key}: a number must be finite" in issue


def test_a_non_finite_number_from_a_substitution_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FB_TEST_SCALE", "nan")
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(VALID + MODBUS_POINT.format(interval="1s", scale="'${FB_TEST_SCALE}'",
                                                offset=0))
    (issue,) = _issues(path)
    assert "devices[0].points[0].scale: Input should be a finite number" in issue
    assert "nan" not in issue.split("scale:")[1]  # a substituted value is never echoed


def test_aliases_of_a_substituted_string_share_one_copy(tmp_path: Path) -> None:
    """A 512 KiB string with ``${HOME}``, aliased 200 times: substituted once, not 200 times
    (before: 200 copies, over 100 MiB; with 150,000 aliases a MemoryError)."""
    import tracemalloc

    from bridge.config.yamlsource import load_yaml

    path = tmp_path / "fieldbridge.yaml"
    big = "${HOME}" + "x" * (512 * 1024)
    path.write_text(f"a: &big '{big}'\nb: [" + ", ".join(["*big"] * 200) + "]\n")
    issues: list[object] = []
    tracemalloc.start()
    try:
        document = load_yaml(path, issues)  # type: ignore[arg-type]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert not issues
    values = document.data["b"]
    assert len(values) == 200
    assert all(value is document.data["a"] for value in values)
    assert ("b", 199) in document.substituted  # each place it is used is still secret
    # Parsing the 512 KiB scalar costs about 16 MiB; 200 copies would add 100 MiB.
    assert peak < 40 * MIB, f"peak {peak / MIB:.0f} MiB"


def test_what_substitution_produces_is_bounded(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s" * (1024 * 1024 - 1))
    path = tmp_path / "fieldbridge.yaml"
    # Twenty distinct references to a 1 MiB secret: 20 MiB, past the 16 MiB budget.
    path.write_text(VALID + "x:\n" + "".join(f"  - '{index}${{file:{secret}}}'\n"
                                             for index in range(20)))
    (issue,) = _issues(path)
    assert issue.startswith(f"{path}:")
    assert "${...} references produce more than 16 MiB in this file" in issue
async def test_reloading_hostile_files_keeps_the_daemon_running(tmp_path: Path) -> None:
    path = tmp_path / "fieldbridge.yaml"
    path.write_text(VALID)
    async with running_daemon(path) as daemon, httpx.AsyncClient(base_url=daemon.url) as client:
        assert (await client.get("/health/live", timeout=5.0)).status_code == 200
        for name, (text, expected) in _hostile(tmp_path).items():
            path.write_text(text)
            daemon.process.send_signal(signal.SIGHUP)
            # Before: the daemon exited 1 with the exception's traceback.
            line = await daemon.until(expected.split(":", 1)[1])
            assert "reload refused, configuration unchanged" in line, name
            assert (await client.get("/health/live", timeout=5.0)).status_code == 200
        path.write_text(VALID)
        daemon.process.send_signal(signal.SIGHUP)
        await daemon.until("configuration reloaded")
        assert daemon.process.returncode is None
