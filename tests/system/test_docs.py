"""What the README and the shipped files promise stays true."""

from __future__ import annotations

import json
import re
from pathlib import Path

from bridge.cli import main
from bridge.config.reference import END, START, render
from bridge.core.model import Event, Quality, new_event_id
from bridge.core.schema import event_schema
from bridge.registry import protocols

ROOT = Path(__file__).resolve().parents[2]


def test_readme_config_reference_is_generated_from_the_models() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    start, end = readme.index(START), readme.index(END) + len(END)
    assert readme[start:end] + "\n" == render(protocols()), (
        "README's config reference is stale: regenerate it with "
        "`.venv/bin/python tests/system/test_docs.py`")


def regenerate() -> None:
    """Rewrite README's config reference from the models."""
    path = ROOT / "README.md"
    readme = path.read_text(encoding="utf-8")
    start, end = readme.index(START), readme.index(END) + len(END)
    reference = render(protocols()).rstrip("\n")
    path.write_text(readme[:start] + reference + readme[end:], encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```sh\n(.*?)```", readme, re.S)
    assert first_block is not None
    commands = [line for line in first_block.group(1).splitlines()
                if line and not line.startswith("#")]
    assert commands == [
        "python3 -m venv .venv && .venv/bin/pip install . && .venv/bin/fieldbridge demo",
        "bash tests/run",
    ]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert "bash tests/run" in ci


def test_event_schema_describes_events_exactly() -> None:
    schema = event_schema()
    event = Event(id=new_event_id(), source="s", point="d.p", value=1.5, unit="V",
                  quality=Quality.GOOD, ts=1.0, received_at=2.0, protocol="modbus",
                  bridge="edge", tags={"a": "b"})
    body = event.to_dict()
    assert set(body) == set(schema["properties"]) == set(schema["required"])
    assert body["ts"] == "1970-01-01T00:00:01.000Z"
    for name, value in body.items():
        allowed = schema["properties"][name]
        if "enum" in allowed:
            assert value in allowed["enum"]


def test_cli_prints_both_schemas(capsys: object) -> None:
    assert main(["event-schema"]) == 0
    assert main(["schema"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    first, _, rest = out.partition("\n}\n")
    assert json.loads(first + "\n}")["title"] == "Fieldbridge normalized event"
    assert "sources" in json.loads(rest)["properties"]


def test_readme_layout_table_matches_the_tree() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Where things are"):readme.index("## Writing a connector")]
    listed = set(re.findall(r"^\| `([^`]+)` \|", section, flags=re.MULTILINE))
    for path in listed:
        assert (ROOT / path).exists(), f"README lists {path}, which does not exist"
    rooms = {f"bridge/{entry.name}" + ("/" if entry.is_dir() else "")
             for entry in (ROOT / "bridge").iterdir()
             if not entry.name.startswith(("_", ".")) and entry.name not in {"py.typed"}
             and entry.suffix in {"", ".py"}}
    assert rooms - listed == set(), "rooms of bridge/ missing from README's 'Where things are'"
    for path in listed:
        if path.startswith("bridge/") and path.endswith("/"):
            docstring = (ROOT / path / "__init__.py").read_text(encoding="utf-8")
            assert docstring.startswith('"""'), f"{path}__init__.py opens with no docstring"
            assert "May import" in docstring, f"{path}__init__.py does not say what it may import"


if __name__ == "__main__":
    regenerate()
