"""LMDM denoiser: Ditto's latent motion diffusion transformer (``MotionDecoder``), checkpoint-compatible.

Spec: ``docs/spec/ditto.md`` §2. The network predicts the clean motion ``x_0`` of an 80-frame window from a noisy
window ``x_t``, the previous motion state ``cond_frame`` and per-frame conditions (audio features, emotion, eye
state, source keypoints). State-dict keys match Ditto's ``lmdm_v0.4_hubert.pth`` exactly
(``lmdm_manifest.json`` ships beside this file).

Presets (same code, different sizes):

* ``ditto``: Ditto's exact hyper-parameters (cond 1103 = 1024 HuBERT + 8 emotion + 2 eye + 6 gaze + 63 sc).
* ``tiny``: a small network for tests and the streaming scheduler's CPU runs.
* ``logmel``: Ditto's sizes conditioned on the engine's own log-mel features instead of HuBERT:
  ``cond_dim = n_mels + 79`` (79 = 8 emotion + 2 eye + 6 gaze + 63 sc), 80 mel bins by default (159).
  No public checkpoint exists for it; it runs untrained until someone trains it.

Usage::

    den = lmdm.load(dst)                      # imported with ``engine weights import ditto SRC --out dst``
    x0 = den(x_t, cond_frame, cond, t, drop_cond=False)
    den = lmdm.build("tiny")                  # deterministic random weights (noise; warns loudly)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from engine.config import ConfigError, from_dict
from engine.paths import default_ditto_dir
from engine.weights import warn_untrained
from engine.weights.checkpoint import CheckpointError, check_keys, load_tensors, read_record
from engine.weights.deterministic import deterministic_state_dict

logger = logging.getLogger(__name__)

MANIFEST_PATH = Path(__file__).with_name("lmdm_manifest.json")
LMDM_WEIGHTS_NAME = "lmdm.safetensors"
STORE_KIND = "ditto"
HUBERT_FILE = "hubert_streaming_fix_kv.onnx"  # Ditto's streaming HuBERT, copied into the store when found
# emotion 8 + eye open 2 + eye-ball move 6 + source canonical kp 63 (docs/spec/ditto.md §1.2), after the audio features
NON_AUDIO_COND_DIM = 8 + 2 + 6 + 63
DEFAULT_N_MELS = 80


@dataclass(frozen=True)
class LMDMConfig:
    motion_dim: int = 265
    cond_dim: int = 1103
    seq_len: int = 80
    width: int = 512
    heads: int = 8
    ff_dim: int = 1024
    encoder_layers: int = 2
    decoder_layers: int = 8

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LMDMConfig.{field.name} must be a positive int, got {value!r}")
        if self.width % self.heads or self.width % 2:
            raise ValueError(f"LMDMConfig: width {self.width} must be even and divisible by heads {self.heads}")


def logmel_cond_dim(n_mels: int = DEFAULT_N_MELS) -> int:
    """Condition width when the audio part is ``n_mels`` log-mel bins instead of 1024-d HuBERT."""
    return n_mels + NON_AUDIO_COND_DIM


PRESETS: dict[str, LMDMConfig] = {
    "ditto": LMDMConfig(),
    "tiny": LMDMConfig(width=64, heads=4, ff_dim=128, encoder_layers=1, decoder_layers=2),
    "logmel": LMDMConfig(cond_dim=logmel_cond_dim()),
}


def preset_config(preset: str, cond_dim: int | None = None) -> LMDMConfig:
    if preset not in PRESETS:
        raise ValueError(f"unknown LMDM preset {preset!r}; choose one of {sorted(PRESETS)}")
    config = PRESETS[preset]
    return config if cond_dim is None else dataclasses.replace(config, cond_dim=cond_dim)


class RotaryEmbedding(nn.Module):
    """Interleaved rotary position embedding over the full model width (one instance shared by all layers).

    ``freqs`` is a persistent buffer because Ditto's checkpoint stores it (under 11 names, one per owner).
    """

    freqs: Tensor

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("freqs", 1.0 / (10000 ** (torch.arange(0, dim, 2).float() / dim)))

    def rotate(self, v: Tensor) -> Tensor:
        """Rotate ``v [B, n, D]`` by positions ``0..n-1``: adjacent pairs (2i, 2i+1) share frequency i."""
        positions = torch.arange(v.shape[-2], device=v.device, dtype=self.freqs.dtype)
        angles = (positions[:, None] * self.freqs[None, :]).repeat_interleave(2, dim=-1)  # [n, D]
        pairs = v.unflatten(-1, (-1, 2))
        rotated_half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)  # (a, b) -> (-b, a)
        return v * angles.cos() + rotated_half * angles.sin()


class SinusoidalTimeEmbedding(nn.Module):
    """``[sin(t φ_0..φ_{h-1}), cos(...)]`` with φ_j = exp(-j ln(10000)/(h-1)), computed in float32."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, t: Tensor) -> Tensor:
        half = self.dim // 2
        k = math.log(10000) / (half - 1)
        phi = torch.exp(torch.arange(half, device=t.device) * -k)  # [h] float32
        a = t[:, None] * phi[None, :]  # [B, h]
        return torch.cat((a.sin(), a.cos()), dim=-1)  # [B, dim]


