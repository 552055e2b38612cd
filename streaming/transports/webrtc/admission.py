"""Capacity counted in one place: a slot is taken atomically (no await between the check and the take, so on one
event loop N concurrent takers of C free slots get exactly C), held by what it admitted, and released once,
whatever path ends it."""

from __future__ import annotations


class Slot:
    def __init__(self, slots: Slots) -> None:
        self._slots: Slots | None = slots

    def release(self) -> None:
        """Give the slot back (idempotent: every failure path may call it)."""
        if self._slots is not None:
            self._slots._held -= 1
            self._slots = None

    @property
    def held(self) -> bool:
        return self._slots is not None


class Slots:
    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._held = 0

    @property
    def held(self) -> int:
        return self._held

    def take(self) -> Slot | None:
        """A slot, or None when all ``limit`` are held."""
        if self._held >= self.limit:
            return None
        self._held += 1
        return Slot(self)
