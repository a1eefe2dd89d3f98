"""`Settings`' own checks, read from the environment as the service reads them: comma lists, API keys, open
routes, the batch that must fit the queue, the keys file, the model directory.

(That a bad setting stops `python -m service` with exit code 2 and one line is tested against the real process
in test_errors.py and test_security.py.)
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from service.settings import DEFAULT_OPEN_ROUTES, Settings
from tests.conftest import MODELS


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VITSERVE_* variable of the machine running the tests leaks in; the model directory is the committed one."""
    import os

    for name in [n for n in os.environ if n.startswith("VITSERVE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("VITSERVE_MODEL_DIR", str(MODELS))


def refused(**environment: str) -> str:
    """What the checks say about these environment variables: the `msg` of each error, the only part the service
    prints (pydantic's own rendering quotes the input, which may be a key)."""
    with pytest.MonkeyPatch.context() as patch:
        for name, value in environment.items():
            patch.setenv(f"VITSERVE_{name.upper()}", value)
        with pytest.raises(ValidationError) as caught:
            Settings()
    return "; ".join(error["msg"] for error in caught.value.errors())


def from_environment(monkeypatch: pytest.MonkeyPatch, **environment: str) -> Settings:
    for name, value in environment.items():
        monkeypatch.setenv(f"VITSERVE_{name.upper()}", value)
    return Settings()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://a.example,https://b.example", ["https://a.example", "https://b.example"]),
        (" https://a.example , ,https://b.example ,", ["https://a.example", "https://b.example"]),
        ('["https://a.example", "https://b.example"]', ["https://a.example", "https://b.example"]),
        ("", []),
        ("*", ["*"]),
    ],
    ids=["comma", "spaces-and-empties", "json", "empty", "star"],
)
def test_comma_lists_accept_commas_or_json(monkeypatch, value, expected):
    assert from_environment(monkeypatch, cors_origins=value).cors_origins == expected


def test_defaults_need_no_key_and_open_the_probes(monkeypatch):
    settings = from_environment(monkeypatch)
    assert settings.api_keys == [] and settings.cors_origins == []
    assert settings.open_routes == DEFAULT_OPEN_ROUTES and settings.open_routes is not DEFAULT_OPEN_ROUTES


@pytest.mark.parametrize(
    "keys",
    ["good-key,bad key", "good-key,tab\tkey", "good-key,ünïcode", "good-key,\x7fdelete"],
    ids=["space", "tab", "non-ascii", "control"],
)
def test_a_key_that_is_not_printable_ascii_is_refused_without_quoting_it(keys):
    message = refused(api_keys=keys)
    assert "printable ASCII without spaces or commas" in message
    assert keys.split(",")[1] not in message and "good-key" not in message


def test_a_json_list_of_keys_may_not_hide_a_comma_in_a_key():
    message = refused(api_keys='["good-key", "a,b"]')
    assert "without spaces or commas" in message and "a,b" not in message


@pytest.mark.parametrize(
    "route",
    ["metrics", "/v2/*/ready", "*", "/a*b"],
    ids=["not-a-path", "star-in-the-middle", "only-a-star", "star-not-a-prefix"],
)
def test_an_open_route_must_be_a_path_or_a_prefix(route):
    message = refused(open_routes=f"/healthz,{route}")
    assert f"open route {route!r} must be a path" in message


def test_open_routes_add_to_the_defaults_which_always_stay_open(monkeypatch):
    assert from_environment(monkeypatch, open_routes="").open_routes == DEFAULT_OPEN_ROUTES
    # The defaults first, then the new ones once each; a default named again is not repeated.
    assert from_environment(monkeypatch, open_routes="/docs,/healthz,/v1/models/*,/docs").open_routes == [
        *DEFAULT_OPEN_ROUTES,
        "/docs",
        "/v1/models/*",
    ]


def test_a_batch_request_must_fit_the_queue(monkeypatch):
    message = refused(max_batch_files="9", max_queue_size="8")
    assert "VITSERVE_MAX_BATCH_FILES (9) exceeds VITSERVE_MAX_QUEUE_SIZE (8)" in message
    settings = from_environment(monkeypatch, max_batch_files="8", max_queue_size="8")  # exactly full is fine
    assert (settings.max_batch_files, settings.max_queue_size) == (8, 8)


def test_the_keys_file_adds_its_keys_after_the_environments(monkeypatch, tmp_path: Path):
    path = tmp_path / "keys"
    path.write_text("# rotated monthly\n\n  file-key-1  \n# old: not-a-key\nfile-key-2\n")
    settings = from_environment(monkeypatch, api_keys="env-key", api_keys_file=str(path))
    assert settings.api_keys == ["env-key", "file-key-1", "file-key-2"]
    assert "file-key" not in repr(settings) and "env-key" not in repr(settings)


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "cannot read the API keys file"),
        ("# only a comment\n\n", "holds no keys"),
        ("ok-key\nnot ok\n", "printable ASCII without spaces or commas"),
    ],
    ids=["missing", "no-keys", "bad-key"],
)
def test_a_bad_keys_file_is_refused_without_quoting_a_key(tmp_path: Path, content: str | None, says: str):
    path = tmp_path / "keys"
    if content is not None:
        path.write_text(content)
    message = refused(api_keys_file=str(path))
    assert says in message
    assert "ok-key" not in message and "not ok" not in message


def test_a_missing_model_directory_names_the_variable(tmp_path: Path):
    message = refused(model_dir=str(tmp_path / "nowhere"))
    assert "does not exist; set VITSERVE_MODEL_DIR" in message
