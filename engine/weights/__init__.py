"""Checkpoint import and the engine's weight store (safetensors + a small JSON record)."""

from __future__ import annotations

import logging

UNTRAINED_MESSAGE = (
    "UNTRAINED WEIGHTS: no checkpoint imported, running on deterministic random weights. The output is "
    "noise, not a face. Import yours with 'engine weights import liveportrait SRC' (neural mode) or use "
    "classic mode."
)


def warn_untrained(logger: logging.Logger, what: str) -> str:
    """Log (loudly) that ``what`` runs on untrained weights; returns the message for CLIs and pages."""
    message = f"{what}: {UNTRAINED_MESSAGE}"
    logger.warning(message)
    return message