class DenseFiLM(nn.Module):
    """Scale and shift ``[B, 1, D]`` each from the FiLM vector (``block.1`` is the checkpoint's Linear)."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Mish(), nn.Linear(width, 2 * width))

    def forward(self, y: Tensor, film: Tensor) -> Tensor:
        scale, shift = self.block(film)[:, None, :].chunk(2, dim=-1)
        return (scale + 1) * y + shift


def _attend(attn: nn.MultiheadAttention, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    return attn(q, k, v, need_weights=False)[0]


class CondEncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer with rotary q/k on the inputs of the in-projection."""

    def __init__(self, width: int, heads: int, ff_dim: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.linear1 = nn.Linear(width, ff_dim)
        self.linear2 = nn.Linear(ff_dim, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.rotary = rotary

    def forward(self, c: Tensor) -> Tensor:
        n = self.norm1(c)
        qk = self.rotary.rotate(n)
        c = c + _attend(self.self_attn, qk, qk, n)
        return c + self.linear2(F.gelu(self.linear1(self.norm2(c))))


class FiLMDecoderLayer(nn.Module):
    """Pre-norm decoder layer: self-attention, cross-attention to the memory, feed-forward; each sub-layer's output
    is FiLM-modulated by the time/cond vector before the residual add (the residual stream is not modulated)."""

    def __init__(self, width: int, heads: int, ff_dim: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.multihead_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.linear1 = nn.Linear(width, ff_dim)
        self.linear2 = nn.Linear(ff_dim, width)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.norm3 = nn.LayerNorm(width)
        self.film1 = DenseFiLM(width)
        self.film2 = DenseFiLM(width)
        self.film3 = DenseFiLM(width)
        self.rotary = rotary

    def forward(self, h: Tensor, mem: Tensor, mem_rotated: Tensor, film: Tensor) -> Tensor:
        n1 = self.norm1(h)
        qk = self.rotary.rotate(n1)
        h = h + self.film1(_attend(self.self_attn, qk, qk, n1), film)
        q = self.rotary.rotate(self.norm2(h))
        h = h + self.film2(_attend(self.multihead_attn, q, mem_rotated, mem), film)
        return h + self.film3(self.linear2(F.gelu(self.linear1(self.norm3(h)))), film)


class FiLMDecoderStack(nn.Module):
    def __init__(self, width: int, heads: int, ff_dim: int, layers: int, rotary: RotaryEmbedding) -> None:
        super().__init__()
        self.stack = nn.ModuleList(FiLMDecoderLayer(width, heads, ff_dim, rotary) for _ in range(layers))

    def forward(self, h: Tensor, mem: Tensor, mem_rotated: Tensor, film: Tensor) -> Tensor:
        for layer in self.stack:
            h = layer(h, mem, mem_rotated, film)
        return h


class MotionDecoder(nn.Module):
    """The LMDM denoiser (Ditto ``MotionDecoder``); predicts x_0. Eval-mode semantics (no dropout)."""

    def __init__(
        self,
        motion_dim: int = 265,
        cond_dim: int = 1103,
        seq_len: int = 80,
        width: int = 512,
        heads: int = 8,
        ff_dim: int = 1024,
        encoder_layers: int = 2,
        decoder_layers: int = 8,
    ) -> None:
        super().__init__()
        self.config = LMDMConfig(motion_dim, cond_dim, seq_len, width, heads, ff_dim, encoder_layers, decoder_layers)
        # True while the weights are deterministic random ones (build()); load() clears it
        self.untrained = False
        # registration order reproduces the checkpoint's key order (lmdm_manifest.json)
        self.null_cond_embed = nn.Parameter(torch.randn(1, seq_len, width))
        self.null_cond_hidden = nn.Parameter(torch.randn(1, width))
        self.rotary = RotaryEmbedding(width)
        self.time_mlp = nn.Sequential(SinusoidalTimeEmbedding(width), nn.Linear(width, 4 * width), nn.Mish())
        self.to_time_cond = nn.Sequential(nn.Linear(4 * width, width))
        self.to_time_tokens = nn.Sequential(nn.Linear(4 * width, 2 * width))
        self.norm_cond = nn.LayerNorm(width)
        self.input_projection = nn.Linear(2 * motion_dim, width)
        self.cond_encoder = nn.ModuleList(
            CondEncoderLayer(width, heads, ff_dim, self.rotary) for _ in range(encoder_layers)
        )
        self.cond_projection = nn.Linear(cond_dim, width)
        self.non_attn_cond_projection = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width)
        )
        self.seqTransDecoder = FiLMDecoderStack(width, heads, ff_dim, decoder_layers, self.rotary)
        self.final_layer = nn.Linear(width, motion_dim)
        self.eval()

    def _check_inputs(self, x_t: Tensor, cond_frame: Tensor, cond: Tensor, t: Tensor) -> None:
        c = self.config
        if x_t.ndim != 3 or tuple(x_t.shape[1:]) != (c.seq_len, c.motion_dim):
            raise ValueError(f"x_t must be [B, {c.seq_len}, {c.motion_dim}], got {list(x_t.shape)}")
        b = x_t.shape[0]
        if tuple(cond_frame.shape) != (b, c.motion_dim):
            raise ValueError(f"cond_frame must be [{b}, {c.motion_dim}], got {list(cond_frame.shape)}")
        if tuple(cond.shape) != (b, c.seq_len, c.cond_dim):
            raise ValueError(f"cond must be [{b}, {c.seq_len}, {c.cond_dim}], got {list(cond.shape)}")
        if tuple(t.shape) != (b,) or t.dtype != torch.long:
            raise ValueError(f"t must be an int64 tensor [{b}], got {t.dtype} {list(t.shape)}")

    def forward(
        self,
        x_t: Tensor,
        cond_frame: Tensor,
        cond: Tensor,
        t: Tensor,
        drop_cond: bool = False,
        drop_mask: Tensor | None = None,
    ) -> Tensor:
        """x_t [B, L, M], cond_frame [B, M], cond [B, L, C], t [B] int64 -> x_0 [B, L, M].

        ``drop_cond`` drops the condition for the whole batch (classifier-free guidance's unconditional branch);
        ``drop_mask [B] bool`` drops it per sample, so cond and uncond can share one batched forward.
        """
        self._check_inputs(x_t, cond_frame, cond, t)
        b, length, _ = x_t.shape
        if drop_mask is not None:
            if drop_cond:
                raise ValueError("give either drop_cond=True or drop_mask, not both")
            if tuple(drop_mask.shape) != (b,) or drop_mask.dtype != torch.bool:
                raise ValueError(
                    f"drop_mask must be a bool tensor [{b}], got {drop_mask.dtype} {list(drop_mask.shape)}"
                )

        h = self.input_projection(torch.cat((x_t, cond_frame[:, None, :].expand(-1, length, -1)), dim=-1))  # [B,L,D]
        null_tokens = self.null_cond_embed.expand(b, -1, -1)  # [B, L, D]
        if drop_cond:
            # the unconditional output never depends on cond, so the (discarded) cond encoder is skipped
            tokens = null_tokens
        else:
            tokens = self.cond_projection(cond)  # [B, L, D]
            for layer in self.cond_encoder:
                tokens = layer(tokens)
            if drop_mask is not None:
                tokens = torch.where(drop_mask[:, None, None], null_tokens, tokens)

        cond_hidden = self.non_attn_cond_projection(tokens.mean(dim=-2))  # [B, D]
        t_hidden = self.time_mlp(t)  # [B, 4D]
        t_tokens = self.to_time_tokens(t_hidden).unflatten(-1, (2, -1))  # [B, 2, D]
        null_hidden = self.null_cond_hidden.expand(b, -1)
        if drop_cond:
            cond_hidden = null_hidden
        elif drop_mask is not None:
            cond_hidden = torch.where(drop_mask[:, None], null_hidden, cond_hidden)
        film = self.to_time_cond(t_hidden) + cond_hidden  # [B, D]

        mem = self.norm_cond(torch.cat((tokens, t_tokens), dim=-2))  # [B, L+2, D]
        # the memory's rotation is the same in every decoder layer: rotate it once
        h = self.seqTransDecoder(h, mem, self.rotary.rotate(mem), film)
        return self.final_layer(h)  # [B, L, M]


def manifest_entries() -> list[tuple[str, tuple[int, ...]]]:
    """Ditto checkpoint keys and shapes (the ``ditto`` preset), in checkpoint order."""
    data = json.loads(MANIFEST_PATH.read_text())
    return [(key, tuple(shape)) for key, shape, _ in data["entries"]]


def state_entries(model: nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def rotary_keys(keys: Sequence[str]) -> list[str]:
    return [k for k in keys if k == "rotary.freqs" or k.endswith(".rotary.freqs")]


def from_config(config: LMDMConfig) -> MotionDecoder:
    return MotionDecoder(**dataclasses.asdict(config))


def build(preset: str = "tiny", cond_dim: int | None = None) -> MotionDecoder:
    """Denoiser with deterministic random weights (the documented golden init). Its output is noise: it warns."""
    model = from_config(preset_config(preset, cond_dim))
    entries = state_entries(model)
    current = model.state_dict()
    keep = {k: current[k] for k in rotary_keys([k for k, _ in entries])}
    model.load_state_dict(deterministic_state_dict(entries, keep=keep), strict=True)
    model.untrained = True
    warn_untrained(logger, f"LMDM motion denoiser (preset {preset!r})")
    return model


# --- the engine's Ditto store (written by ``engine weights import ditto``, engine.importers.ditto) ---------


def read_ditto_record(dst: Path) -> dict[str, Any]:
    record = read_record(Path(dst))
    if record.get("kind") != STORE_KIND:
        raise CheckpointError(f"{dst}: a {record.get('kind')!r} weight store, not a Ditto one (kind {STORE_KIND!r})")
    return record


def read_lmdm_store(dst: Path) -> tuple[LMDMConfig, dict[str, torch.Tensor]]:
    """``(LMDMConfig, state dict)`` of a Ditto store, with keys checked against the config's architecture."""
    record = read_ditto_record(dst)
    try:
        config = from_dict(LMDMConfig, record.get("config", {}))
    except (ConfigError, ValueError) as exc:
        raise CheckpointError(f"{dst}: bad LMDM config in the record ({exc})") from exc
    path = Path(dst) / record.get("files", {}).get("lmdm", "")
    state = load_tensors(path)
    with torch.device("meta"):
        expected = state_entries(from_config(config))
    check_keys(state, expected, str(path))
    return config, state


def hubert_onnx_path(dst: Path) -> Path | None:
    """The streaming HuBERT ONNX copied into the store, if the import found one."""
    name = read_ditto_record(dst).get("files", {}).get("hubert_onnx")
    return Path(dst) / name if name else None


def load(dst: Path | None = None) -> MotionDecoder:
    """Denoiser from an engine weight store written by ``engine weights import ditto`` (default: engine home)."""
    dst = dst if dst is not None else default_ditto_dir()
    config, state = read_lmdm_store(dst)
    model = from_config(config)
    model.load_state_dict(state, strict=True)
    # a store whose weights are random (a test run built on an untrained preset) says so in its record
    model.untrained = bool(read_ditto_record(dst).get("untrained", False))
    return model
