"""YAML loading with locations and ``${...}`` substitution."""

from __future__ import annotations

from pathlib import Path

import pytest

from bridge.config.yamlsource import format_path, load_yaml, substitute
from bridge.errors import ConfigIssue
from bridge.registry import load_config


def _load(tmp_path: Path, text: str) -> tuple[object, list[ConfigIssue], object]:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    issues: list[ConfigIssue] = []
    document = load_yaml(path, issues)
    return document.data, issues, document


def test_every_key_and_item_keeps_its_line(tmp_path: Path) -> None:
    _, issues, document = _load(tmp_path, "a: 1\nlist:\n  - x: 2\n  - y: 3\n")
    assert issues == []
    locations = document.locations  # type: ignore[attr-defined]
    assert locations[("a",)].line == 1
    assert locations[("list", 1, "y")].line == 4
    assert document.locate(("list", 0, "x", "deeper")).line == 3  # type: ignore[attr-defined]


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    _, issues, _ = _load(tmp_path, "a: 1\nb: [1, 2\nc: 3\n")
    assert len(issues) == 1
    assert issues[0].file.endswith("config.yaml")
    assert issues[0].line is not None
    assert issues[0].line >= 2
    assert "invalid YAML" in issues[0].message


def test_duplicate_keys_are_errors(tmp_path: Path) -> None:
    _, issues, _ = _load(tmp_path, "a: 1\nb: 2\na: 3\n")
    assert [(issue.line, issue.path, issue.message) for issue in issues] == [
        (3, "a", "duplicate key")]


def test_environment_and_file_substitution(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("FB_PORT", "5020")
    monkeypatch.delenv("FB_UNSET", raising=False)
    data, issues, document = _load(
        tmp_path,
        f"port: ${{FB_PORT}}\npassword: ${{file:{secret}}}\nrelative: ${{file:secret.txt}}\n"
        "fallback: ${FB_UNSET:-7}\nliteral: $${FB_PORT}\n")
    assert issues == []
    assert data == {"port": "5020", "password": "s3cret", "relative": "s3cret",
                    "fallback": "7", "literal": "${FB_PORT}"}
    assert ("password",) in document.substituted  # type: ignore[attr-defined]


def test_missing_variable_is_located(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FB_MISSING", raising=False)
    _, issues, _ = _load(tmp_path, "a:\n  b: ${FB_MISSING}\n")
    assert [(issue.line, issue.path) for issue in issues] == [(2, "a.b")]
    assert "FB_MISSING is not set" in issues[0].message


def test_missing_secret_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read secret file"):
        substitute("${file:/nonexistent/secret}", tmp_path)


def test_merge_keys_are_flattened(tmp_path: Path) -> None:
    data, issues, _ = _load(tmp_path, "base: &b {x: 1, y: 2}\nitem:\n  <<: *b\n  y: 3\n")
    assert issues == []
    assert data == {"base": {"x": 1, "y": 2}, "item": {"x": 1, "y": 3}}


def test_format_path() -> None:
    assert format_path(("sources", 0, "devices", 2, "unit")) == "sources[0].devices[2].unit"
    assert format_path(()) == ""


def test_an_alias_bomb_is_refused_quickly_and_with_little_memory(tmp_path: Path) -> None:
    levels = ['a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    levels += [f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]"
               for level in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n", encoding="utf-8")
    issues: list[ConfigIssue] = []
    load_yaml(path, issues)
    (issue,) = issues
    assert issue.file == str(path)
    assert "expands to more than 200,000 values" in issue.message


def test_an_alias_inside_its_own_anchor_is_an_error_not_a_recursion(tmp_path: Path) -> None:
    path = tmp_path / "self.yaml"
    path.write_text("sources:\n  - &loop {id: a, next: [*loop]}\n", encoding="utf-8")
    issues: list[ConfigIssue] = []
    load_yaml(path, issues)
    assert [(issue.line, issue.message) for issue in issues] == [
        (2, "an alias refers to a node that contains it")]


def test_aliases_within_the_budget_still_expand(tmp_path: Path) -> None:
    path = tmp_path / "shared.yaml"
    path.write_text("base: &base {unit: degC, scale: 0.1}\npoints:\n  - *base\n  - *base\n",
                    encoding="utf-8")
    issues: list[ConfigIssue] = []
    document = load_yaml(path, issues)
    assert issues == []
    assert document.data["points"] == [{"unit": "degC", "scale": 0.1}] * 2


def test_booleans_are_yaml_1_2_so_on_off_yes_no_stay_words(tmp_path: Path) -> None:
    data, issues, _ = _load(tmp_path, "timestamp: {on: item}\nlabels: [off, on, yes, no, y, n]\n"
                                      "flags: [true, False, TRUE]\n")
    assert issues == []
    assert data == {"timestamp": {"on": "item"}, "labels": ["off", "on", "yes", "no", "y", "n"],
                    "flags": [True, False, True]}


def test_a_boolean_setting_still_reads_yes_and_no(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("bridge: {id: t, state_dir: state}\napi: {enabled: no}\n")
    assert load_config(path).api.enabled is False
