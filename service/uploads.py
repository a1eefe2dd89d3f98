"""Getting image bytes out of a request: multipart field(s), or the raw body with an `image/*` type."""

from __future__ import annotations

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
