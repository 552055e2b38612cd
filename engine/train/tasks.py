"""The three dataset-scale training tasks over a dataset (:class:`engine.train.shards.Dataset`).

* ``heads``: EP-Talk's LADP, IMDP and IEDP on every speaker of the dataset (identity-conditioned lips); exports a
  personal model (``RUN/<space>/personal.json``) that ``engine personalize --from RUN`` attaches to an avatar or
  ``--init RUN`` fine-tunes on a person's clips.
* ``motion``: fine-tunes (or trains) the Ditto-compatible LMDM denoiser with its own objective: predict ``x0`` of a
  noised 80-frame motion window (cosine schedule, t uniform), conditioned on the previous frame, the audio, the
  emotion label and the face; a share ``cond_drop`` of the samples drops the condition (classifier-free guidance,
  which the sampler runs with weight 2). Exports a Ditto store in the run folder itself: ``--motion-weights RUN``.
* ``adapter``: EAT's emotion adapter (:mod:`engine.motion.adapter`) on a frozen base denoiser, same objective;
  exports the base's weights plus ``adapter.safetensors`` as a Ditto store.

The diffusion tasks need the ``keypoints`` space (a dataset built with LivePortrait weights).
"""

from __future__ import annotations

import dataclasses
import hashlib
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from engine import __version__
from engine.motion import lmdm
from engine.motion.adapter import ADAPTER_FILE, attach_adapter, new_adapter
from engine.motion.emotion import EMOTIONS, emotion_soft_label
from engine.motion.heads import EmotionAdapter
from engine.motion.personal_model import PersonalConfig, PersonalHeads, PersonalModel
from engine.motion.schedule import cosine_alphas_cumprod
from engine.train.config import TrainConfig
from engine.train.personalize import reference_track
from engine.train.samples import ClipData, HeadBatch, clip_data, fit_norms, head_batch, heads_loss, set_norms
from engine.train.shards import ClipInfo, Dataset
from engine.train.trainer import TrainError
from engine.weights.checkpoint import save_tensors, write_record

VAL_TAIL = 0.1  # without a validation split: the last tenth of every training clip validates


