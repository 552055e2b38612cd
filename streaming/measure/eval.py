"""``engine eval RUN DS``: how well a trained run reproduces a dataset's held-out clips.

For a heads run (or any personal model folder) on the clips of its motion space:

* ``lmd``: the mean distance between the predicted and the measured LIP keypoint offsets (the mouth at rest
  subtracted), an LMD-style figure, in the space's units (mesh: eye distances), next to ``lmd_rest``, the
  distance of a mouth that never moves;
* ``sync``: the lip-sync offset (ms, > 0: the mouth late) and the correlation of the predicted lip opening with
  the audio envelope, from the project's lip-sync instrument (:func:`streaming.measure.sync.estimate_offset`),
  and the same for the clips' own measured opening (``sync_reference``);
* ``emotion_accuracy``: labelled clips classified by the nearest learned emotion offset (IEDP) to their rest
  expression minus their speaker's neutral rest, where the split has both.

For a motion run (a Ditto store) on the keypoints space: the denoiser drives each clip's first frame through the
neural motion stage; ``lmd`` is the mean distance of the LIP keypoints (driven minus measured) and ``sync`` as
above. Results: ``metrics.json`` and ``eval.png``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from engine.keypoints import EMOTION, LIP, SourceFace, keypoints_from_params
from engine.motion import lmdm
from engine.motion.decode import decode_motion
from engine.motion.emotion import EMOTIONS
from engine.motion.neural import build_neural_motion
from engine.motion.personal_model import PersonalModel
from engine.train.samples import ClipData, clip_data, emotion_targets, head_inputs, norms_of, rest_expression
from engine.train.shards import ClipInfo, Dataset
from engine.weights.checkpoint import RECORD_NAME
from streaming.measure.sync import FPS as SYNC_FPS
from streaming.measure.sync import estimate_offset

LOWER_LIP, UPPER_LIP = 17, 14  # keypoints whose vertical gap is the lip opening


class EvalError(ValueError):
    """The run or the dataset cannot be evaluated (nothing held out, another motion space); says why."""


@dataclass
class EvalReport:
    run: str
    dataset: str
    kind: str  # heads | motion
    space: str
    split: str
    clips: int
    lmd: float
    lmd_rest: float
    sync: dict[str, float]
    sync_reference: dict[str, float]
    emotion_accuracy: float | None
    emotion_clips: int
    per_clip: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _held_out(dataset: Dataset, space: str, split: str) -> tuple[list[ClipInfo], str]:
    infos = [c for c in dataset.clips if space in c.spaces]
    chosen = [c for c in infos if c.split == split]
    if not chosen and split == "val":
        return infos, "all (no validation split)"
    return chosen, split


def _opening(offsets: np.ndarray) -> np.ndarray:
    """Lip opening per frame from LIP offsets ``[T, 21, 3]``: the lower lip's drop below the upper lip."""
    return offsets[:, LOWER_LIP, 1] - offsets[:, UPPER_LIP, 1]


def _sync(opening: np.ndarray, audio: np.ndarray | None, loud_db: np.ndarray) -> dict[str, float]:
    env = 10.0 ** (loud_db / 20.0) if audio is None else audio
    try:
        found = estimate_offset(opening, env, SYNC_FPS)
    except ValueError:
        return {"offset_ms": math.nan, "correlation": math.nan}
    return {"offset_ms": round(found.offset_ms, 2), "correlation": round(found.correlation, 4)}


def _mean_sync(items: Sequence[dict[str, float]]) -> dict[str, float]:
    keys = ("offset_ms", "correlation")
    return {k: round(float(np.nanmean([i[k] for i in items])), 4) if items else math.nan for k in keys}


