"""SPADE decoder G: warped feature -> RGB image (docs/spec/liveportrait.md §4).

Reference shapes: feature [B, 256, 64, 64] -> fc [B, 512, 64, 64] -> 6 middle blocks -> up_0 at 128^2 ->
up_1 at 256^2 -> conv_img [B, 12, 256, 256] -> pixel shuffle + sigmoid [B, 3, 512, 512].

The official checkpoint stores conv_0/conv_1/conv_s as spectral-norm triplets (weight_orig, weight_u,
weight_v). The modules here hold plain ``weight``; :func:`fold_spectral_norm` turns a checkpoint into that form
once (W_eff = weight_orig / (u . (W v)), the eval-mode effective weight, no power iteration).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SPECTRAL_SUFFIXES = ("weight_orig", "weight_u", "weight_v")


def fold_spectral_norm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Replace every ``P.weight_orig/weight_u/weight_v`` triplet by ``P.weight`` (other keys unchanged)."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.endswith("weight_u") or key.endswith("weight_v"):
            continue
        if not key.endswith("weight_orig"):
            out[key] = value
            continue
        base = key[: -len("weight_orig")]
        try:
            u, v = state[base + "weight_u"], state[base + "weight_v"]
        except KeyError as exc:
            raise KeyError(f"spectral-norm weight {key} has no matching {exc.args[0]}") from exc
        w_mat = value.double().reshape(value.shape[0], -1)  # [out, in * kh * kw]
        sigma = torch.dot(u.double(), w_mat @ v.double())
        out[base + "weight"] = (value.double() / sigma).to(value.dtype)
    return out


class SPADE(nn.Module):
    """Instance norm (no affine) modulated by gamma/beta predicted from the nearest-resized segmap."""

    def __init__(self, norm_channels: int, label_channels: int, hidden: int = 128):
        super().__init__()
        self.mlp_shared = nn.Sequential(nn.Conv2d(label_channels, hidden, 3, padding=1), nn.ReLU())
        self.mlp_gamma = nn.Conv2d(hidden, norm_channels, 3, padding=1)
        self.mlp_beta = nn.Conv2d(hidden, norm_channels, 3, padding=1)

    def forward(self, x: Tensor, segmap: Tensor) -> Tensor:  # x [B, C, H, W], segmap [B, L, h, w] -> [B, C, H, W]
        normalized = F.instance_norm(x, eps=1e-5)
        seg = F.interpolate(segmap, size=x.shape[2:], mode="nearest")
        actv = self.mlp_shared(seg)
        return normalized * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResnetBlock(nn.Module):
    def __init__(self, fin: int, fout: int, label_channels: int, hidden: int = 128):
        super().__init__()
        fmiddle = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.conv_0 = nn.Conv2d(fin, fmiddle, 3, padding=1)
        self.conv_1 = nn.Conv2d(fmiddle, fout, 3, padding=1)
        self.norm_0 = SPADE(fin, label_channels, hidden)
        self.norm_1 = SPADE(fmiddle, label_channels, hidden)
        if self.learned_shortcut:
            self.conv_s = nn.Conv2d(fin, fout, 1, bias=False)
            self.norm_s = SPADE(fin, label_channels, hidden)

    def forward(self, x: Tensor, seg: Tensor) -> Tensor:  # [B, fin, H, W] -> [B, fout, H, W]
        x_s = self.conv_s(self.norm_s(x, seg)) if self.learned_shortcut else x
        dx = self.conv_0(F.leaky_relu(self.norm_0(x, seg), 0.2))
        dx = self.conv_1(F.leaky_relu(self.norm_1(dx, seg), 0.2))
        return x_s + dx


class SPADEDecoder(nn.Module):
    def __init__(
        self,
        in_channels: int = 256,
        hidden_channels: int = 512,
        num_middle_blocks: int = 6,
        up_channels: Sequence[int] = (256, 64),
        upscale: int = 2,
        spade_hidden: int = 128,
    ):
        super().__init__()
        self.fc = nn.Conv2d(in_channels, hidden_channels, 3, padding=1)
        for i in range(num_middle_blocks):
            self.add_module(
                f"G_middle_{i}", SPADEResnetBlock(hidden_channels, hidden_channels, in_channels, spade_hidden)
            )
        fin = hidden_channels
        for i, fout in enumerate(up_channels):
            self.add_module(f"up_{i}", SPADEResnetBlock(fin, fout, in_channels, spade_hidden))
            fin = fout
        self.num_middle_blocks = num_middle_blocks
        self.num_up_blocks = len(up_channels)
        self.conv_img = nn.Sequential(nn.Conv2d(fin, 3 * upscale * upscale, 3, padding=1), nn.PixelShuffle(upscale))

    def forward(self, feature: Tensor) -> Tensor:  # [B, 256, 64, 64] -> [B, 3, 512, 512] in (0, 1)
        seg = feature  # SPADE always conditions on the decoder input at its own resolution
        x = self.fc(feature)  # [B, 512, 64, 64]
        for i in range(self.num_middle_blocks):
            x = getattr(self, f"G_middle_{i}")(x, seg)  # [B, 512, 64, 64]
        for i in range(self.num_up_blocks):
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
            x = getattr(self, f"up_{i}")(x, seg)  # [B, 256, 128, 128] then [B, 64, 256, 256]
        x = self.conv_img(F.leaky_relu(x, 0.2))  # [B, 3, 512, 512]
        return torch.sigmoid(x)
