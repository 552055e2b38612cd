"""Personalization (EP-Talk's use case): a person's heads learned from one or a few short clips, on a CPU.

From clips of one person (a minute of webcam video is enough): their lip motion (LADP: lip offsets from audio,
conditioned on their identity), their head-motion style (IMDP: the keypoint displacement of their head pose, fed
by the clips' own pose track, which the runtime replays) and, for clips labelled with an emotion, that emotion's
offset against their neutral clips (IEDP). The last ``val_fraction`` of every clip is held out: the report gives
each head's validation error next to the error of predicting no motion at all.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import torch

from engine.avatar.image import AvatarError
from engine.media import MediaError
from engine.motion.personal_model import PersonalConfig, PersonalHeads, PersonalModel
from engine.train.extract import ClipRecord, ExtractConfig, KeypointExtractor, extract_clip
from engine.train.samples import (
    ClipData,
    HeadBatch,
    clip_data,
    emotion_targets,
    fit_norms,
    head_batch,
    heads_loss,
    norms_of,
    pose_features,
    set_norms,
)
from engine.train.sources import ClipSource
from engine.train.tracking import MeshTracker

CROSSFADE = 12  # frames blended where two clips' pose tracks meet


class PersonalizeError(ValueError):
    """The clips cannot personalize the avatar (too short, no usable frame); the message says why."""


@dataclass(frozen=True)
class FitConfig:
    model: PersonalConfig = field(default_factory=PersonalConfig)
    steps: int = 800
    batch: int = 256
    lr: float = 2e-3
    weight_decay: float = 1e-2
    input_noise: float = 0.1  # Gaussian noise on the normalised inputs while training
    eval_every: int = 50
    seed: int = 0
    val_fraction: float = 0.15  # the tail of every clip
    min_frames: int = 50  # valid frames needed over all clips

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch < 1 or not self.lr > 0 or self.weight_decay < 0 or self.input_noise < 0:
            raise ValueError(f"invalid fit config: {self}")
        if not 0 <= self.val_fraction < 0.5 or self.min_frames < 1:
            raise ValueError(f"invalid fit config: {self}")


@dataclass
class FitReport:
    clips: int
    frames: int
    seconds: float
    emotions: list[str]
    steps: int
    fit_s: float
    val: dict[str, float]  # validation MSE per head (normalised units)
    val_zero: dict[str, float]  # ... of predicting zero offsets
    train: dict[str, float]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """Run torch on one thread inside the block (restored after)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def reference_track(clips: Sequence[ClipData], sigma: float) -> np.ndarray:
    """The clips' smoothed pose deviations ``[N, 7]`` joined into one track (crossfaded at the joins)."""
    track: np.ndarray | None = None
    for c in clips:
        feats = pose_features(c.pose, c.valid, sigma)
        if track is None:
            track = feats
            continue
        n = min(CROSSFADE, len(track), len(feats))
        w = np.linspace(0.0, 1.0, n + 2)[1:-1, None]
        joined = track[-n:] * (1 - w) + feats[:n] * w
        track = np.concatenate([track[:-n], joined, feats[n:]])
    assert track is not None
    return track.astype(np.float32)


