"""The one-part form shortcut (`service.api.uploads.simple_upload`) against Starlette's parser (python-multipart):
every form it takes must come out as Starlette reads it, and every other form must be left to Starlette."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from starlette.datastructures import UploadFile
from starlette.requests import Request

from service.api.uploads import Upload, simple_upload

DATA = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\r\n-- not a delimiter\r\n"
BOUNDARY = "b0undary-7e3f"


async def starlette_upload(content_type: str, body: bytes) -> Upload | None:
    """The `file` part as Starlette reads it (None: no such file part, or a form it refuses)."""
    scope = {"type": "http", "method": "POST", "headers": [(b"content-type", content_type.encode("latin-1"))]}
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(scope, receive).form()
    except Exception:  # a form Starlette refuses: the shortcut must refuse it too
        return None
    parts = form.getlist("file")
    if len(parts) != 1 or not isinstance(parts[0], UploadFile):
        return None
    return Upload(await parts[0].read(), parts[0].filename)


def form(
    *,
    disposition: bytes = b'form-data; name="file"; filename="digit.png"',
    headers: bytes = b"Content-Type: image/png\r\n",
    data: bytes = DATA,
    boundary: str = BOUNDARY,
    ending: bytes = b"--\r\n",
) -> bytes:
    b = boundary.encode()
    return (
        b"--"
        + b
        + b"\r\nContent-Disposition: "
        + disposition
        + b"\r\n"
        + headers
        + b"\r\n"
        + data
        + b"\r\n--"
        + b
        + ending
    )


def content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


def httpx_form() -> tuple[str, bytes]:
    request = httpx.Request("POST", "http://x/v1/classify", files={"file": ("photo.jpg", DATA, "image/jpeg")})
    return request.headers["content-type"], request.read()


TAKEN = [
    pytest.param(content_type(), form(), id="plain"),
    pytest.param(*httpx_form(), id="httpx"),
    pytest.param(content_type(), form(ending=b"--"), id="no-final-crlf"),
    pytest.param(content_type(), form(headers=b""), id="no-content-type"),
    pytest.param(content_type(), form(data=b""), id="empty-file"),
    pytest.param(content_type(), form(disposition=b'form-data; name="file"; filename=""'), id="empty-filename"),
    pytest.param(f'multipart/form-data; boundary="{BOUNDARY}"', form(), id="quoted-boundary"),
    pytest.param(f"Multipart/Form-Data;boundary={BOUNDARY}", form(), id="type-case"),
    pytest.param(content_type("-" * 24 + "abc"), form(boundary="-" * 24 + "abc"), id="curl-boundary"),
    pytest.param(content_type(), form(headers=b"content-type:image/png\r\n"), id="header-case"),
]

LEFT = [
    pytest.param(content_type() + "; charset=latin-1", form(), id="charset"),
    pytest.param(content_type(), form(headers=b"Content-Type: image/png\r\nX-Extra: 1\r\n"), id="extra-header"),
    pytest.param(content_type(), form(headers=b"Content-Type: image/png\r\nContent-Type: x\r\n"), id="twice"),
    pytest.param(content_type(), form(disposition=b'form-data; name="image"; filename="a.png"'), id="other-name"),
    pytest.param(content_type(), form(disposition=b'form-data; name="file"'), id="no-filename"),
    pytest.param(content_type(), form(disposition=b'form-data; name=file; filename="a.png"'), id="bare-name"),
    pytest.param(content_type(), form(disposition=b'form-data; name="file"; filename="a\\"b.png"'), id="escape"),
    pytest.param(content_type(), form(disposition=b'form-data; name="file"; filename="C:\\\\x\\\\a.png"'), id="path"),
    pytest.param(content_type(), form(disposition='form-data; name="file"; filename="é.png"'.encode()), id="utf8"),
    pytest.param(content_type(), form(data=DATA + b"\r\n--" + BOUNDARY.encode() + b"-x"), id="delimiter-in-data"),
    pytest.param(content_type(), form(ending=b"--\r\nepilogue"), id="epilogue"),
    pytest.param(content_type(), form(ending=b"\r\n"), id="second-part-cut"),
    pytest.param(content_type(), form().replace(b"\r\n", b"\n"), id="bare-lf"),
    pytest.param(content_type(), b"preamble\r\n" + form(), id="preamble"),
    pytest.param(content_type(), form()[:-10], id="truncated"),
    pytest.param(content_type("other"), form(), id="wrong-boundary"),
    pytest.param("multipart/form-data", form(), id="no-boundary"),
    pytest.param(content_type("a b"), form(boundary="a b"), id="space-in-boundary"),
]


@pytest.mark.parametrize(("kind", "body"), TAKEN)
def test_the_usual_one_file_forms_are_taken_as_starlette_reads_them(kind: str, body: bytes) -> None:
    taken = simple_upload(kind, body)
    assert taken is not None
    assert taken == asyncio.run(starlette_upload(kind, body))


@pytest.mark.parametrize(("kind", "body"), LEFT)
def test_any_other_form_is_left_to_starlette(kind: str, body: bytes) -> None:
    assert simple_upload(kind, body) is None


def test_a_taken_form_is_never_read_otherwise_than_by_starlette_under_mutation() -> None:
    """Random byte edits of good forms: whatever the shortcut still takes, Starlette reads the same way."""
    rng = random.Random(12)
    alphabet = b'\r\n-"=;: \\' + BOUNDARY.encode()
    taken = 0
    for case in range(600):
        kind, body = (content_type(), form()) if case % 2 else httpx_form()
        edited = bytearray(body)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(edited))
            action = rng.randrange(3)
            if action == 0:
                edited[at] = rng.choice(alphabet)
            elif action == 1:
                edited.insert(at, rng.choice(alphabet))
            else:
                del edited[at]
        result = simple_upload(kind, bytes(edited))
        if result is not None:
            taken += 1
            assert result == asyncio.run(starlette_upload(kind, bytes(edited))), bytes(edited)
    assert taken > 100  # edits inside the file's bytes keep the form simple: the comparison ran
