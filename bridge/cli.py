"""The ``fieldbridge`` command."""

from __future__ import annotations

import argparse
import asyncio
import getpass
import hashlib
import json
import logging
import os
import signal
import sys
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, SecretStr, ValidationError

from bridge import __version__
from bridge.config.models import default_state_dir
from bridge.config.yamlsource import substitute
from bridge.core import aio
from bridge.core.discovery import Budget, DiscoveryContext, DiscoverySpec, StreamProgress
from bridge.errors import BridgeError, ConfigError
from bridge.registry import discoverable, load_config, protocols, root_model

logger = logging.getLogger("bridge")


class JournalFormatter(logging.Formatter):
    """Prefix each line with its syslog priority (``<4>``) so journald files it correctly."""

    PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
                  logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        """The record with its priority prefix; timestamps are left to the journal."""
        priority = self.PRIORITIES.get(record.levelno, 6)
        return f"<{priority}>{super().format(record)}"


def setup_logging(level: str) -> None:
    """Log to stderr; under systemd (journald) with syslog priorities and no timestamps."""
    handler = logging.StreamHandler(sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])
    # Library chatter at INFO (every reconnect attempt) is ours to report, once.
    for noisy in ("pymodbus", "asyncua", "pika", "uvicorn.access", "uvicorn.error"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    # pika logs each failed connection attempt at ERROR, several lines deep; the supervisor
    # reports the failure once, with its category, and the inventory shows it.
    logging.getLogger("pika").setLevel(logging.CRITICAL)


async def run_config(path: str) -> int:
    """Load a configuration and run it, with the API, until SIGTERM or SIGINT."""
    from bridge.api.server import api_services
    from bridge.runtime import Runtime

    config = load_config(path)
    runtime = Runtime(config)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, runtime.stop)
    loop.add_signal_handler(signal.SIGHUP, runtime.request_reload)
    try:
        await runtime.run(services=api_services(config))
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    return 0


def _validate(paths: Sequence[str]) -> int:
    status = 0
    for path in paths:
        try:
            config = load_config(path)
        except ConfigError as exc:
            for issue in exc.issues:
                print(f"error: {issue}", file=sys.stderr)
            status = 2  # as `run` exits on a configuration it refuses
            continue
        count = sum(len(points) for points in config.points.values())
        print(f"{path}: ok ({len(config.sources)} sources, {count} points, "
              f"{len(config.profiles)} profiles, {len(config.sinks)} sinks)")
    return status


def _hash_key(read_stdin: bool) -> int:
    key = sys.stdin.readline().rstrip("\n") if read_stdin else getpass.getpass("API key: ")
    if len(key) < 16:
        print("error: use a key of at least 16 characters", file=sys.stderr)
        return 1
    print(hashlib.sha256(key.encode()).hexdigest())
    return 0


def _serve_map(path: str, protocol: str) -> int:
    """Print a ``servers:`` section serving the configured points, to edit and include."""
    spec = protocols().get(protocol)
    if spec is None or spec.server_template is None:
        offered = sorted(name for name, candidate in protocols().items()
                         if candidate.server_template is not None)
        print(f"error: no server template for '{protocol}' (offered: {', '.join(offered)})",
              file=sys.stderr)
        return 2
    config = load_config(path)
    section = {"servers": [spec.server_template(list(config.point_index().values()))]}
    print(yaml.safe_dump(section, sort_keys=False), end="")
    return 0


