"""`python -m vitserve_client` as a user runs it: a subprocess, the server's URL in VITSERVE_URL."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from vitserve_client._core import DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT
from vitserve_client.cli import BROKEN_PIPE, COMMANDS, main

from tests.client.scripted import Reply

CLIENT_DIR = Path(__file__).resolve().parents[2] / "client"


def cli(*args: str, url: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "VITSERVE_API_KEY"}
    env.update(VITSERVE_URL=url, PYTHONPATH=str(CLIENT_DIR))  # the client alone, not the server's code
    return subprocess.run(
        [sys.executable, "-m", "vitserve_client", *args], capture_output=True, text=True, timeout=120, env=env, cwd=cwd
    )


@pytest.fixture(scope="module")
def closed_url() -> str:
    from tests.conftest import free_port

    return f"http://127.0.0.1:{free_port()}"


def test_classify_files_and_a_folder_as_json_lines(
    server: Any, digit_dir: Path, digits: list[Any], tmp_path: Path
) -> None:
    single = tmp_path / "single.png"
    single.write_bytes(digits[20].png)
    folder_files = sorted(digit_dir.glob("*.png"))
    run = cli("classify", str(single), str(digit_dir), "--json", "--top-k", "2", "--concurrency", "3", url=server.url)
    assert run.returncode == 0, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(single)] + [str(p) for p in folder_files]  # input order
    assert all(len(line["predictions"]) == 2 and line["model"] == "digits-vit" for line in lines)
    truth = [digits[20].label] + [p.stem.split("_")[1] for p in folder_files]
    assert sum(line["predictions"][0]["label"] == t for line, t in zip(lines, truth, strict=True)) >= len(lines) - 1
    assert len({line["request_id"] for line in lines}) == len(lines)


def test_classify_table_progress_and_a_bad_image(server: Any, digit_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n and nothing else")
    good = sorted(digit_dir.glob("*.png"))[:3]
    run = cli("classify", *map(str, good), str(bad), "--progress", url=server.url)
    assert run.returncode == 1  # some images failed: bad input
    rows = run.stdout.splitlines()
    assert rows[0].split() == ["IMAGE", "LABEL", "PROB", "OTHERS"] and len(rows) == 5
    assert rows[1].split()[1] == good[0].stem.split("_")[1]
    assert "bad_image" in rows[4] and rows[4].startswith(str(bad))
    assert "[" + "#" * 30 + "] 4/4  1 failed" in run.stderr and "1 of 4 images failed" in run.stderr


def test_classify_json_error_lines(server: Any, tmp_path: Path) -> None:
    text = tmp_path / "notes.png"
    text.write_text("hello")
    run = cli("classify", str(text), "--json", "--model", "digits-vit-int8", url=server.url)
    assert run.returncode == 1
    error = json.loads(run.stdout)["error"]
    assert error["status"] == 400 and error["code"] == "bad_image" and len(error["request_id"]) == 32


def test_attention_png_and_json(server: Any, digit_dir: Path, tmp_path: Path) -> None:
    image = str(sorted(digit_dir.glob("*.png"))[0])
    out = tmp_path / "overlay.png"
    run = cli(
        "attention",
        image,
        "-o",
        str(out),
        "--method",
        "layer",
        "--layer",
        "-1",
        "--head",
        "1",
        "--alpha",
        "0.6",
        url=server.url,
    )
    assert run.returncode == 0, run.stderr
    with Image.open(out) as overlay:
        assert overlay.format == "PNG" and overlay.width > 100
    run = cli("attention", image, "--json", "--head-fusion", "max", "--discard-ratio", "0.3", url=server.url)
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["params"]["head_fusion"] == "max" and len(body["map"]) == 8 and len(body["map"][0]) == 8
    run = cli("attention", image, "--method", "cls", url=server.url)  # neither -o nor --json: a text grid
    assert run.returncode == 0 and len(run.stdout.splitlines()) == 9 and "@" in run.stdout
    run = cli("attention", image, "--method", "layer", "--layer", "99", url=server.url)
    assert run.returncode == 1 and "layer 99 does not exist" in run.stderr


def test_attention_of_several_images_is_one_batch_request(server: Any, digit_dir: Path, tmp_path: Path) -> None:
    images = sorted(digit_dir.glob("*.png"))[:3]
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"no image here")
    run = cli("attention", str(images[0]), str(bad), str(images[1]), "--json", "--method", "cls", url=server.url)
    assert run.returncode == 1 and "1 of 3 images failed" in run.stderr, run.stderr
    lines = [json.loads(line) for line in run.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(images[0]), str(bad), str(images[1])]
    assert lines[1]["error"]["code"] == "bad_image" and lines[1]["map"] is None
    assert all(line["method"] == "cls" and len(line["map"]) == 8 for line in (lines[0], lines[2]))
    run = cli("attention", str(digit_dir), "--method", "rollout", url=server.url)  # a folder: text grids
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("rollout attention, prediction") == len(list(digit_dir.glob("*.png")))
    run = cli("attention", str(images[0]), str(images[1]), "-o", str(tmp_path / "x.png"), url=server.url)
    assert run.returncode == 2 and "one image's overlay" in run.stderr


def test_models_and_health(server: Any) -> None:
    run = cli("models", url=server.url)
    assert run.returncode == 0
    table = run.stdout.splitlines()
    assert table[0].split()[:3] == ["NAME", "VERSION", "PRECISION"]
    assert table[1].startswith("digits-vit (default)") and table[2].startswith("digits-vit-int8")
    listing = json.loads(cli("models", "--json", url=server.url).stdout)
    assert listing["default"] == "digits-vit"
    run = cli("health", url=server.url)
    assert run.returncode == 0 and run.stdout.startswith("ok (digits-vit ready")
    run = cli("--url", server.url, "health", "--json", url="http://127.0.0.1:9")  # --url beats VITSERVE_URL
    assert run.returncode == 0 and json.loads(run.stdout)["status"] == "ok"


def test_server_unavailable_exits_3(closed_url: str, digit_dir: Path) -> None:
    run = cli("classify", str(digit_dir), "--max-retries", "1", url=closed_url)
    assert run.returncode == 3
    assert "server unavailable" in run.stderr and "12 of 12 images failed" in run.stderr
    run = cli("health", "--max-retries", "0", url=closed_url)
    assert run.returncode == 3 and "is the server running" in run.stderr


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["classify"],
        ["classify", "no/such/file.png"],
        ["classify", "{empty}"],
        ["classify", "{image}", "--concurrency", "0"],
        ["attention", "{image}", "--method", "sideways"],
        ["attention", "no/such/file.png"],
        ["frobnicate"],
    ],
)
def test_usage_errors_exit_2(
    args: list[str], closed_url: str, digit_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = str(sorted(digit_dir.glob("*.png"))[0])
    with pytest.raises(SystemExit) as caught:  # in-process: argparse's exit is what the command exits with
        main(["--url", closed_url, *(a.format(empty=tmp_path, image=image) for a in args)])
    assert caught.value.code == 2 and "usage:" in capsys.readouterr().err


def test_usage_error_from_the_command_line(closed_url: str) -> None:
    run = cli("classify", "--top-k", "many", "x.png", url=closed_url)
    assert run.returncode == 2 and "argument --top-k: expected a whole number >= 1, got 'many'" in run.stderr


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_command_has_help(
    command: str | None, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal: one line per option here
    with pytest.raises(SystemExit) as caught:
        main(["--help"] if command is None else [command, "--help"])
    assert caught.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: vitserve-client" + ("" if command is None else f" {command}"))
    # The connection options, accepted before and after the command, show their defaults in both places.
    assert f"(default: {DEFAULT_TIMEOUT:g})" in out and f"(default: {DEFAULT_MAX_RETRIES})" in out


@pytest.mark.parametrize("where", ["before the command", "after the command", "$VITSERVE_URL"])
def test_a_url_without_a_scheme_is_a_usage_error(
    where: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    if where == "$VITSERVE_URL":
        monkeypatch.setenv("VITSERVE_URL", "127.0.0.1:8000")
        argv = ["health"]
    else:
        monkeypatch.delenv("VITSERVE_URL", raising=False)
        argv = (
            ["--url", "127.0.0.1:8000", "health"]
            if where == "before the command"
            else ["health", "--url", "127.0.0.1:8000"]
        )
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    name = "$VITSERVE_URL" if where == "$VITSERVE_URL" else "--url"
    assert (
        f"error: {name} '127.0.0.1:8000' is not an http:// or https:// URL; did you mean http://127.0.0.1:8000?" in err
    )
    assert "base_url" not in err


def test_errors_name_the_option_a_command_line_user_has(closed_url: str) -> None:
    run = cli("health", "--max-retries", "0", url=closed_url)
    assert run.returncode == 3 and "(pass --url or set VITSERVE_URL)" in run.stderr and "base_url" not in run.stderr


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "PYTHONUNBUFFERED"])
@pytest.mark.parametrize("args", [["health"], ["models", "--json"], ["--help"], ["classify", "--help"]])
def test_a_reader_that_goes_away_ends_the_command_quietly(args: list[str], buffered: bool, scripted: Any) -> None:
    # `vitserve-client ... | head`: the reader has closed the pipe by the time the command writes. No traceback;
    # the exit status a shell gives a command that SIGPIPE ended, or 0 where argparse printed the help (it
    # ignores a failed write, which unbuffered output meets at once).
    if args[0] == "models":
        scripted.script(Reply(body={"default": "m", "models": []}))
    read_end, write_end = os.pipe()
    os.close(read_end)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update(VITSERVE_URL=scripted.url, PYTHONPATH=str(CLIENT_DIR), **({} if buffered else {"PYTHONUNBUFFERED": "1"}))
    try:
        run = subprocess.run(
            [sys.executable, "-m", "vitserve_client", *args],
            stdout=write_end,
            stderr=subprocess.PIPE,
            text=True,
            timeout=60,
            env=env,
        )
    finally:
        os.close(write_end)
    expected = 0 if "--help" in args and not buffered else BROKEN_PIPE
    assert (run.returncode, run.stderr) == (expected, "")
    assert BROKEN_PIPE == 141


HTML = b"<!DOCTYPE html><html><head><title>Welcome to nginx!</title></head><body><h1>Welcome</h1></body></html>"


def test_a_server_that_answers_html_is_not_vitserve(scripted: Any, digit_dir: Path) -> None:
    scripted.script(Reply(404, HTML, content_type="text/html"))
    run = cli("classify", str(digit_dir), "--max-retries", "0", url=scripted.url)
    assert run.returncode == 3 and run.stdout == ""  # no table of the same error per image
    assert run.stderr.count("\n") == 1, run.stderr
    assert "answered 404 with an HTML page titled 'Welcome to nginx!'" in run.stderr
    assert f"the server at {scripted.url} is not vitserve" in run.stderr and "<html" not in run.stderr
    for command in (["models"], ["health", "--json"], ["attention", str(digit_dir), "--json"]):
        run = cli(*command, url=scripted.url)
        assert run.returncode == 3 and run.stdout == "" and "is not vitserve" in run.stderr, (command, run.stderr)


def test_a_late_answer_is_reported_once_not_retried(scripted: Any, digit_dir: Path) -> None:
    scripted.script(Reply(delay=2.0))
    image = str(sorted(digit_dir.glob("*.png"))[0])
    run = cli("classify", image, "--timeout", "0.2", "--max-retries", "3", url=scripted.url)
    assert run.returncode == 3 and len(scripted.seen) == 1
    assert "timed out waiting for the answer (limit 0.2 s): ReadTimeout" in run.stderr
    assert "attempts" not in run.stderr


def test_attention_relevance_for_a_target(server: Any, digit_dir: Path) -> None:
    image = str(sorted(digit_dir.glob("*.png"))[0])
    run = cli("attention", image, "--method", "relevance", "--target", "3", "--json", url=server.url)
    assert run.returncode == 0, run.stderr
    body = json.loads(run.stdout)
    assert body["method"] == "relevance" and body["target"]["index"] == 3 and len(body["map"]) == 8
    run = cli("attention", image, "--method", "relevance", "--target", "3", url=server.url)
    assert run.returncode == 0 and run.stdout.startswith(f"{image}: relevance for 3, prediction"), run.stdout
    run = cli("attention", image, "--method", "relevance", "--target", "eleven", url=server.url)
    assert run.returncode == 1 and "class index 0-9" in run.stderr
