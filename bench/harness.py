"""What every scenario shares: processes measured from outside, the daemon under test, peers.

CPU time and peak RSS are read from ``/proc`` of the measured process (and its descendants),
never from inside it, so the figures include everything the process does: threads, the
interpreter, the libraries. Peers (load generators, servers, consumers) run as their own
processes and talk to the harness through one JSON line per request on stdin/stdout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
"""The repository root: the daemon and the peers run with it as working directory."""

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

DAEMON_CORE = 1
"""The core a pinned daemon (or a single-threaded peer it is compared with) runs on."""
LOAD_CORE = 0
"""The core of everything else in a pinned run: load generators, consumers, the broker the
bench starts, and the harness itself (its counters)."""


# --- pinning ----------------------------------------------------------------------------------


def pinning_unavailable() -> str | None:
    """``None`` when processes can be pinned to DAEMON_CORE and LOAD_CORE, else why not."""
    if shutil.which("taskset") is None:
        return "taskset is not installed (util-linux)"
    allowed = os.sched_getaffinity(0)
    if not {DAEMON_CORE, LOAD_CORE} <= allowed:
        return (f"cores {LOAD_CORE} and {DAEMON_CORE} are not both available to the bench "
                f"(allowed: {sorted(allowed)})")
    return None


def taskset(cpus: int | None) -> list[str]:
    """The command prefix that pins a process to core ``cpus`` (nothing for ``None``)."""
    return [] if cpus is None else ["taskset", "-c", str(cpus)]


@contextlib.contextmanager
def pinned(cpus: int | None) -> Iterator[None]:
    """Run the harness itself (its counters and polling) on core ``cpus`` meanwhile."""
    if cpus is None:
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpus})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


# --- /proc ------------------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    children: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                children.extend(int(child) for child in f.read().split())
    return children


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants."""
    tree, pending = [], [pid]
    while pending:
        current = pending.pop()
        tree.append(current)
        pending.extend(_children(current))
    return tree


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads) so far; 0 once gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return 0.0
    fields = text[text.rindex(")") + 2:].split()
    # After the command: state is field 3, utime 14 and stime 15 (1-based, see proc(5)).
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_mb(pid: int) -> float:
    """Peak resident set size (VmHWM) of one process, in MB."""
    return _status_kib(pid, "VmHWM") / 1024


def rss_mb(pid: int) -> float:
    """Current resident set size (VmRSS) of one process, in MB."""
    return _status_kib(pid, "VmRSS") / 1024


class CpuMeter:
    """CPU seconds of a process tree between ``start()`` and ``stop()``, from ``/proc``.

    Descendants are sampled while they live (a child that exits between samples loses its
    last fraction of a second; workers here live as long as the measurement).
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self._seen: dict[int, float] = {}
        self._base: dict[int, float] = {}
        self._wall = 0.0
        self.seconds = 0.0
        self.wall = 0.0

    @property
    def processes(self) -> int:
        """How many processes of the tree were seen (the process, its workers, helpers)."""
        return len(self._seen)

    def sample(self) -> None:
        """Record the CPU time of every live process of the tree."""
        for pid in process_tree(self.pid):
            value = cpu_seconds(pid)
            if value:
                self._seen[pid] = value

    def start(self) -> CpuMeter:
        """Start measuring now."""
        self.sample()
        self._base = dict(self._seen)
        self._wall = time.monotonic()
        return self

    def stop(self) -> float:
        """Stop; the CPU seconds used since ``start()``."""
        self.sample()
        self.wall = time.monotonic() - self._wall
        self.seconds = sum(value - self._base.get(pid, 0.0) for pid, value in self._seen.items())
        return self.seconds

    @property
    def share(self) -> float:
        """CPU seconds per wall second: 1.0 is one core busy."""
        return self.seconds / self.wall if self.wall else 0.0


def pids_matching(fragment: str) -> list[int]:
    """Live processes whose command line contains ``fragment`` (a broker, say)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
        except OSError:
            continue
        if fragment in command:
            found.append(int(entry.name))
    return found


