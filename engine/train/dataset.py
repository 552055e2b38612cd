"""``engine dataset build``: videos -> a resumable dataset of per-frame motion and audio features.

Workers (processes) extract clips (:func:`engine.train.extract.extract_clip`); the parent writes them into shards
(:class:`engine.train.shards.ShardWriter`) in the order they finish. A video that cannot be used (unreadable, no
audio, no face, face lost) is listed in the report with the reason and never stops the build. Clips already in the
index are not redone; skipped ones are retried only when asked.
"""

from __future__ import annotations

import hashlib
import logging
import multiprocessing
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from engine.audio.hubert import HubertStreaming
from engine.avatar.image import AvatarError
from engine.media import MediaError
from engine.models import liveportrait
from engine.train.extract import ExtractConfig, KeypointExtractor, extract_clip
from engine.train.shards import REPORT_NAME, ShardWriter, write_json_atomic
from engine.train.sources import SPLITS, ClipSource
from engine.train.tracking import MeshTracker

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildConfig:
    extract: ExtractConfig = field(default_factory=ExtractConfig)
    workers: int = 1
    shard_clips: int = 64
    shard_mb: int = 256
    liveportrait: str | None = None  # LivePortrait store for the keypoints space (None: untrained tiny preset)
    allow_untrained: bool = False  # keypoints from untrained weights (tests only: the values are noise)
    hubert: str | None = None  # Ditto's streaming HuBERT ONNX: adds "hubert" features
    val_fraction: float = 0.1  # share of speakers (or clips without a speaker) held out for validation
    retry_skipped: bool = False

    def __post_init__(self) -> None:
        if self.workers < 1 or self.shard_clips < 1 or self.shard_mb < 1 or not 0 <= self.val_fraction < 1:
            raise ValueError(f"invalid build config: {self}")

    def settings(self) -> dict[str, Any]:
        """What must agree between a build and its resumption (recorded in the index)."""
        ex = self.extract
        return {
            "fps": ex.fps,
            "spaces": list(ex.spaces),
            "tracker": asdict(ex.tracker),
            "max_side": ex.max_side,
            "audio": {"logmel": 81, "hubert": self.hubert is not None},
            "liveportrait": self.liveportrait if "keypoints" in ex.spaces else None,
            "val_fraction": self.val_fraction,
        }


@dataclass(frozen=True)
class BuildReport:
    out: Path
    kept: int
    skipped: list[dict[str, Any]]
    new: int
    hours: float
    emotions: dict[str, int]

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "out": str(self.out)}


def split_of(source: ClipSource, val_fraction: float) -> str:
    """``val`` for a stable ``val_fraction`` of the speakers (of the clips, when the speaker is unknown)."""
    if source.split is not None:
        return source.split
    key = source.speaker if source.speaker is not None else source.id
    bucket = int(hashlib.sha1(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return SPLITS[1] if bucket < val_fraction else SPLITS[0]


# --- per process state (one tracker / extractor per worker process) --------------------------------------------


@dataclass
class _Worker:
    config: BuildConfig
    tracker: MeshTracker
    keypoints: KeypointExtractor | None
    hubert: HubertStreaming | None

    @classmethod
    def create(cls, config: BuildConfig) -> _Worker:
        keypoints = None
        if "keypoints" in config.extract.spaces:
            nets = liveportrait.load_or_build(Path(config.liveportrait) if config.liveportrait else None)
            if nets.untrained and not config.allow_untrained:
                raise ValueError("the keypoints space needs imported LivePortrait weights (engine weights import)")
            keypoints = KeypointExtractor(nets, config.extract.batch)
        hubert = HubertStreaming(config.hubert) if config.hubert else None
        return cls(config, MeshTracker(config=config.extract.tracker), keypoints, hubert)

    def __call__(self, source: ClipSource) -> tuple[ClipSource, Any, str]:
        """(source, ClipRecord or None, reason when None). Never raises for a bad video."""
        try:
            record = extract_clip(source.path, self.config.extract, self.tracker, self.keypoints, self.hubert)
        except (MediaError, AvatarError) as exc:  # unreadable, no audio, no face, face lost, too short
            return source, None, str(exc).removeprefix(f"{source.path}: ")
        except (ValueError, RuntimeError, OSError, MemoryError) as exc:
            logger.exception("clip %s failed", source.path)
            return source, None, f"unexpected error: {type(exc).__name__}: {exc}"
        return source, record, ""


_POOL_WORKER: list[_Worker] = []  # the one worker of a pool process (set by its initializer)


def _init_pool_process(config: BuildConfig) -> None:
    torch.set_num_threads(1)  # the parallelism is across processes
    _POOL_WORKER.append(_Worker.create(config))


def _pool_work(source: ClipSource) -> tuple[ClipSource, Any, str]:
    return _POOL_WORKER[0](source)


def _results(sources: Sequence[ClipSource], config: BuildConfig) -> Iterator[tuple[ClipSource, Any, str]]:
    if config.workers == 1 or len(sources) == 1:
        worker = _Worker.create(config)
        for s in sources:
            yield worker(s)
        return
    # spawn: workers start clean (no copied torch / OpenCV thread state from the parent)
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(min(config.workers, len(sources)), initializer=_init_pool_process, initargs=(config,)) as pool:
        yield from pool.imap_unordered(_pool_work, sources)


def build_dataset(
    sources: Sequence[ClipSource],
    out: str | Path,
    config: BuildConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> BuildReport:
    """Extract ``sources`` into the dataset ``out`` (created, or resumed when it holds an index of the same
    settings). ``progress(n)`` is called once per finished video."""
    cfg = config or BuildConfig()
    out = Path(out)
    writer = ShardWriter(out, cfg.settings(), cfg.shard_clips, cfg.shard_mb << 20)
    done = writer.done() | (set() if cfg.retry_skipped else writer.skipped())
    todo = [s for s in sources if s.id not in done]
    if progress is not None and len(todo) < len(sources):
        progress(len(sources) - len(todo))
    new = 0
    try:
        for source, record, reason in _results(todo, cfg):
            meta = {**source.meta(), "split": split_of(source, cfg.val_fraction)}
            if record is None:
                writer.skip(meta, reason)
                logger.warning("skipped %s: %s", source.path, reason)
            else:
                writer.add({**meta, **record.meta}, record.arrays)
                new += 1
            if progress is not None:
                progress(1)
    finally:
        writer.close()
    clips = writer.index["clips"]
    report = BuildReport(
        out=out,
        kept=len(clips),
        skipped=list(writer.index["skipped"]),
        new=new,
        hours=round(sum(c["frames"] for c in clips) / cfg.extract.fps / 3600, 4),
        emotions=dict(Counter(c.get("emotion") or "unlabelled" for c in clips)),
    )
    write_json_atomic(out / REPORT_NAME, report.as_dict())
    return report


def default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))