def _personal_offsets(model: PersonalModel, clip: ClipData) -> np.ndarray:
    """The LADP's LIP offsets ``[T, 21, 3]`` (space units) for the clip's audio: the inputs the motion stage
    builds (normalised audio context and identity: the model's, or the clip's face for a dataset model)."""
    heads = model.heads.eval()
    identity = heads.identity.numpy() if model.config.identity_from == "model" else clip.geometry
    lip_x, _ = head_inputs(clip, model.config, norms_of(heads), identity)
    with torch.no_grad():
        return heads.lip_offsets(torch.from_numpy(lip_x)).numpy()


def evaluate_heads(run: Path, dataset: Dataset, split: str = "val") -> tuple[EvalReport, dict[str, Any]]:
    model_dir = next(
        (d for d in (run, *sorted(p for p in run.iterdir() if p.is_dir())) if (d / "personal.json").is_file()), None
    )
    if model_dir is None:
        raise EvalError(f"{run}: no personal model (personal.json) in the run")
    model = PersonalModel.load(model_dir)
    space = model.config.space
    infos, used = _held_out(dataset, space, split)
    if not infos:
        raise EvalError(f"{dataset.root}: no clips with the {space!r} space")
    clips = [clip_data(dataset.arrays(i), space, i.meta) for i in infos]
    per_clip, lmds, rests, syncs, refs, curves = [], [], [], [], [], []
    for c in clips:
        truth = c.expr - rest_expression(c)
        pred = _personal_offsets(model, c)
        ok = c.valid
        lip = list(LIP)
        d = np.linalg.norm(pred[ok][:, lip] - truth[ok][:, lip], axis=-1).mean()
        d0 = np.linalg.norm(truth[ok][:, lip], axis=-1).mean()
        s = _sync(_opening(pred), None, c.audio[:, -1])
        r = _sync(_opening(truth), None, c.audio[:, -1])
        lmds.append(d)
        rests.append(d0)
        syncs.append(s)
        refs.append(r)
        per_clip.append(
            {"id": c.id, "lmd": round(float(d), 5), "lmd_rest": round(float(d0), 5), "sync": s, "sync_reference": r}
        )
        curves.append((c.id, _opening(truth), _opening(pred)))
    accuracy, n_emo = _emotion_accuracy(model, clips)
    report = EvalReport(
        str(run),
        str(dataset.root),
        "heads",
        space,
        used,
        len(clips),
        round(float(np.mean(lmds)), 5),
        round(float(np.mean(rests)), 5),
        _mean_sync(syncs),
        _mean_sync(refs),
        accuracy,
        n_emo,
        per_clip,
    )
    return report, {"curves": curves}


def _emotion_accuracy(model: PersonalModel, clips: Sequence[ClipData]) -> tuple[float | None, int]:
    """Nearest learned emotion offset to each labelled clip's measured offset (see the module docstring)."""
    if model.heads.emotion is None or not model.emotions:
        return None, 0
    x, y, _ = emotion_targets(clips)
    if not len(x):
        return None, 0
    with torch.no_grad():
        protos = model.heads.emotion_offsets(torch.eye(len(EMOTIONS)))[:, list(EMOTION)].numpy()
    allowed = [EMOTIONS.index(e) for e in model.emotions]
    truth = x.argmax(1)
    keep = np.isin(truth, allowed)
    if not keep.any():
        return None, 0
    dist = np.linalg.norm(y[keep][:, None] - protos[allowed][None], axis=-1).sum(-1)  # [K, E]
    guess = np.array(allowed)[dist.argmin(1)]
    return round(float((guess == truth[keep]).mean()), 4), int(keep.sum())


