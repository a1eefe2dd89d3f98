"""The docs' commands run as written from a fresh clone: the `curl` and `vitserve-client` lines of README's
Quickstart, and every other one in README.md and docs/*.md that names a sample image, against a real server on a
free port (the URL's port is the only change made to a command), from a folder laid out as the clone is (`samples/`
at its root).

`vitserve-client` is the console script `pip install ./client` puts on PATH (client/pyproject.toml), here run from
the checkout's client.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Server

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]  # the front page and the reference pages
LOCAL = "http://127.0.0.1:8000"  # where `make serve` listens, as the commands say
PNG = b"\x89PNG\r\n\x1a\n"


def section(text: str, title: str) -> str:
    """The text of the `## title` section, up to the next `## ` heading."""
    return text.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def commands(text: str) -> list[str]:
    """The `curl` and `vitserve-client` command lines of the bash blocks in `text`, continuations joined; a
    command aimed at another host (`--url http://gpu-box:8000`) is an example of the option, not runnable here."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL):
        for line in block.replace("\\\n", " ").splitlines():
            if line.split(" ", 1)[0] in ("curl", "vitserve-client") and "--url" not in line:
                found.append(line)
    return found


QUICKSTART = commands(section(README.read_text(), "Quickstart"))
ELSEWHERE = [c for page in PAGES for c in commands(page.read_text()) if "samples/" in c and c not in QUICKSTART]


def test_the_quickstart_classifies_a_sample_draws_its_map_and_uses_the_cli() -> None:
    assert [c.split(" ", 1)[0] for c in QUICKSTART] == ["curl", "curl", "vitserve-client"], QUICKSTART
    assert all("samples/" in c for c in QUICKSTART)
    assert len(ELSEWHERE) >= 10  # the API, tracing and CLI examples


def test_the_sample_digits_are_held_out_canvases_of_their_label() -> None:
    import numpy as np
    from PIL import Image

    from model_export.digits import held_out_set, load_sources, split_sources

    held_out = held_out_set()
    train, _ = split_sources(len(load_sources()[1]))
    files = sorted((ROOT / "samples" / "digits").glob("*.png"))
    assert [f.stem for f in files] == [str(d) for d in range(10)]
    for file in files:
        pixels = np.asarray(Image.open(file))
        matches = [i for i, canvas in enumerate(held_out.images) if np.array_equal(canvas, pixels)]
        assert matches, f"{file.name} is not a held-out canvas"
        assert str(held_out.labels[matches[0]]) == file.stem
        assert held_out.sources[matches[0]] not in train  # a digit training never saw, in any placement
    for file in ROOT.joinpath("samples").iterdir():
        assert not file.is_file() or file.stat().st_size < 64 * 1024, f"{file.name} is not small"


@pytest.mark.skipif(shutil.which("make") is None, reason="GNU make is not installed")
def test_the_export_page_names_the_target_that_builds_the_export_environment(tmp_path: Path) -> None:
    page = (ROOT / "docs" / "export.md").read_text()
    text = " ".join(page.split("\n## ", 1)[0].split())  # its opening section, before INT8
    assert "`make dev-env`" in text and "CUDA build" in text and "GB" in text
    # That target builds the environment of requirements/dev.txt, which make requirements compiles with the
    # export extra (torch, transformers, timm).
    dry = subprocess.run(
        ["make", "--no-print-directory", "-n", "dev-env", f"CACHE={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dry.returncode == 0 and f"{tmp_path}/venv-dev-" in dry.stdout, dry.stdout + dry.stderr
    assert "req=requirements/$(echo dev-" in dry.stdout and "pip install" in dry.stdout
    makefile = (ROOT / "Makefile").read_text()
    assert "--extra export --extra dev --output-file requirements/dev.txt" in makefile
    pins = (ROOT / "requirements" / "dev.txt").read_text()
    assert all(re.search(rf"^{name}==", pins, re.MULTILINE) for name in ("torch", "transformers", "timm"))


@pytest.fixture(scope="module")
def clone(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with the clone's `samples/`, where the commands run and write (`-o overlay.png`)."""
    folder = tmp_path_factory.mktemp("clone")
    shutil.copytree(ROOT / "samples", folder / "samples")
    return folder


@pytest.fixture(scope="module")
def path_with_the_cli(tmp_path_factory: pytest.TempPathFactory) -> str:
    """PATH with `vitserve-client` first: the script pip writes for the client's `[project.scripts]` entry."""
    folder = tmp_path_factory.mktemp("bin")
    script = folder / "vitserve-client"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom vitserve_client.cli import main\nsys.exit(main())\n")
    script.chmod(0o755)
    return f"{folder}{os.pathsep}{os.environ['PATH']}"


def run(command: str, server: Server, clone: Path, path: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("curl") is None and command.startswith("curl"):
        pytest.skip("curl is not installed")
    # The CLI's default server is http://127.0.0.1:8000 unless VITSERVE_URL says otherwise: the same change of port.
    env = {**os.environ, "PATH": path, "PYTHONPATH": str(ROOT / "client"), "VITSERVE_URL": server.url}
    env.pop("VITSERVE_API_KEY", None)
    return subprocess.run(
        ["bash", "-c", command.replace(LOCAL, server.url)],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def check(command: str, result: subprocess.CompletedProcess[str], clone: Path) -> None:
    """The command did what it says: exit 0, and its answer is the server's success, not an error body."""
    assert result.returncode == 0, f"{command}\n{result.stdout}\n{result.stderr}"
    written = re.search(r"-o (\S+)", command)
    if written:
        assert (clone / written.group(1)).read_bytes().startswith(PNG), command
    elif command.startswith("curl"):
        body = json.loads(result.stdout)
        assert "error" not in body, body
        digit = re.search(r"@samples/digits/(\d)\.png", command)
        if digit and command.count("@") == 1 and "/classify" in command and "/batch" not in command:
            # one held-out digit classified: the model names it (each sample is one it gets right)
            assert body["predictions"][0]["label"] == digit.group(1), body
    else:
        assert result.stdout.strip(), command
        if command.startswith("vitserve-client classify samples/digits/ "):
            for d in range(10):  # every sample digit, named by its label and predicted as it
                assert re.search(rf"\b{d}\.png\s+{d}\b", result.stdout), result.stdout


@pytest.mark.parametrize("command", QUICKSTART)
def test_quickstart_command_runs_as_written(command: str, server: Server, clone: Path, path_with_the_cli: str):
    check(command, run(command, server, clone, path_with_the_cli), clone)


@pytest.mark.parametrize("command", ELSEWHERE)
def test_readme_command_on_the_samples_runs_as_written(
    command: str, server: Server, clone: Path, path_with_the_cli: str
) -> None:
    check(command, run(command, server, clone, path_with_the_cli), clone)
