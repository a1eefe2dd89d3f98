"""Rewrite README's configuration table from `service.settings.Settings`, its one home (`make docs` runs this).

PYTHONPATH=. python docs/settings_table.py
"""

from __future__ import annotations

from pathlib import Path

from service.settings import settings_table

README = Path(__file__).resolve().parents[1] / "README.md"
START, END = "<!-- settings-table", "<!-- /settings-table -->"


def readme_with_settings_table(text: str) -> str:
    """`text` with the block between the markers replaced by the table `Settings` makes."""
    head, rest = text.split(START, 1)
    marker, _ = rest.split("\n", 1)
    _, tail = rest.split(END, 1)
    return f"{head}{START}{marker}\n{settings_table()}{END}{tail}"


if __name__ == "__main__":
    README.write_text(readme_with_settings_table(README.read_text()))
    print(f"wrote the configuration table in {README}")