class MachineCpu:
    """Busy CPU seconds of the whole machine (all cores) between ``start()`` and ``stop()``,
    from ``/proc/stat``: what every process together used, ours or not."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.wall = 0.0
        self._busy = 0.0
        self._started = 0.0

    @staticmethod
    def _busy_seconds() -> float:
        with open("/proc/stat") as f:
            fields = [int(value) for value in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")

    def start(self) -> MachineCpu:
        """Start measuring now."""
        self._busy, self._started = self._busy_seconds(), time.monotonic()
        return self

    def stop(self) -> float:
        """Stop; busy CPU seconds since ``start()``."""
        self.seconds = self._busy_seconds() - self._busy
        self.wall = time.monotonic() - self._started
        return self.seconds


def tree_peak_rss_mb(pid: int) -> float:
    """Sum of the peak RSS of a process and its live descendants (an upper bound)."""
    return sum(peak_rss_mb(member) for member in process_tree(pid))


# --- small helpers ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int) -> bool:
    """Whether something accepts connections on host:port."""
    try:
        socket.create_connection((host, port), timeout=1).close()
    except OSError:
        return False
    return True


def percentile(values: Sequence[float], fraction: float) -> float:
    """The ``fraction`` quantile (nearest rank) of ``values``; NaN when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(fraction * (len(ordered) - 1))))
    return ordered[index]


def wait_until(predicate: Any, timeout: float, interval: float = 0.05) -> bool:
    """Poll ``predicate()`` until true or ``timeout`` seconds passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def python() -> str:
    """The interpreter running the bench (the venv's)."""
    return sys.executable


# --- peers ------------------------------------------------------------------------------------


class PeerError(RuntimeError):
    """A peer process failed or answered something unexpected."""


class Peer:
    """A load generator, server or consumer in its own process (``python -m bench.peers.X``).

    The peer prints ``{"ready": ...}`` once it serves, then answers each JSON line written to
    its stdin with one JSON line; ``stop()`` closes stdin, which ends it. ``cpus``: pin it to
    that core (``taskset``).
    """

    def __init__(self, module: str, *args: str, name: str | None = None,
                 env: Mapping[str, str] | None = None, log_dir: Path | None = None,
                 cpus: int | None = None) -> None:
        self.name = name or module.rsplit(".", 1)[-1]
        log_dir = log_dir or Path(tempfile.gettempdir())
        self.log_path = log_dir / f"{self.name}.log"
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            [*taskset(cpus), python(), "-m", module, *args], cwd=ROOT, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=self._log, text=True, bufsize=1,
            env={**os.environ, **(env or {})})
        self.ready: dict[str, Any] = {}

    @property
    def pid(self) -> int:
        """The peer's process id."""
        return self.process.pid

    def _line(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=5)
            raise PeerError(f"{self.name} exited ({self.process.returncode}); see "
                            f"{self.log_path}: {self.tail()}")
        result: dict[str, Any] = json.loads(line)
        return result

    def tail(self, lines: int = 5) -> str:
        """The last lines of the peer's log."""
        with contextlib.suppress(OSError):
            return " | ".join(self.log_path.read_text().strip().splitlines()[-lines:])
        return ""

    def wait_ready(self) -> dict[str, Any]:
        """Block until the peer says it is ready; its ready message."""
        message = self._line()
        if "ready" not in message:
            raise PeerError(f"{self.name}: expected ready, got {message}")
        self.ready = message["ready"]
        return self.ready

    def ask(self, command: str, **arguments: Any) -> dict[str, Any]:
        """Send one command, return its answer."""
        assert self.process.stdin is not None
        try:
            self.process.stdin.write(json.dumps({"command": command, **arguments}) + "\n")
            self.process.stdin.flush()
        except BrokenPipeError as exc:
            raise PeerError(f"{self.name} is gone: {self.tail()}") from exc
        return self._line()

    def wait_result(self, timeout: float) -> dict[str, Any]:
        """For peers that run one job and print a result: wait for it, at most ``timeout``
        seconds. A peer that has not answered by then is hung: it is stopped, and
        ``PeerError`` says so, with its Python stacks when py-spy can take them."""
        assert self.process.stdout is not None
        os.set_blocking(self.process.stdout.fileno(), True)
        with concurrent.futures.ThreadPoolExecutor(1, f"{self.name}-result") as reader:
            line = reader.submit(self._line)
            try:
                return line.result(timeout=timeout)
            except concurrent.futures.TimeoutError:
                stacks = py_spy_dump(self.pid)
                self.process.kill()
                self.process.wait()
                raise PeerError(f"{self.name} gave no result within {timeout:g} s and was "
                                f"stopped; see {self.log_path}{stacks}") from None

    def stop(self) -> None:
        """Close stdin (the peer ends itself), then make sure it is gone."""
        with contextlib.suppress(OSError):
            if self.process.stdin is not None:
                self.process.stdin.close()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):
            if self.process.stdout is not None:
                self.process.stdout.close()
        self._log.close()

    def __enter__(self) -> Peer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- the daemon under test --------------------------------------------------------------------


class DaemonError(RuntimeError):
    """The daemon did not start or became unready."""


