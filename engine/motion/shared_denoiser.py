"""One denoiser shared by every live session: diffusion steps that fall due together run as one batch.

Each session's :class:`~engine.motion.scheduler.WindowScheduler` runs in the session's own thread and calls the
denoiser once per DDIM step (10 per window, cond and uncond already in one batch of 2). On a GPU a batch-2 call is
almost all launch overhead, so sixteen sessions whose windows are due at the same time would make 160 small calls
where 10 calls of 32 rows cost about the same as 10 of 2. :class:`SharedDenoiser` gathers them:

* a call joins a queue; whoever finds the denoiser idle becomes the *leader*, takes everything queued (up to
  ``max_rows``), runs it as one call and hands every caller its rows back;
* before taking the queue the leader waits, at most ``gather_s``, for the callers it saw within the last
  ``recent_s`` that are not queued yet: two sessions in the same window then step in lockstep instead of
  alternating (each would otherwise arrive while the other's step runs). A lone session never waits, and a
  session whose window just ended costs the others one wait of ``gather_s``.

Every row is computed exactly as alone (the networks are per-sample: batching changes float rounding at most), and
each scheduler keeps its own noise generator, so a session's motion does not depend on who shares its steps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from engine.motion.samplers.guidance import MaskedDenoiser, per_sample_drop


@dataclass
class _Call:
    args: tuple[Tensor, Tensor, Tensor, Tensor, Tensor]  # x_t, cond_frame, cond, t, drop_mask (each [B, ...])
    caller: int  # thread id
    done: threading.Event = field(default_factory=threading.Event)
    result: Tensor | None = None
    error: BaseException | None = None


@dataclass
class SharedDenoiserStats:
    calls: int = 0  # denoiser calls made (batches)
    requests: int = 0  # scheduler calls served
    rows: int = 0  # rows over all batches
    max_requests: int = 0  # most scheduler calls in one batch

    @property
    def requests_per_call(self) -> float:
        return self.requests / self.calls if self.calls else 0.0

    def as_metrics(self) -> dict[str, float]:
        return {
            "motion_denoiser_calls": float(self.calls),
            "motion_denoiser_requests": float(self.requests),
            "motion_denoiser_requests_per_call": self.requests_per_call,
            "motion_denoiser_max_requests": float(self.max_requests),
        }


class SharedDenoiser:
    """A :class:`MaskedDenoiser` that batches concurrent calls from several threads (see the module doc).

    ``config`` and ``untrained`` are the wrapped denoiser's (the schedulers read them).
    """

    def __init__(
        self, denoiser: MaskedDenoiser, *, max_rows: int = 64, gather_s: float = 0.002, recent_s: float = 0.05
    ) -> None:
        if max_rows < 1 or gather_s < 0 or recent_s < 0:
            raise ValueError(f"need max_rows >= 1, gather_s >= 0, recent_s >= 0: {max_rows}, {gather_s}, {recent_s}")
        self.denoiser = denoiser
        self.config: Any = getattr(denoiser, "config", None)
        self.untrained = bool(getattr(denoiser, "untrained", False))
        self.max_rows = max_rows
        self.gather_s = gather_s
        self.recent_s = recent_s
        self.stats = SharedDenoiserStats()
        self._cond = threading.Condition()
        self._queue: list[_Call] = []
        self._leading = False
        self._seen: dict[int, float] = {}  # caller thread -> monotonic time of its last call

    def __call__(
        self,
        x_t: Tensor,
        cond_frame: Tensor,
        cond: Tensor,
        t: Tensor,
        drop_cond: bool = False,
        drop_mask: Tensor | None = None,
    ) -> Tensor:
        mask = per_sample_drop(x_t.shape[0], drop_cond, drop_mask, x_t.device)
        call = _Call((x_t, cond_frame, cond, t, mask), threading.get_ident())
        with self._cond:
            self._seen[call.caller] = time.monotonic()
            self._queue.append(call)
            self._cond.notify_all()
            while not call.done.is_set() and self._leading:
                self._cond.wait()
            if call.done.is_set():
                return self._result(call)
            self._leading = True
        try:
            self._lead(call)
        finally:
            with self._cond:
                self._leading = False
                self._cond.notify_all()  # a caller still queued takes the lead
        return self._result(call)

    @staticmethod
    def _result(call: _Call) -> Tensor:
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def _expected(self, now: float) -> set[int]:
        """Callers seen recently that have nothing queued: they are probably between two steps of a window."""
        self._seen = {c: t for c, t in self._seen.items() if now - t <= self.recent_s}
        return set(self._seen) - {c.caller for c in self._queue}

    def _lead(self, own: _Call) -> None:
        """Wait briefly for the other recent callers, then run batches until ``own`` is done (called without the
        lock; the leader then hands the lead on, so its own session is not held up serving the others')."""
        with self._cond:
            deadline = time.monotonic() + self.gather_s
            while self._expected(time.monotonic()) and (left := deadline - time.monotonic()) > 0:
                self._cond.wait(left)
            for caller in self._expected(time.monotonic()):  # they did not come back: their window is over
                del self._seen[caller]
            batch = self._take()
        while batch:
            self._run(batch)
            with self._cond:
                self._cond.notify_all()
                batch = [] if own.done.is_set() else self._take()

    def _take(self) -> list[_Call]:
        """Queued calls of one shape, in arrival order, up to ``max_rows`` rows (at least one call)."""
        if not self._queue:
            return []
        first = self._queue[0]
        shape = tuple(tuple(a.shape[1:]) for a in first.args)
        batch: list[_Call] = []
        rows = 0
        for call in list(self._queue):
            b = call.args[0].shape[0]
            if tuple(tuple(a.shape[1:]) for a in call.args) != shape or (batch and rows + b > self.max_rows):
                continue
            batch.append(call)
            rows += b
        for call in batch:
            self._queue.remove(call)
        return batch

    def _run(self, batch: list[_Call]) -> None:
        try:
            if len(batch) == 1:
                x_t, cond_frame, cond, t, mask = batch[0].args
                outs = [self.denoiser(x_t, cond_frame, cond, t, drop_mask=mask)]
            else:
                joined = (torch.cat(parts) for parts in zip(*(c.args for c in batch), strict=True))
                x_t, cond_frame, cond, t, mask = joined
                out = self.denoiser(x_t, cond_frame, cond, t, drop_mask=mask)
                outs = list(torch.split(out, [c.args[0].shape[0] for c in batch]))
        except BaseException as exc:  # every caller of the batch gets the error, none is left waiting
            for call in batch:
                call.error = exc
                call.done.set()
            return
        self.stats.calls += 1
        self.stats.requests += len(batch)
        self.stats.rows += sum(c.args[0].shape[0] for c in batch)
        self.stats.max_requests = max(self.stats.max_requests, len(batch))
        for call, out in zip(batch, outs, strict=True):
            call.result = out
            call.done.set()