_OPTION = "option:"
"""The prefix of the argparse destinations that carry a discovery request's fields."""


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (``SecurityConfig`` or ``SecurityConfig | None``), if any."""
    candidates = typing.get_args(annotation) if isinstance(annotation, types.UnionType) or \
        typing.get_origin(annotation) is typing.Union else (annotation,)
    for candidate in candidates:
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _add_model_options(parser: argparse.ArgumentParser, model: type[BaseModel],
                       path: tuple[str, ...], skip: set[str]) -> None:
    """One option per field of ``model``, nested models flattened (``--security-policy``)."""
    for name, info in model.model_fields.items():
        if not path and name in skip:
            continue
        field_path = (*path, name)
        option = "--" + "-".join(field_path).replace("_", "-")
        nested = _model_of(info.annotation)
        if nested is not None:
            _add_model_options(parser, nested, field_path, skip)
            continue
        help_text = (info.description or "").replace("`", "")
        if not info.is_required() and info.default is not None and \
                not isinstance(info.default, BaseModel):
            help_text += f" Default: {info.default}."
        destination = _OPTION + ".".join(field_path)
        choices: tuple[Any, ...] = typing.get_args(info.annotation) \
            if typing.get_origin(info.annotation) is typing.Literal else ()
        if info.annotation is bool:
            parser.add_argument(option, dest=destination, action=argparse.BooleanOptionalAction,
                                default=None, help=help_text)
        else:
            numeric = bool(choices) and all(isinstance(choice, int) for choice in choices)
            # Literal[7, 8] takes the number, not its text.
            parser.add_argument(option, dest=destination, default=None, help=help_text,
                                type=int if numeric else str,
                                choices=[choice if numeric else str(choice)
                                         for choice in choices] if choices else None,
                                metavar=None if choices else name.upper())


def _secret_fields(model: type[BaseModel], path: tuple[str, ...] = ()) -> set[str]:
    secrets: set[str] = set()
    for name, info in model.model_fields.items():
        nested = _model_of(info.annotation)
        if nested is not None:
            secrets |= _secret_fields(nested, (*path, name))
        elif SecretStr in (info.annotation, *typing.get_args(info.annotation)):
            secrets.add(".".join((*path, name)))
    return secrets


def _request_fields(arguments: argparse.Namespace, spec: DiscoverySpec) -> dict[str, Any]:
    """The request as nested fields: the options given, then the positional target."""
    secrets = _secret_fields(spec.request_model)
    fields: dict[str, Any] = {}
    for destination, value in vars(arguments).items():
        if not destination.startswith(_OPTION) or value is None:
            continue
        key = destination.removeprefix(_OPTION)
        if key in secrets:
            value = substitute(value, Path.cwd())
        *parents, last = key.split(".")
        level = fields
        for parent in parents:
            level = level.setdefault(parent, {})
        level[last] = value
    _merge(fields, spec.target(arguments.target))
    return fields


def _merge(into: dict[str, Any], update: dict[str, Any]) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = value


def _add_discover(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    discover = commands.add_parser(
        "discover", help="browse, scan or sample an endpoint and write its mapping",
        description="Browse an OPC-UA server, scan a Modbus device or sample an MQTT broker "
        "and write a configuration that `fieldbridge validate` accepts and `fieldbridge run` "
        "runs. Progress goes to stderr. Exit status: 0 complete, 1 failed (a partial result "
        "is still written, marked PARTIAL), 2 bad options, 3 partial (a --max-seconds or "
        "--max-points bound was reached).")
    kinds = discover.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    for name, spec in discoverable().items():
        sub = kinds.add_parser(name, help=spec.summary, description=spec.summary + ".")
        sub.add_argument("target", metavar=spec.target_name, help="the endpoint")
        sub.add_argument("-o", "--output", help="write the configuration here (default: stdout)")
        sub.add_argument("--max-seconds", type=float, default=None,
                         help="stop after this long and write what was found (partial)")
        sub.add_argument("--max-points", type=int, default=100_000,
                         help="stop at this many points (partial). Default: 100000.")
        sub.add_argument("--state-dir", default=None,
                         help="where a generated OPC-UA client certificate is kept (default: "
                         "the daemon's state directory)")
        _add_model_options(sub, spec.request_model, (), set(spec.target("x")))


def _discover(arguments: argparse.Namespace) -> int:
    spec = discoverable()[arguments.protocol]
    try:
        request = spec.request_model.model_validate(_request_fields(arguments, spec))
    except (ValidationError, ValueError) as exc:
        issues = exc.errors() if isinstance(exc, ValidationError) else [
            {"loc": (), "msg": str(exc)}]
        for issue in issues:
            where = "-".join(str(part) for part in issue["loc"]).replace("_", "-")
            print(f"error: {'--' + where + ': ' if where else ''}{issue['msg']}",
                  file=sys.stderr)
        return 2
    state_dir = Path(arguments.state_dir) if arguments.state_dir else default_state_dir()
    context = DiscoveryContext(
        progress=StreamProgress(sys.stderr),
        budget=Budget(max_seconds=arguments.max_seconds, max_items=arguments.max_points),
        state_dir=state_dir,
        command=f"fieldbridge discover {arguments.protocol} {arguments.target}")
    result = asyncio.run(spec.run(request, context))
    if arguments.output:
        Path(arguments.output).write_text(result.yaml, encoding="utf-8")
        print(f"wrote {len(result.items)} points to {arguments.output}"
              + (" (partial)" if result.partial else ""), file=sys.stderr)
    else:
        sys.stdout.write(result.yaml)
        sys.stdout.flush()
    for warning in result.warnings:
        if warning != result.error:
            print(f"warning: {warning}", file=sys.stderr)
    if result.error is not None:
        print(f"error: {result.error} (the output is partial)", file=sys.stderr)
        return 1
    return 3 if result.partial else 0


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = argparse.ArgumentParser(
        prog="fieldbridge",
        description="Bridge Modbus, OPC-UA, MQTT and AMQP endpoints into normalized events.")
    parser.add_argument("--version", action="version", version=f"fieldbridge {__version__}")
    parser.add_argument("--log-level", default=os.environ.get("FIELDBRIDGE_LOG_LEVEL", "info"),
                        choices=["debug", "info", "warning", "error"])
    # The metavar lists the commands people use: ``worker`` is how the daemon starts its own
    # worker processes, so it is left out of the usage line and, having no help, of the list.
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser("run", help="run the daemon on a configuration file")
    run.add_argument("-c", "--config", required=True, help="the configuration file")
    validate = commands.add_parser("validate", help="check configuration files, touch nothing")
    validate.add_argument("files", nargs="+")
    demo = commands.add_parser("demo", help="run a simulated plant and the daemon on it")
    demo.add_argument("--port", type=int, default=8780, help="API port (0: any free port)")
    demo.add_argument("--state-dir", help="where the demo keeps its store (default: a temp dir)")
    demo.add_argument("--opcua", action="store_true",
                      help="also run an OPC-UA server and bridge three of its variables")
    commands.add_parser("schema", help="print the JSON Schema of the configuration file")
    commands.add_parser("event-schema", help="print the JSON Schema of the normalized event")
    commands.add_parser("config-reference", help="print the configuration reference (Markdown)")
    _add_discover(commands)
    serve_map = commands.add_parser(
        "serve-map", help="print a starting northbound server for the configured points")
    serve_map.add_argument("-c", "--config", required=True, help="the configuration file")
    serve_map.add_argument("--protocol", default="modbus", help="the server's protocol")
    hash_key = commands.add_parser("hash-key", help="print the SHA-256 of an API key for config")
    hash_key.add_argument("--stdin", action="store_true", help="read the key from stdin")
    worker = commands.add_parser("worker")
    worker.add_argument("--fd", type=int, required=True, help="the socket to the daemon")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``fieldbridge`` and ``python -m bridge``."""
    arguments = build_parser().parse_args(argv)
    setup_logging(arguments.log_level)
    try:
        if arguments.command == "validate":
            return _validate(arguments.files)
        if arguments.command == "schema":
            print(json.dumps(root_model().model_json_schema(), indent=2))
            return 0
        if arguments.command == "event-schema":
            from bridge.core.schema import event_schema_text

            # Generated from the declaration, never read from the file: this is how the
            # committed bridge/core/event.schema.json is regenerated.
            print(event_schema_text(), end="")
            return 0
        if arguments.command == "config-reference":
            from bridge.config.reference import render

            print(render(protocols()), end="")
            return 0
        if arguments.command == "hash-key":
            return _hash_key(arguments.stdin)
        if arguments.command == "serve-map":
            return _serve_map(arguments.config, arguments.protocol)
        if arguments.command == "discover":
            return _discover(arguments)
        if arguments.command == "worker":
            from bridge.pipeline.worker import run_worker

            return run_worker(arguments.fd)
        if arguments.command == "demo":
            from bridge.demo.run import run_demo

            return aio.run(run_demo(port=arguments.port, state_dir=arguments.state_dir,
                                        opcua=arguments.opcua))
        return aio.run(run_config(arguments.config))
    except ConfigError as exc:
        for issue in exc.issues:
            print(f"error: {issue}", file=sys.stderr)
        return 2
    except BridgeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
