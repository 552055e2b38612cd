"""``POST /emotions`` (the page's "add an emotion" form) and ``GET /emotions``: emotions from uploaded examples.

The upload is ``multipart/form-data`` with ``name`` (one of the control emotions), ``example`` (a photo or a video
clip of a face showing it) and optionally ``neutral`` (the same person's neutral face). The server runs
``engine emotion add``'s flow for its avatar in its renderer's space (:meth:`streaming.factory.RuntimeFactory.
add_emotion`); running sessions take the new example up with their next control. Replies are JSON:
``{"type": "ok", "name", "spaces", "message"}`` or ``{"type": "error", "message"}`` with the reason (HTTP 400; 413
for a file over the upload limit, 415 for a body that is not multipart). The form fields are checked by
:mod:`streaming.wire` (size-bounded UTF-8) like every other client input; the files stream to disk in chunks,
bounded per file, so the server's small JSON body limit does not apply to them.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from aiohttp import BodyPartReader, web

from engine.motion.emotion import EMOTIONS
from engine.motion.examples import IMAGE_SUFFIXES
from streaming.wire import WireError, as_text

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # per file
MAX_NAME_BYTES = 64  # the emotion's name field
CLIP_SUFFIXES = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@runtime_checkable
class EmotionUploads(Protocol):
    """A session factory that can store emotions from examples (the engine's :class:`RuntimeFactory`)."""

    def stored_emotions(self) -> list[str]: ...

    async def add_emotion(self, name: str, example: Path, neutral: Path | None = None) -> dict[str, Any]: ...


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"type": "error", "message": message}, status=status)


async def _save(part: BodyPartReader, directory: Path, field: str) -> Path:
    suffix = Path(part.filename or "").suffix.lower()
    if suffix not in IMAGE_SUFFIXES + CLIP_SUFFIXES:
        raise WireError(
            f"{field}: {part.filename or 'the file'} is not a photo or clip this server reads "
            f"({', '.join(IMAGE_SUFFIXES + CLIP_SUFFIXES)})",
            status=415,
        )
    path = directory / f"{field}{suffix}"
    size = 0
    with path.open("wb") as out:
        while chunk := await part.read_chunk(256 * 1024):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise WireError(
                    f"{field}: larger than the {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB upload limit", status=413
                )
            out.write(chunk)
    if size == 0:
        raise WireError(f"{field}: the file is empty")
    return path


async def _field(part: BodyPartReader) -> bytes:
    """A form field's bytes, read no further than one chunk past the limit (``as_text`` then refuses it)."""
    data = b""
    while len(data) <= MAX_NAME_BYTES and (chunk := await part.read_chunk(MAX_NAME_BYTES + 1)):
        data += chunk
    return data


def emotion_handlers(factory: object) -> tuple[Handler, Handler]:
    """``(upload, listing)`` handlers over ``factory`` (a 404 with the reason when it cannot store emotions)."""

    async def upload(request: web.Request) -> web.StreamResponse:
        if not isinstance(factory, EmotionUploads):
            return _error(404, "this server cannot store emotions")
        if not request.content_type.startswith("multipart/"):
            return _error(415, "send multipart/form-data with name, example (and optionally neutral)")
        with tempfile.TemporaryDirectory(prefix="emotion-upload-") as tmp:
            fields: dict[str, Any] = {}
            shown: dict[str, str] = {}  # saved file -> what the client sent (the server's paths are not its business)
            try:
                reader = await request.multipart()
                async for part in reader:
                    if not isinstance(part, BodyPartReader) or part.name not in ("name", "example", "neutral"):
                        continue
                    if part.name == "name":
                        fields["name"] = as_text(await _field(part), "name", MAX_NAME_BYTES).strip().lower()
                    elif part.filename:
                        fields[part.name] = await _save(part, Path(tmp), part.name)
                        shown[str(fields[part.name])] = f"{part.name} ({part.filename})"
                name = fields.get("name")
                if name not in EMOTIONS:
                    raise ValueError(f"name: unknown emotion {name!r}; choose one of {list(EMOTIONS)}")
                if "example" not in fields:
                    raise ValueError("example: no file uploaded (a photo or a clip showing the emotion)")
                result = await factory.add_emotion(name, fields["example"], fields.get("neutral"))
            except WireError as exc:  # the upload itself is malformed or too large
                return _error(exc.status, str(exc))
            except ValueError as exc:  # bad example: no face, unreadable clip (ExampleError, LibraryError, ...)
                message = str(exc)
                for path, name in shown.items():
                    message = message.replace(path, name)
                return _error(400, message)
            except Exception:
                logger.exception("emotion upload failed")
                return _error(500, "internal error while storing the emotion (see the server log)")
        return web.json_response({"type": "ok", **result})

    async def listing(request: web.Request) -> web.StreamResponse:
        stored = factory.stored_emotions() if isinstance(factory, EmotionUploads) else []
        return web.json_response({"stored_emotions": stored, "emotions": list(EMOTIONS)})

    return upload, listing
