"""The server's command names itself as the user started it: `vitserve` (the console script pyproject.toml
declares) or `python -m service`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from service.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("argv0", "prog"),
    [
        ("/opt/venv/bin/vitserve", "vitserve"),  # the console script
        (str(ROOT / "service" / "__main__.py"), "python -m service"),  # what `python -m service` puts in argv[0]
    ],
)
def test_help_names_the_command_as_started(
    argv0: str, prog: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", [argv0, "--help"])
    with pytest.raises(SystemExit) as caught:
        main(["--help"])
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: {prog} [-h]")


@pytest.mark.slow
def test_the_console_script_and_the_module(tmp_path: Path) -> None:
    # The script as pip writes it for [project.scripts], run for real; and `python -m service` beside it.
    target = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]["vitserve"]
    module, function = target.split(":")
    script = tmp_path / "bin" / "vitserve"
    script.parent.mkdir()
    script.write_text(
        f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n", encoding="utf-8"
    )
    script.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for command, prog in (([str(script)], "vitserve"), ([sys.executable, "-m", "service"], "python -m service")):
        run = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
        assert run.returncode == 0 and run.stdout.startswith(f"usage: {prog} [-h]"), run.stdout + run.stderr
