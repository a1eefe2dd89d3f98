"""Rewrite the configuration table of docs/operations.md from `service.settings.Settings`, its one home (`make docs`
runs this).

PYTHONPATH=. python docs/settings_table.py
"""

from __future__ import annotations

from pathlib import Path

from service.settings import settings_table

OPERATIONS = Path(__file__).resolve().parent / "operations.md"
START, END = "<!-- settings-table", "<!-- /settings-table -->"


def page_with_settings_table(text: str) -> str:
    """`text` with the block between the markers replaced by the table `Settings` makes."""
    head, rest = text.split(START, 1)
    marker, _ = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{marker}\n{settings_table()}{END}{tail}"


if __name__ == "__main__":
    OPERATIONS.write_text(page_with_settings_table(OPERATIONS.read_text()))
    print(f"wrote the configuration table in {OPERATIONS}")
