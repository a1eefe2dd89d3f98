"""docs/operations.md's configuration table is the one `Settings` makes: a setting added, renamed or re-described
without `make docs` fails here."""

from __future__ import annotations

from docs.settings_table import OPERATIONS, page_with_settings_table


def test_configuration_table_matches_the_settings() -> None:
    text = OPERATIONS.read_text()
    assert page_with_settings_table(text) == text, "docs/operations.md's configuration table is stale: run `make docs`"


def test_every_setting_is_in_the_table() -> None:
    from service.settings import Settings

    text = OPERATIONS.read_text()
    for name in Settings.model_fields:
        assert f"`VITSERVE_{name.upper()}`" in text
