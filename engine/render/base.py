"""The renderer interface shared by the neural and classic renderers and used by the streaming pipeline."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

from engine.avatar.record import Avatar
from engine.keypoints import MotionParams, SourceFace


class PreparedAvatar(NamedTuple):
    avatar: Avatar
    source: SourceFace
    state: Any  # renderer-specific (feature volume, portrait tensor, ...), computed once per avatar


class Renderer(Protocol):
    name: str  # "neural" | "classic"
    size: int  # output frames are size x size RGB
    untrained: bool  # True when rendering from untrained weights: callers must say so to the user

    def prepare(self, avatar: Avatar) -> PreparedAvatar: ...

    def drive(self, prepared: PreparedAvatar, params: MotionParams) -> torch.Tensor:
        """Motion params ``[B]`` -> driving keypoints ``[B, 21, 3]`` (stitching included where available)."""
        ...

    def render(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor:
        """One frame per avatar in ``prepared`` (a batch may mix sessions) -> ``[B, 3, size, size]`` in [0, 1]."""
        ...


@runtime_checkable
class AsyncRenderer(Protocol):
    """A renderer whose work runs elsewhere (a GPU stream, a simulated device) and can be awaited without holding
    the event loop; the render worker prefers it to a thread when it renders inline."""

    async def render_async(self, prepared: Sequence[PreparedAvatar], kp_driving: torch.Tensor) -> torch.Tensor: ...