@dataclass
class Daemon:
    """``python -m bridge run -c <generated config>`` in a temporary directory, API on a free
    port; ``start()`` returns once ``/health/ready`` answers 200."""

    config: dict[str, Any]
    workdir: Path
    name: str = "daemon"
    env: Mapping[str, str] = field(default_factory=dict)
    log_level: str = "warning"
    cpus: int | None = None
    """Pin the daemon (all its threads, and any child it starts) to this core with
    ``taskset``; ``None``: wherever the scheduler puts it."""
    process: subprocess.Popen[bytes] | None = None
    port: int = 0
    ready_seconds: float = float("nan")
    """Seconds from the process start to ``/health/ready`` answering 200."""

    def start(self, timeout: float = 60.0) -> Daemon:
        """Write the config, start the process, wait until ready."""
        self.port = free_port()
        config = dict(self.config)
        config.setdefault("bridge", {})
        # A state directory of its own: a store (and outbox) left by an earlier daemon of the
        # same scenario must not feed this one.
        state = Path(tempfile.mkdtemp(prefix=f"state-{self.name}-", dir=self.workdir))
        config["bridge"] = {"id": "bench", "state_dir": str(state), **config["bridge"]}
        config["api"] = {"host": "127.0.0.1", "port": self.port, **config.get("api", {})}
        path = self.workdir / f"{self.name}.yaml"
        # JSON is YAML: the generated config is written as JSON, which loads faster too.
        path.write_text(json.dumps(config, indent=1))
        self.log_path = self.workdir / f"{self.name}.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child
        started = time.monotonic()
        self.process = subprocess.Popen(
            [*taskset(self.cpus), python(), "-m", "bridge", "--log-level", self.log_level,
             "run", "-c", str(path)],
            cwd=ROOT, stdout=log, stderr=log, env={**os.environ, **self.env})
        log.close()
        deadline = started + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise DaemonError(f"{self.name} exited with {self.process.returncode}: "
                                  f"{self.log_tail()}")
            try:
                status, _ = self.get("/health/ready", timeout=1)
            except OSError:
                status = 0
            if status == 200:
                self.ready_seconds = time.monotonic() - started
                return self
            time.sleep(0.02)
        self.stop()
        raise DaemonError(f"{self.name} not ready within {timeout} s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        assert self.process is not None
        return self.process.pid

    def log_tail(self, lines: int = 8) -> str:
        """The last lines the daemon logged."""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def get(self, path: str, timeout: float = 10.0) -> tuple[int, Any]:
        """GET a path of the API: status and parsed JSON (or text)."""
        url = f"http://127.0.0.1:{self.port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                body = response.read()
                status = response.status
        except urllib.error.HTTPError as exc:
            body, status = exc.read(), exc.code
        try:
            return status, json.loads(body)
        except ValueError:
            return status, body.decode(errors="replace")

    def sources(self) -> list[dict[str, Any]]:
        """The inventory (``/v1/sources``)."""
        status, body = self.get("/v1/sources")
        if status != 200:
            raise DaemonError(f"/v1/sources answered {status}: {body}")
        items = body["items"] if isinstance(body, dict) and "items" in body else body
        return list(items)

    def counters(self, source: str | None = None) -> dict[str, float]:
        """Summed counters of every source (or of one)."""
        total: dict[str, float] = {}
        for item in self.sources():
            if source is not None and item.get("id") != source:
                continue
            for key, value in (item.get("counters") or {}).items():
                if isinstance(value, int | float):
                    total[key] = total.get(key, 0) + value
        return total

    def stop(self) -> int | None:
        """SIGTERM, then wait (SIGKILL after 15 s); the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def __enter__(self) -> Daemon:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A temporary directory, removed afterwards unless FIELDBRIDGE_BENCH_KEEP is set."""
    path = Path(tempfile.mkdtemp(prefix=f"fieldbridge-bench-{prefix}-"))
    try:
        yield path
    finally:
        if not os.environ.get("FIELDBRIDGE_BENCH_KEEP"):
            shutil.rmtree(path, ignore_errors=True)


def py_spy_available() -> bool:
    """Whether py-spy can be run (it is in the bench extra)."""
    return shutil.which("py-spy", path=str(Path(python()).parent)) is not None or bool(
        shutil.which("py-spy"))


def py_spy_dump(pid: int) -> str:
    """The Python stacks of ``pid`` (``py-spy dump``), as text to append to a message; empty
    when py-spy cannot attach."""
    binary = shutil.which("py-spy", path=str(Path(python()).parent)) or shutil.which("py-spy")
    if binary is None:
        return ""
    try:
        dump = subprocess.run([binary, "dump", "--pid", str(pid)], capture_output=True,
                              text=True, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return ""
    text = dump.stdout.strip()
    return f"; its stacks (py-spy dump):\n{text}" if text else ""


def py_spy_top(pid: int, seconds: float, out: Path) -> Path | None:
    """Sample ``pid`` with py-spy for ``seconds``; write the flat profile (by own time) to
    ``out`` and return it, or ``None`` when py-spy cannot attach."""
    binary = shutil.which("py-spy", path=str(Path(python()).parent)) or shutil.which("py-spy")
    if binary is None:
        return None
    raw = Path(tempfile.mkdtemp(prefix="fieldbridge-py-spy-")) / out.name
    result = subprocess.run(
        [binary, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds))),
         "--format", "raw", "--rate", "200", "--nonblocking", "--output", str(raw)],
        capture_output=True, text=True, check=False)
    try:
        if result.returncode != 0 or not raw.exists():
            return None
        out.write_text(f"py-spy record --pid <daemon> --duration {max(1, round(seconds))} "
                       f"--rate 200 --nonblocking (all threads)\n"
                       + summarize_collapsed(raw.read_text()))
        return out
    finally:
        shutil.rmtree(raw.parent, ignore_errors=True)


