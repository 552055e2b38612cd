"""``POST /emotions`` (the page's "add an emotion" form) and ``GET /emotions``: emotions from uploaded examples.

The upload is ``multipart/form-data`` with ``name`` (one of the control emotions), ``example`` (a photo or a video
clip of a face showing it) and optionally ``neutral`` (the same person's neutral face). The server runs
``engine emotion add``'s flow for its avatar in its renderer's space (:meth:`streaming.factory.RuntimeFactory.
add_emotion`); running sessions take the new example up with their next control. Replies are JSON:
``{"type": "ok", "name", "spaces", "message"}`` or ``{"type": "error", "message"}`` (HTTP 400: the reason).
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

logger = logging.getLogger(__name__)

MAX_UPLOAD_BYTES = 64 * 1024 * 1024  # per file
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
        raise ValueError(
            f"{field}: {part.filename or 'the file'} is not a photo or clip this server reads "
            f"({', '.join(IMAGE_SUFFIXES + CLIP_SUFFIXES)})"
        )
    path = directory / f"{field}{suffix}"
    size = 0
    with path.open("wb") as out:
        while chunk := await part.read_chunk(256 * 1024):
            size += len(chunk)
            if size > MAX_UPLOAD_BYTES:
                raise ValueError(f"{field}: larger than the {MAX_UPLOAD_BYTES // (1024 * 1024)} MiB upload limit")
            out.write(chunk)
    if size == 0:
        raise ValueError(f"{field}: the file is empty")
    return path


def emotion_handlers(factory: object) -> tuple[Handler, Handler]:
    """``(upload, listing)`` handlers over ``factory`` (a 404 with the reason when it cannot store emotions)."""

    async def upload(request: web.Request) -> web.StreamResponse:
        if not isinstance(factory, EmotionUploads):
            return _error(404, "this server cannot store emotions")
        if not request.content_type.startswith("multipart/"):
            return _error(400, "send multipart/form-data with name, example (and optionally neutral)")
        with tempfile.TemporaryDirectory(prefix="emotion-upload-") as tmp:
            fields: dict[str, Any] = {}
            try:
                reader = await request.multipart()
                async for part in reader:
                    if not isinstance(part, BodyPartReader) or part.name not in ("name", "example", "neutral"):
                        continue
                    if part.name == "name":
                        fields["name"] = (await part.text()).strip().lower()
                    elif part.filename:
                        fields[part.name] = await _save(part, Path(tmp), part.name)
                name = fields.get("name")
                if name not in EMOTIONS:
                    raise ValueError(f"name: unknown emotion {name!r}; choose one of {list(EMOTIONS)}")
                if "example" not in fields:
                    raise ValueError("example: no file uploaded (a photo or a clip showing the emotion)")
                result = await factory.add_emotion(name, fields["example"], fields.get("neutral"))
            except ValueError as exc:  # bad upload, no face, unreadable clip (ExampleError, LibraryError, ...)
                return _error(400, str(exc))
            except Exception:
                logger.exception("emotion upload failed")
                return _error(500, "internal error while storing the emotion (see the server log)")
        return web.json_response({"type": "ok", **result})

    async def listing(request: web.Request) -> web.StreamResponse:
        stored = factory.stored_emotions() if isinstance(factory, EmotionUploads) else []
        return web.json_response({"stored_emotions": stored, "emotions": list(EMOTIONS)})

    return upload, listing