def _split(clips: Sequence[ClipData], val_fraction: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    train, val = {}, {}
    for c in clips:
        cut = round(c.frames * (1 - val_fraction))
        mask = np.zeros(c.frames, bool)
        mask[:cut] = True
        train[c.id], val[c.id] = mask, ~mask
    return train, val


@torch.no_grad()
def evaluate(heads: PersonalHeads, batch: HeadBatch) -> tuple[dict[str, float], dict[str, float]]:
    """(MSE per head, MSE of zero offsets per head), in the heads' normalised units."""
    heads.eval()
    if not (batch.lip_x.shape[0] or batch.pose_x.shape[0] or batch.emo_x.shape[0]):
        return {}, {}
    _, parts = heads_loss(heads, batch)
    s = heads.out_scale
    zero = {}
    if batch.lip_x.shape[0]:
        zero["lip"] = float(torch.mean((batch.lip_y / s[0]) ** 2))
    if batch.pose_x.shape[0]:
        zero["pose"] = float(torch.mean((batch.pose_y / s[1]) ** 2))
    if batch.emo_x.shape[0] and heads.emotion is not None:
        zero["emotion"] = float(torch.mean((batch.emo_y / s[2]) ** 2))
    return {k: float(v) for k, v in parts.items()}, zero


def fit_personal(
    clips: Sequence[ClipData],
    config: FitConfig | None = None,
    init: PersonalModel | None = None,
    progress: Callable[[int, float], None] | None = None,
) -> tuple[PersonalModel, FitReport]:
    """Learn a person's heads from ``clips`` (one motion space). ``init``: start from these heads (e.g. trained on
    a dataset) and keep their normalisation. ``progress(step, loss)`` is called every 50 steps."""
    cfg = config or FitConfig()
    started = time.perf_counter()
    if not clips:
        raise PersonalizeError("no clips to learn from")
    frames = sum(int(c.valid.sum()) for c in clips)
    if frames < cfg.min_frames:
        raise PersonalizeError(f"only {frames} frames with a tracked face; at least {cfg.min_frames} are needed")
    model_cfg = init.config if init is not None else cfg.model
    _, _, emotions = emotion_targets(clips)
    identity = np.mean([c.geometry for c in clips], axis=0)
    if init is not None:
        heads = PersonalHeads(model_cfg, with_emotion=True)
        state = {k: v for k, v in init.heads.state_dict().items() if not k.startswith("emotion.")}
        heads.load_state_dict(state, strict=False)
        norms = norms_of(init.heads)
        fresh = fit_norms(clips, model_cfg)
        norms = norms._replace(out_scale=np.array([*norms.out_scale[:2], fresh.out_scale[2]], np.float32))
    else:
        with torch.random.fork_rng():
            torch.manual_seed(cfg.seed)
            heads = PersonalHeads(model_cfg, with_emotion=True)
        norms = fit_norms(clips, model_cfg)
    set_norms(heads, norms, identity)
    train_mask, val_mask = _split(clips, cfg.val_fraction)
    train = head_batch(clips, model_cfg, norms, train_mask)
    val = head_batch(clips, model_cfg, norms, val_mask)
    full_emotion = head_batch(clips, model_cfg, norms)  # emotion samples are per clip: all of them train
    train = train._replace(emo_x=full_emotion.emo_x, emo_y=full_emotion.emo_y)
    if train.lip_x.shape[0] == 0:
        raise PersonalizeError("no training frames left after holding out the validation tail")
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(heads.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.steps, pct_start=0.1)
    n_lip, n_pose, n_emo = train.lip_x.shape[0], train.pose_x.shape[0], train.emo_x.shape[0]
    last: dict[str, float] = {}
    best: tuple[float, dict[str, torch.Tensor]] | None = None

    def pick(n: int) -> torch.Tensor:
        return torch.randint(0, n, (min(cfg.batch, n),), generator=gen) if n else torch.zeros(0, dtype=torch.long)

    with single_thread():  # tiny networks: threads only spin against each other
        for step in range(cfg.steps):
            heads.train()
            batch = train.take(pick(n_lip), pick(n_pose), pick(n_emo))
            if cfg.input_noise > 0:
                batch = batch._replace(
                    lip_x=batch.lip_x + cfg.input_noise * torch.randn(batch.lip_x.shape, generator=gen),
                    pose_x=batch.pose_x + cfg.input_noise * torch.randn(batch.pose_x.shape, generator=gen),
                )
            loss, parts = heads_loss(heads, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(heads.parameters(), 1.0)
            opt.step()
            sched.step()
            last = {k: float(v.detach()) for k, v in parts.items()}
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                # keep the weights that generalise best (a minute of video is easy to memorise)
                score = sum(evaluate(heads, val)[0].values()) if val.lip_x.shape[0] else float(loss.detach())
                if best is None or score < best[0]:
                    best = (score, {k: v.detach().clone() for k, v in heads.state_dict().items()})
            if progress is not None and (step + 1) % 50 == 0:
                progress(step + 1, float(loss.detach()))
    assert best is not None
    heads.load_state_dict(best[1])
    heads.eval()
    val_loss, val_zero = evaluate(heads, val)
    seconds = round(sum(c.frames for c in clips) / 25.0, 2)
    info = {
        "clips": [c.id for c in clips],
        "frames": frames,
        "seconds": seconds,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "val": val_loss,
        "val_zero": val_zero,
        "init": (init.info or {}).get("source") if init is not None else None,
    }
    model = PersonalModel(heads, reference_track(clips, model_cfg.pose_smooth), tuple(emotions), False, info)
    report = FitReport(
        clips=len(clips),
        frames=frames,
        seconds=seconds,
        emotions=list(emotions),
        steps=cfg.steps,
        fit_s=round(time.perf_counter() - started, 2),
        val=val_loss,
        val_zero=val_zero,
        train=last,
    )
    return model, report


def with_space(config: FitConfig, space: str) -> FitConfig:
    return replace(config, model=replace(config.model, space=space))


@dataclass
class ClipResult:
    source: ClipSource
    record: ClipRecord | None
    reason: str = ""


def extract_sources(
    sources: Sequence[ClipSource],
    spaces: Sequence[str],
    keypoints: KeypointExtractor | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[ClipResult]:
    """Extract every clip (a bad one is kept with the reason instead of stopping the others)."""
    cfg = ExtractConfig(spaces=tuple(spaces))
    tracker = MeshTracker(config=cfg.tracker)
    out = []
    for source in sources:
        try:
            out.append(ClipResult(source, extract_clip(source.path, cfg, tracker, keypoints)))
        except (MediaError, AvatarError) as exc:
            out.append(ClipResult(source, None, str(exc)))
        if progress is not None:
            progress(1)
    return out


def clips_for_space(results: Sequence[ClipResult], space: str, person: str) -> list[ClipData]:
    """The extracted clips as one person's :class:`ClipData` in ``space``. When some clips carry an emotion label,
    the unlabelled ones count as that person's neutral clips (what the emotion offsets are measured against)."""
    good = [r for r in results if r.record is not None]
    labelled = any(r.source.emotion is not None for r in good)
    clips = []
    for r in good:
        assert r.record is not None
        emotion = r.source.emotion or ("neutral" if labelled else None)
        intensity = r.source.intensity if r.source.emotion is not None else (1.0 if labelled else None)
        meta = {"id": r.source.id, "emotion": emotion, "intensity": intensity, "speaker": person}
        clips.append(clip_data(r.record.arrays, space, meta))
    return clips