def evaluate_motion(
    run: Path, dataset: Dataset, split: str = "val", max_clips: int = 16
) -> tuple[EvalReport, dict[str, Any]]:
    denoiser = lmdm.load(run).eval()
    if int(denoiser.config.cond_dim) != lmdm.logmel_cond_dim():
        raise EvalError(
            f"{run}: only log-mel conditioned denoisers are evaluated here (cond {denoiser.config.cond_dim})"
        )
    infos, used = _held_out(dataset, "keypoints", split)
    if not infos:
        raise EvalError(f"{dataset.root}: the motion evaluation needs clips with the keypoints space")
    per_clip, lmds, rests, syncs, refs, curves = [], [], [], [], [], []
    for info in infos[:max_clips]:
        arrays = dataset.arrays(info)
        motion = torch.from_numpy(np.asarray(arrays["keypoints/motion"], np.float32))
        truth_p = decode_motion(motion)
        kp_c = torch.from_numpy(np.asarray(arrays["keypoints/geometry"], np.float32))
        first = type(truth_p)(*(x[:1] for x in truth_p))
        source = SourceFace(kp_c, first, keypoints_from_params(kp_c[None], first)[0])
        stage = build_neural_motion(denoiser, source)
        with torch.no_grad():
            frames = stage.push(np.asarray(arrays["audio"], np.float32)) + stage.flush()
        pred_exp = torch.cat([f.params.exp for f in frames])[: motion.shape[0]]
        truth_exp = truth_p.exp[: pred_exp.shape[0]]
        n = pred_exp.shape[0]
        lip = list(LIP)
        pe = (pred_exp - pred_exp[:1]).numpy()
        te = (truth_exp - truth_exp[:1]).numpy()
        d = float(np.linalg.norm(pe[:, lip] - te[:, lip], axis=-1).mean())
        d0 = float(np.linalg.norm(te[:, lip], axis=-1).mean())
        loud = np.asarray(arrays["audio"], np.float32)[:n, -1]
        s, r = _sync(_opening(pe), None, loud), _sync(_opening(te), None, loud)
        lmds.append(d)
        rests.append(d0)
        syncs.append(s)
        refs.append(r)
        per_clip.append({"id": info.id, "lmd": round(d, 5), "lmd_rest": round(d0, 5), "sync": s, "sync_reference": r})
        curves.append((info.id, _opening(te), _opening(pe)))
    report = EvalReport(
        str(run),
        str(dataset.root),
        "motion",
        "keypoints",
        used,
        len(per_clip),
        round(float(np.mean(lmds)), 5),
        round(float(np.mean(rests)), 5),
        _mean_sync(syncs),
        _mean_sync(refs),
        None,
        0,
        per_clip,
    )
    return report, {"curves": curves}


def evaluate(run: str | Path, dataset: str | Path, split: str = "val") -> tuple[EvalReport, dict[str, Any]]:
    run, ds = Path(run), Dataset(dataset)
    if (run / RECORD_NAME).is_file():
        return evaluate_motion(run, ds, split)
    return evaluate_heads(run, ds, split)


def plot_eval(report: EvalReport, extra: dict[str, Any], path: Path) -> None:
    """Lip opening, measured vs predicted, for up to four clips, and the headline numbers."""
    curves = extra.get("curves", [])[:4]
    fig = Figure(figsize=(10, 2.4 * max(1, len(curves)) + 0.6))
    axes = fig.subplots(max(1, len(curves)), 1, squeeze=False)[:, 0]
    for ax, (cid, truth, pred) in zip(axes, curves, strict=False):
        t = np.arange(len(truth)) / 25.0
        ax.plot(t, truth, lw=1, label="measured")
        ax.plot(t, pred[: len(truth)], lw=1, label="predicted")
        ax.set_title(cid, fontsize=8)
        ax.set_ylabel("lip opening")
        ax.legend(fontsize=7)
    axes[-1].set_xlabel("seconds")
    acc = "n/a" if report.emotion_accuracy is None else f"{report.emotion_accuracy:.0%} of {report.emotion_clips}"
    fig.suptitle(
        f"{report.kind} on {report.clips} {report.split} clips: LMD {report.lmd:.4f} (rest {report.lmd_rest:.4f}), "
        f"sync {report.sync['offset_ms']} ms r={report.sync['correlation']}, emotion {acc}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
