"""docs/configuration.md cannot drift from the SETTINGS table in nodefoundry_server.config."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from nodefoundry_server import config

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


@pytest.fixture(scope="module")
def doc() -> str:
    return DOC.read_text()


def _table_rows(text: str) -> list[list[str]]:
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not re.match(r"^\|[\s|:-]+\|$", line):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _settings_rows(text: str) -> dict[str, list[str]]:
    """Rows of the settings tables: first cell a `file key`, second cell an `NF_*` variable."""
    return {
        row[0].strip("`"): row
        for row in _table_rows(text)
        if len(row) >= 4 and re.fullmatch(r"`[a-z_]+`", row[0]) and re.fullmatch(r"`NF_[A-Z_]+`", row[1])
    }


def _rendered_default(value: Any) -> str:
    """How the docs write a default: booleans as YAML, lists comma-separated, empty as *(empty)*."""
    if value in ("", [], {}):
        return "*(empty)*"
    if isinstance(value, bool):
        return "`true`" if value else "`false`"
    if isinstance(value, list):
        return f"`{', '.join(value)}`"
    return f"`{value}`"


@pytest.mark.parametrize("setting", config.SETTINGS, ids=lambda setting: setting.env)
def test_every_setting_is_documented(doc: str, setting: config.Setting) -> None:
    assert f"`{setting.key}`" in doc
    assert f"`{setting.env}`" in doc
    row = _settings_rows(doc).get(setting.key)
    assert row is not None, f"no table row for {setting.key} / {setting.env} in {DOC.name}"
    assert row[1] == f"`{setting.env}`", f"{setting.key} is documented with {row[1]}, config.py says {setting.env}"
    assert row[2] == _rendered_default(setting.default), f"default of {setting.key} differs from config.py"
    assert row[3], f"{setting.key} has no description"


def test_no_documented_setting_is_unknown(doc: str) -> None:
    known = {setting.key: setting.env for setting in config.SETTINGS}
    documented = {key: row[1].strip("`") for key, row in _settings_rows(doc).items()}
    assert documented == known


def test_every_profile_key_is_documented(doc: str) -> None:
    first_cells = {row[0] for row in _table_rows(doc)}
    for key in config._PROFILE_FIELDS:
        assert f"`{key}`" in first_cells, f"profile key {key} missing from {DOC.name}"


def test_documented_example_file_is_valid(doc: str, tmp_path: Path) -> None:
    examples = re.findall(r"```yaml\n(.*?)```", doc, flags=re.DOTALL)
    assert examples, "docs/configuration.md has no YAML example"
    for number, example in enumerate(examples):
        path = tmp_path / f"example{number}.yml"
        path.write_text(example)
        loaded = config.load(path, {})
        assert set(yaml.safe_load(example)) <= {setting.key for setting in config.SETTINGS} | {"profiles"}
        assert loaded.profiles, "the example should show profiles"


def test_documented_error_example_matches_the_real_message(doc: str) -> None:
    with pytest.raises(config.ConfigError) as raised:
        config.load(None, {"NF_BOOT_POLL_INTERVAL": "99"})
    assert f"nodefoundry-server: {raised.value}" in doc