def _tail_masks(clips: list[ClipData], fraction: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    train, val = {}, {}
    for c in clips:
        cut = round(c.frames * (1 - fraction))
        m = np.arange(c.frames) < cut
        train[c.id], val[c.id] = m, ~m
    return train, val


# --- heads ------------------------------------------------------------------------------------------------------


class HeadsObjective(nn.Module):
    """The heads and their loss as one module (what DDP wraps)."""

    def __init__(self, heads: PersonalHeads) -> None:
        super().__init__()
        self.heads = heads

    def forward(self, batch: HeadBatch) -> tuple[Tensor, dict[str, Tensor]]:
        return heads_loss(self.heads, batch)


class HeadsTask:
    name = "heads"

    def __init__(self, dataset: Dataset, config: TrainConfig) -> None:
        hc = config.heads
        space = hc.space
        if space == "auto":
            space = "keypoints" if dataset.clips and all("keypoints" in c.spaces for c in dataset.clips) else "mesh"
        self.space = space
        self.config = config
        self.model_config = PersonalConfig(
            space=space,
            bands=hc.bands,
            past=hc.past,
            future=hc.future,
            pose_context=hc.pose_context,
            pose_smooth=hc.pose_smooth,
            hidden=hc.hidden,
            identity_from="avatar",
        )
        infos = [c for c in dataset.clips if space in c.spaces]
        train = [clip_data(dataset.arrays(i), space, i.meta) for i in infos if i.split != "val"]
        val = [clip_data(dataset.arrays(i), space, i.meta) for i in infos if i.split == "val"]
        if not train:
            raise TrainError(f"{dataset.root}: no training clips with the {space!r} space")
        self.train_clips = train
        self.norms = fit_norms(train, self.model_config)
        if val:
            self.train = head_batch(train, self.model_config, self.norms)
            self.val = head_batch(val, self.model_config, self.norms)
        else:
            tr, va = _tail_masks(train, VAL_TAIL)
            self.train = head_batch(train, self.model_config, self.norms, tr)
            self.val = head_batch(train, self.model_config, self.norms, va)
            full = head_batch(train, self.model_config, self.norms)
            self.train = self.train._replace(emo_x=full.emo_x, emo_y=full.emo_y)
        picked = self.train.emo_x.argmax(1).tolist() if len(self.train.emo_x) else []
        self.emotions = sorted({EMOTIONS[int(i)] for i in picked})
        self.input_noise = hc.input_noise
        self.reference_seconds = hc.reference_seconds

    def build_model(self) -> nn.Module:
        heads = PersonalHeads(self.model_config, with_emotion=bool(len(self.train.emo_x)))
        set_norms(heads, self.norms, np.zeros(63, np.float32))
        return HeadsObjective(heads)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def sample(self, generator: torch.Generator, batch: int, lo: int, hi: int) -> HeadBatch:
        t = self.train

        def pick(n: int) -> Tensor:
            return torch.randint(0, n, (batch,), generator=generator)[lo:hi] if n else torch.zeros(0, dtype=torch.long)

        lip, pose, emo = pick(t.lip_x.shape[0]), pick(t.pose_x.shape[0]), pick(t.emo_x.shape[0])
        out = t.take(lip, pose, emo)
        if self.input_noise > 0:
            lip_noise = torch.randn((batch, t.lip_x.shape[1]), generator=generator)[lo:hi]
            pose_noise = torch.randn((batch, t.pose_x.shape[1]), generator=generator)[lo:hi]
            out = out._replace(
                lip_x=out.lip_x + self.input_noise * lip_noise[: len(lip)],
                pose_x=out.pose_x + self.input_noise * pose_noise[: len(pose)],
            )
        return out

    def loss(self, model: nn.Module, batch: HeadBatch) -> tuple[Tensor, dict[str, Tensor]]:
        result: tuple[Tensor, dict[str, Tensor]] = model(batch)
        return result

    def validation(self, count: int) -> list[HeadBatch]:
        return [self.val] if self.val.lip_x.shape[0] else []

    def export(self, model: nn.Module, out: Path) -> dict[str, Any]:
        assert isinstance(model, HeadsObjective)
        heads = model.heads.cpu().eval()
        keep = int(self.reference_seconds * 25)
        track = reference_track(self.train_clips, self.model_config.pose_smooth)[:keep]
        info = {"source": str(out), "clips": len(self.train_clips), "trained_on": "dataset"}
        target = out / self.space
        target.mkdir(parents=True, exist_ok=True)
        PersonalModel(heads, track, tuple(self.emotions), False, info).save(target)
        return {"personal_model": str(target), "space": self.space, "emotions": self.emotions}


# --- diffusion ------------------------------------------------------------------------------------------------


class Windows(NamedTuple):
    x0: Tensor  # [B, W, 265]
    cond_frame: Tensor  # [B, 265]
    cond: Tensor  # [B, W, C]
    t: Tensor  # [B] int64
    noise: Tensor  # [B, W, 265]
    drop: Tensor  # [B] bool


class DiffusionObjective(nn.Module):
    """x0 prediction loss of a noised window (classifier-free condition dropout per sample)."""

    alphas_cumprod: Tensor

    def __init__(self, denoiser: nn.Module, velocity_weight: float = 0.0, adapter: EmotionAdapter | None = None):
        super().__init__()
        self.denoiser = denoiser
        self.adapter = adapter  # a submodule here (device moves, checkpoints); hooked onto the denoiser
        self.velocity_weight = velocity_weight
        self.register_buffer("alphas_cumprod", cosine_alphas_cumprod(), persistent=False)

    def forward(self, b: Windows) -> tuple[Tensor, dict[str, Tensor]]:
        ab = self.alphas_cumprod[b.t].to(b.x0.dtype)[:, None, None]
        x_t = ab.sqrt() * b.x0 + (1 - ab).sqrt() * b.noise
        pred = self.denoiser(x_t, b.cond_frame, b.cond, b.t, drop_mask=b.drop)
        parts = {"x0": torch.mean((pred - b.x0) ** 2)}
        if self.velocity_weight > 0:
            parts["velocity"] = torch.mean((pred.diff(dim=1) - b.x0.diff(dim=1)) ** 2)
        total = parts["x0"] + self.velocity_weight * parts.get("velocity", torch.zeros(()))
        return total, parts


class DiffusionTask:
    """``motion`` (fine-tune the denoiser) or ``adapter`` (train an emotion adapter on a frozen one)."""

    def __init__(self, dataset: Dataset, config: TrainConfig, name: str) -> None:
        self.name = name
        self.config = config
        dc = config.diffusion
        self.dataset_root = dataset.root
        if dc.base is not None:
            self.base_record_id = lmdm.read_ditto_record(Path(dc.base)).get("weights_id")
            probe = lmdm.load(Path(dc.base))
        else:
            self.base_record_id = None
            probe = None
        cond_dim = int(probe.config.cond_dim) if probe is not None else None
        audio = dc.audio
        if audio == "auto":
            audio = "hubert" if cond_dim is not None and cond_dim - 79 == 1024 else "logmel"
        self.audio = audio
        self.lmdm_config = (
            probe.config
            if probe is not None
            else lmdm.preset_config(dc.preset, cond_dim=lmdm.logmel_cond_dim() if audio == "logmel" else 1024 + 79)
        )
        audio_dim = self.lmdm_config.cond_dim - 79
        if (audio == "logmel" and audio_dim != 80) or (audio == "hubert" and audio_dim != 1024):
            raise TrainError(f"the denoiser's condition has {audio_dim} audio columns, not what {audio!r} gives")
        if name == "adapter" and probe is not None and getattr(probe, "untrained", False):
            raise TrainError("an emotion adapter needs a trained base denoiser")
        self.window = self.lmdm_config.seq_len
        usable = [c for c in dataset.clips if "keypoints" in c.spaces]
        if not usable:
            raise TrainError(
                f"{dataset.root}: the {name} task needs the keypoints space (build the dataset with "
                "LivePortrait weights: engine dataset build --space keypoints)"
            )
        self.clips: list[dict[str, Any]] = []
        self.val_clips: list[dict[str, Any]] = []
        short = 0
        for info in usable:
            arrays = dataset.arrays(info)
            if audio == "hubert" and "hubert" not in arrays:
                raise TrainError(f"clip {info.id} has no HuBERT features (build the dataset with --hubert)")
            if info.frames < self.window + 1:
                short += 1
                continue
            item = {
                "motion": torch.from_numpy(np.asarray(arrays["keypoints/motion"], np.float32)),
                "audio": torch.from_numpy(
                    np.asarray(arrays["hubert" if audio == "hubert" else "audio"], np.float32)[:, :audio_dim]
                ),
                "emotion": torch.from_numpy(self._label(info)),
                "source": torch.from_numpy(self._source(arrays)),
            }
            (self.val_clips if info.split == "val" else self.clips).append(item)
        if not self.clips:
            raise TrainError(
                f"{dataset.root}: no training clip is longer than the {self.window}-frame window ({short} too short)"
            )
        starts = np.array([c["motion"].shape[0] - self.window for c in self.clips], np.float64)
        self._weights = torch.from_numpy(starts / starts.sum())
        self.base = probe

    @staticmethod
    def _label(info: ClipInfo) -> np.ndarray:
        neutral = emotion_soft_label("neutral")
        if info.emotion is None:
            return neutral
        intensity = 1.0 if info.intensity is None else float(info.intensity)
        return (neutral + intensity * (emotion_soft_label(info.emotion) - neutral)).astype(np.float32)

    @staticmethod
    def _source(arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Eye open (the scheduler's default), eye-ball move (0) and the canonical keypoints: ``[71]``."""
        sc = np.asarray(arrays["keypoints/geometry"], np.float32).reshape(-1)
        return np.concatenate([np.array([0.3, 0.3], np.float32), np.zeros(6, np.float32), sc])

    def build_model(self) -> nn.Module:
        denoiser = lmdm.from_config(self.lmdm_config)
        if self.base is not None:
            denoiser.load_state_dict(self.base.state_dict())
        dc = self.config.diffusion
        if self.name == "adapter":
            denoiser.requires_grad_(False)
            adapter = new_adapter(self.lmdm_config.width, dc.adapter_mid)
            attach_adapter(denoiser, adapter)
            return DiffusionObjective(denoiser, dc.velocity_weight, adapter)
        return DiffusionObjective(denoiser, dc.velocity_weight)

    def trainable(self, model: nn.Module) -> list[nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def _windows(
        self, clips: list[dict[str, Any]], gen: torch.Generator, batch: int, weights: Tensor | None
    ) -> Windows:
        w = self.window
        which = (
            torch.multinomial(weights, batch, replacement=True, generator=gen)
            if weights is not None
            else torch.randint(0, len(clips), (batch,), generator=gen)
        )
        frac = torch.rand(batch, generator=gen)
        x0, cf, cond = [], [], []
        for i, f in zip(which.tolist(), frac.tolist(), strict=True):
            c = clips[i]
            start = 1 + int(f * (c["motion"].shape[0] - w))
            x0.append(c["motion"][start : start + w])
            cf.append(c["motion"][start - 1])
            n = w
            cond.append(
                torch.cat([c["audio"][start : start + w], c["emotion"].expand(n, -1), c["source"].expand(n, -1)], 1)
            )
        t = torch.randint(0, 1000, (batch,), generator=gen)
        noise = torch.randn((batch, w, lmdm.LMDMConfig().motion_dim), generator=gen)
        drop = torch.rand(batch, generator=gen) < self.config.diffusion.cond_drop
        return Windows(torch.stack(x0), torch.stack(cf), torch.stack(cond), t, noise, drop)

    def sample(self, generator: torch.Generator, batch: int, lo: int, hi: int) -> Windows:
        # the whole global batch's randomness is drawn, then this process keeps its slice
        full = self._windows(self.clips, generator, batch, self._weights)
        return Windows(*(x[lo:hi] for x in full))

    def loss(self, model: nn.Module, batch: Windows) -> tuple[Tensor, dict[str, Tensor]]:
        result: tuple[Tensor, dict[str, Tensor]] = model(batch)
        return result

    def validation(self, count: int) -> list[Windows]:
        clips = self.val_clips or self.clips
        gen = torch.Generator().manual_seed(12345)
        return [
            self._windows(clips, gen, self.config.batch, None)._replace(
                drop=torch.zeros(self.config.batch, dtype=torch.bool)
            )
            for _ in range(count)
        ]

    def export(self, model: nn.Module, out: Path) -> dict[str, Any]:
        assert isinstance(model, DiffusionObjective)
        denoiser = model.denoiser.cpu().eval()
        state = {k: v.detach().clone() for k, v in denoiser.state_dict().items()}
        digest = hashlib.sha256(b"".join(v.numpy().tobytes()[:4096] for v in state.values())).hexdigest()
        record: dict[str, Any] = {
            "kind": lmdm.STORE_KIND,
            "preset": "trained",
            "engine_version": __version__,
            "weights_id": f"trained-{digest[:16]}",
            "config": dataclasses.asdict(self.lmdm_config),
            "files": {"lmdm": lmdm.LMDM_WEIGHTS_NAME},
            "sources": {"dataset": str(self.dataset_root), "base": self.base_record_id, "task": self.name},
            "num_parameters": sum(v.numel() for k, v in state.items() if not k.endswith("rotary.freqs")),
            "audio": self.audio,
        }
        save_tensors(out / lmdm.LMDM_WEIGHTS_NAME, state)
        hubert = lmdm.hubert_onnx_path(Path(self.config.diffusion.base)) if self.config.diffusion.base else None
        if self.audio == "hubert" and hubert is not None:  # the feature stage the denoiser was trained on
            shutil.copyfile(hubert, out / lmdm.HUBERT_FILE)
            record["files"]["hubert_onnx"] = lmdm.HUBERT_FILE
        if self.name == "adapter":
            assert model.adapter is not None
            save_tensors(out / ADAPTER_FILE, model.adapter.state_dict())
            record["files"]["adapter"] = ADAPTER_FILE
            record["adapter"] = {"mid": self.config.diffusion.adapter_mid, "emotions": list(EMOTIONS)}
        write_record(out, record)
        return {"ditto_store": str(out), "weights_id": record["weights_id"]}


def make_task(dataset: Dataset, config: TrainConfig) -> HeadsTask | DiffusionTask:
    if config.task == "heads":
        return HeadsTask(dataset, config)
    return DiffusionTask(dataset, config, config.task)
