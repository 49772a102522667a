"""The build step pyproject.toml cannot declare: compile the Sparkplug B schema.

``protocols/mqtt/sparkplug_b.proto`` (the Eclipse Sparkplug 3.0 payload, as Eclipse Tahu
publishes it) is compiled by ``grpcio-tools``' protoc into ``sparkplug_b_pb2.py`` and its
typed stub ``sparkplug_b_pb2.pyi`` beside it, before the packages are collected: in a wheel,
and in the source tree for an editable install. Everything else is in pyproject.toml.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

SCHEMA = Path("protocols", "mqtt", "sparkplug_b.proto")


def compile_schema() -> None:
    """Write the protobuf module and its stub for ``SCHEMA`` beside it."""
    from grpc_tools import protoc  # a build requirement only

    folder = str(SCHEMA.parent)
    status = protoc.main(["protoc", f"--proto_path={folder}", f"--python_out={folder}",
                          f"--pyi_out={folder}", str(SCHEMA)])
    if status != 0:
        raise RuntimeError(f"protoc failed to compile {SCHEMA} (exit status {status})")


class BuildPy(build_py):
    """``build_py`` that compiles the schema first."""

    def run(self) -> None:
        compile_schema()
        super().run()


setup(cmdclass={"build_py": BuildPy})
