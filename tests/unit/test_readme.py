"""The README's configuration table is the one the settings class generates."""

from __future__ import annotations

from pathlib import Path

from ioc.settings import settings_reference

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_configuration_table_matches_the_settings_class() -> None:
    text = README.read_text(encoding="utf-8")
    table = text.split("<!-- settings-reference:start -->\n", 1)[1].split("\n<!-- settings-reference:end -->", 1)[0]
    assert table == settings_reference()


def test_readme_starts_with_the_two_commands() -> None:
    text = README.read_text(encoding="utf-8")
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert [line.split()[:2] for line in first_block.splitlines()] == [["make", "dev"], ["make", "test"]]
