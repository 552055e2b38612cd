"""Where the engine keeps its files: imported weights and prepared avatars.

The root is ``$AVATAR_ENGINE_HOME`` when set, else ``$XDG_DATA_HOME/avatar-engine`` (``~/.local/share``).
Functions, not module constants, so tests can point the engine elsewhere with an environment variable.
"""

from __future__ import annotations

import os
from pathlib import Path


def engine_home() -> Path:
    env = os.environ.get("AVATAR_ENGINE_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_DATA_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "share"
    return base / "avatar-engine"


def default_weights_dir() -> Path:
    """Where ``engine weights import liveportrait`` writes when ``--out`` is not given."""
    return engine_home() / "weights" / "liveportrait"


def default_ditto_dir() -> Path:
    return engine_home() / "weights" / "ditto"


def avatars_dir() -> Path:
    return engine_home() / "avatars"
