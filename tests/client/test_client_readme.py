"""The Python examples in client/README.md run, as written, against the live server."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[2] / "client" / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_the_readme_has_sync_async_and_error_examples() -> None:
    assert len(BLOCKS) == 3
    assert "Client(" in BLOCKS[0] and "AsyncClient" in BLOCKS[1] and "except BadImageError" in BLOCKS[2]


@pytest.mark.parametrize("block", BLOCKS, ids=["sync", "async", "errors"])
def test_readme_example_runs(
    block: str,
    server: Any,
    digits: list[Any],
    digit_dir: Path,
    photos: dict[str, Image.Image],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The files the examples name: a held-out digit, a photo, a folder of digits.
    (tmp_path / "digit.png").write_bytes(digits[0].png)
    photos["chelsea"].save(tmp_path / "photo.jpg")
    shutil.copytree(digit_dir, tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VITSERVE_URL", server.url)
    exec(compile(block.replace("http://127.0.0.1:8000", server.url), str(README), "exec"), {"__name__": "readme"})
    out = capsys.readouterr().out
    assert out.strip()
    if "AsyncClient" in block:
        assert "'00_1.png': '1'" in out
    elif "except BadImageError" in block:
        assert "400 bad_image" in out and "server unavailable" in out
    else:
        assert out.startswith(f"{digits[0].label} 0.9") and (tmp_path / "overlay.png").stat().st_size > 1000
