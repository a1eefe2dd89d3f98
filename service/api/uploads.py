"""Getting image bytes out of a request: multipart field(s), or the raw body with an `image/*` type."""

from __future__ import annotations

import re
from dataclasses import dataclass

from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException
from starlette.requests import Request

from service.errors import BadRequest, PayloadTooLarge, UnsupportedMediaType

RAW_TYPES = ("application/octet-stream",)
HOW = "send multipart/form-data with the image in field 'file', or the raw image bytes with an image/* content type"

# OpenAPI description of an image request body, shared by every image route.
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {"file": {"type": "string", "format": "binary"}},
                }
            },
            "image/*": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["files"],
                    "properties": {"files": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                }
            }
        },
    }
}


@dataclass
class Upload:
    data: bytes
    filename: str | None


# The one shape nearly every client sends for one file (curl -F, httpx, requests, browsers' FormData): a quoted
# or bare boundary of RFC 2046's characters as the only parameter, one part with these two headers at most, the
# disposition as `form-data; name="file"; filename="..."` with a plain ASCII name. Anything else goes to
# python-multipart through Starlette, which judges it (and words its errors) as always.
_BOUNDARY = r"[0-9A-Za-z'()+_,./:=?-]{1,70}"
_SIMPLE_TYPE = re.compile(rf'(?i:multipart/form-data);[ \t]*boundary=(?:"({_BOUNDARY})"|({_BOUNDARY}))')
_SIMPLE_DISPOSITION = re.compile(rb'form-data; name="file"; filename="([\x20\x21\x23-\x5b\x5d-\x7e]*)"')
_PART_HEADERS = frozenset((b"content-disposition", b"content-type"))


def simple_upload(content_type: str, body: bytes) -> Upload | None:
    """The file of a one-part form in the shape above, or None for any other form. A form python-multipart would
    read differently is never taken: the part must end at the first delimiter and the closing one end the body.
    Parsing through Starlette costs an upload about 60 us of event-loop time (a parser object, callbacks per
    chunk, a spooled temporary file); this costs a few."""
    match = _SIMPLE_TYPE.fullmatch(content_type)
    if match is None:
        return None
    boundary = (match[1] or match[2]).encode()
    opening = b"--" + boundary + b"\r\n"
    if not body.startswith(opening):
        return None
    headers_end = body.find(b"\r\n\r\n", len(opening) - 2)
    if headers_end < 0:
        return None
    filename: bytes | None = None
    seen: set[bytes] = set()
    for line in body[len(opening) : headers_end].split(b"\r\n"):
        name, colon, value = line.partition(b":")
        name = name.lower()
        if not colon or name not in _PART_HEADERS or name in seen or b"\r" in value or b"\n" in value:
            return None
        seen.add(name)
        if name == b"content-disposition":
            if (disposition := _SIMPLE_DISPOSITION.fullmatch(value.strip(b" \t"))) is None:
                return None
            filename = disposition[1]
    if filename is None:
        return None
    data_start = headers_end + 4
    data_end = body.find(b"\r\n--" + boundary, data_start)
    closing = b"\r\n--" + boundary + b"--"
    if data_end < 0 or body[data_end:] not in (closing, closing + b"\r\n"):
        return None
    return Upload(body[data_start:data_end], filename.decode("ascii"))


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def _form(request: Request, max_files: int) -> FormData:
    try:
        return await request.form(max_files=max_files + 1, max_fields=max_files + 16)
    except HTTPException as e:  # Starlette's multipart parser reports malformed or oversized forms this way
        if "Too many files" in str(e.detail):
            raise PayloadTooLarge(f"too many files; the limit is {max_files}", detail={"limit": max_files}) from e
        raise BadRequest(f"malformed multipart body: {e.detail}") from e


async def read_image(request: Request) -> Upload:
    media = _media_type(request)
    if media == "multipart/form-data":
        if (simple := simple_upload(request.headers["content-type"], await request.body())) is not None:
            return simple
        form = await _form(request, 1)
        parts = form.getlist("file")
        if not parts:
            raise BadRequest(f"multipart field 'file' is missing (got fields {sorted(form.keys())}); {HOW}")
        if len(parts) > 1:  # answering for one of them would leave the client guessing which
            raise BadRequest(
                f"multipart field 'file' holds {len(parts)} parts; send one image per request, or several to "
                "the batch route in repeated field 'files'"
            )
        upload = parts[0]
        if not isinstance(upload, UploadFile):
            raise BadRequest(f"multipart field 'file' is text, not a file; {HOW}")
        return Upload(await upload.read(), upload.filename)
    if media.startswith("image/") or media in RAW_TYPES:
        return Upload(await request.body(), None)
    shown = media or "none"
    raise UnsupportedMediaType(f"content type {shown!r} is not accepted; {HOW}", detail={"content_type": media})


async def read_images(request: Request, max_files: int) -> list[Upload]:
    media = _media_type(request)
    if media != "multipart/form-data":
        raise UnsupportedMediaType(
            f"content type {media or 'none'!r} is not accepted; send multipart/form-data with the images in "
            "repeated field 'files'"
        )
    form = await _form(request, max_files)
    parts = form.getlist("files")
    texts = [i for i, part in enumerate(parts) if not isinstance(part, UploadFile)]
    if texts:  # skipping them would shift every later result's index against the client's list
        raise BadRequest(
            f"multipart field 'files' holds text, not a file, in part(s) {texts}; send each image as a file"
        )
    uploads = [u for u in parts if isinstance(u, UploadFile)]
    if not uploads:
        raise BadRequest(
            f"multipart field 'files' is missing (got fields {sorted(form.keys())}); send one or more "
            "images in repeated field 'files'"
        )
    if len(uploads) > max_files:
        raise PayloadTooLarge(
            f"{len(uploads)} files; the limit is {max_files} per request (VITSERVE_MAX_BATCH_FILES)",
            detail={"limit": max_files},
        )
    return [Upload(await u.read(), u.filename) for u in uploads]