# Markers without ".py": a module split into a package of the same name still matches.
_AREAS: tuple[tuple[str, str], ...] = (
    ("bridge/pipeline/store/", "store: SQLite history/latest (bridge/pipeline/store/)"),
    ("bridge/pipeline/admission.py", "admission (bridge/pipeline/admission.py)"),
    ("bridge/pipeline/outbox.py", "outbox (bridge/pipeline/outbox.py)"),
    ("bridge/core/model.py", "event ids, ISO timestamps (bridge/core/model.py)"),
    ("json/", "JSON encode/decode (stdlib)"),
    ("bridge/core/mapping.py", "mapping: transform, report-by-exception"),
    ("bridge/core/codec.py", "mapping: register decode"),
    ("bridge/core/message_mapper.py", "mapping: payload extraction"),
    ("bridge/core/message_values.py", "mapping: payload extraction"),
    ("bridge/core/templates.py", "mapping: payload extraction"),
    ("bridge/pipeline/router.py", "router"),
    ("bridge/runtime.py", "runtime publish"),
    ("bridge/api/", "REST API handlers"),
    ("bridge/", "other bridge/"),
    ("protocols/", "connectors (protocols/)"),
    ("pika/", "pika"),
    ("paho/", "paho-mqtt"),
    ("aiomqtt/", "aiomqtt"),
    ("asyncua/", "asyncua"),
    ("pymodbus/", "pymodbus"),
    ("starlette/", "web stack (starlette, fastapi, uvicorn, h11, pydantic)"),
    ("fastapi/", "web stack (starlette, fastapi, uvicorn, h11, pydantic)"),
    ("uvicorn/", "web stack (starlette, fastapi, uvicorn, h11, pydantic)"),
    ("h11/", "web stack (starlette, fastapi, uvicorn, h11, pydantic)"),
    ("pydantic", "web stack (starlette, fastapi, uvicorn, h11, pydantic)"),
    ("selectors.py", "event loop: waiting in select"),
    ("asyncio/", "event loop (asyncio)"),
    ("concurrent/futures", "thread pool hand-off"),
    ("threading.py", "thread pool hand-off"),
)


def _area(frames: Sequence[str]) -> str:
    """The area a sample's time belongs to: the innermost frame in a known place."""
    for frame in reversed(frames):
        for marker, area in _AREAS:
            if marker in frame:
                return area
    return "other"


def summarize_collapsed(text: str, top: int = 25) -> str:
    """A flat profile from py-spy's collapsed stacks: own ('self') and total samples per
    function, the ``top`` of each."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    areas: dict[str, int] = {}
    samples = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        samples += count
        frames = stack.split(";")
        leaf = frames[-1]
        own[leaf] = own.get(leaf, 0) + count
        area = _area(frames)
        areas[area] = areas.get(area, 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    lines = [f"samples: {samples}", "", "by area (innermost known frame) %"]
    for area, count in sorted(areas.items(), key=lambda item: -item[1]):
        lines.append(f"{100 * count / max(1, samples):5.1f}  {area}")
    lines += ["", "own %   function (file:line)"]
    for frame, count in sorted(own.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{100 * count / max(1, samples):5.1f}  {frame}")
    lines += ["", "total % function (file:line)"]
    for frame, count in sorted(total.items(), key=lambda item: -item[1])[:top]:
        lines.append(f"{100 * count / max(1, samples):5.1f}  {frame}")
    return "\n".join(lines) + "\n"
