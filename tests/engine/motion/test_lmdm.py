"""LMDM denoiser: architecture/keys, presets, input checks, condition dropout, batched guidance."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from engine.motion import lmdm
from engine.motion.samplers import guided_denoise

GOLDEN_MANIFEST = Path(__file__).resolve().parents[2] / "data" / "golden" / "lmdm_manifest.json"


@pytest.fixture(scope="module")
def tiny() -> lmdm.MotionDecoder:
    return lmdm.build("tiny")


def _inputs(model: lmdm.MotionDecoder, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, ...]:
    c = model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, c.seq_len, c.motion_dim, generator=g)
    cond_frame = torch.randn(b, c.motion_dim, generator=g)
    cond = torch.randn(b, c.seq_len, c.cond_dim, generator=g)
    t = torch.randint(0, 1000, (b,), generator=g)
    return x, cond_frame, cond, t


def test_ditto_state_dict_matches_checkpoint_manifest() -> None:
    with torch.device("meta"):
        model = lmdm.from_config(lmdm.preset_config("ditto"))
    golden = json.loads(GOLDEN_MANIFEST.read_text())
    assert lmdm.state_entries(model) == [(k, tuple(s)) for k, s, _ in golden["entries"]]
    # the packaged copy (used by the importer without tests/) is the golden manifest
    assert json.loads(lmdm.MANIFEST_PATH.read_text()) == golden
    assert len(lmdm.rotary_keys([k for k, _ in lmdm.state_entries(model)])) == 11


def test_rotary_freqs_are_shared_constructor_values(tiny: lmdm.MotionDecoder) -> None:
    width = tiny.config.width
    expected = torch.tensor([1 / 10000 ** (2 * i / width) for i in range(width // 2)], dtype=torch.float32)
    sd = tiny.state_dict()
    keys = lmdm.rotary_keys(list(sd))
    assert len(keys) == 1 + tiny.config.encoder_layers + tiny.config.decoder_layers
    for key in keys:
        torch.testing.assert_close(sd[key], expected, rtol=1e-6, atol=0)
    # one buffer under every name: loading changes all owners at once
    assert all(layer.rotary is tiny.rotary for layer in tiny.seqTransDecoder.stack)


def test_rotary_rotates_adjacent_pairs() -> None:
    rot = lmdm.RotaryEmbedding(8)
    v = torch.randn(1, 3, 8)
    out = rot.rotate(v)
    p, i = 2, 1
    theta = p * rot.freqs[i]
    a, b = v[0, p, 2 * i], v[0, p, 2 * i + 1]
    torch.testing.assert_close(out[0, p, 2 * i], a * torch.cos(theta) - b * torch.sin(theta))
    torch.testing.assert_close(out[0, p, 2 * i + 1], b * torch.cos(theta) + a * torch.sin(theta))
    torch.testing.assert_close(out[0, 0], v[0, 0])  # position 0 is not rotated


def test_time_embedding_sines_then_cosines() -> None:
    emb = lmdm.SinusoidalTimeEmbedding(8)(torch.tensor([3]))
    phi = [math.exp(-j * math.log(10000) / 3) for j in range(4)]
    expected = [math.sin(3 * f) for f in phi] + [math.cos(3 * f) for f in phi]
    torch.testing.assert_close(emb[0], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_presets_and_logmel_cond_dim() -> None:
    assert lmdm.preset_config("ditto") == lmdm.LMDMConfig()
    assert lmdm.preset_config("logmel").cond_dim == 80 + 8 + 2 + 6 + 63
    assert lmdm.logmel_cond_dim(128) == 128 + 79
    assert lmdm.preset_config("tiny", cond_dim=159).cond_dim == 159
    with pytest.raises(ValueError, match="unknown LMDM preset 'huge'"):
        lmdm.preset_config("huge")
    with pytest.raises(ValueError, match="divisible by heads"):
        lmdm.LMDMConfig(width=66, heads=4)


def test_build_is_deterministic_and_flagged_untrained(caplog: pytest.LogCaptureFixture) -> None:
    a = lmdm.build("tiny", cond_dim=159)
    b = lmdm.build("tiny", cond_dim=159)
    assert a.untrained and a.config.cond_dim == 159
    assert "UNTRAINED" in caplog.text
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x, cf, c, t = _inputs(a)
    with torch.no_grad():
        out = a(x, cf, c, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_input_shapes_are_checked(tiny: lmdm.MotionDecoder) -> None:
    x, cf, c, t = _inputs(tiny)
    with pytest.raises(ValueError, match=r"x_t must be \[B, 80, 265\]"):
        tiny(x[:, :40], cf, c, t)
    with pytest.raises(ValueError, match="cond must be"):
        tiny(x, cf, c[..., :100], t)
    with pytest.raises(ValueError, match="int64"):
        tiny(x, cf, c, t.float())
    with pytest.raises(ValueError, match="drop_mask must be a bool"):
        tiny(x, cf, c, t, drop_mask=torch.zeros(2))
    with pytest.raises(ValueError, match="not both"):
        tiny(x, cf, c, t, drop_cond=True, drop_mask=torch.zeros(2, dtype=torch.bool))


def test_uncond_ignores_cond_and_cond_uses_it(tiny: lmdm.MotionDecoder) -> None:
    x, cf, c, t = _inputs(tiny)
    with torch.no_grad():
        u1 = tiny(x, cf, c, t, drop_cond=True)
        u2 = tiny(x, cf, torch.randn_like(c), t, drop_cond=True)
        c1 = tiny(x, cf, c, t)
        c2 = tiny(x, cf, torch.randn_like(c), t)
        u_other_t = tiny(x, cf, c, (t + 100) % 1000, drop_cond=True)
    torch.testing.assert_close(u1, u2, rtol=0, atol=0)
    assert (c1 - c2).abs().max() > 1e-3
    assert (u1 - u_other_t).abs().max() > 1e-3


def test_drop_mask_selects_per_sample(tiny: lmdm.MotionDecoder) -> None:
    x, cf, c, t = _inputs(tiny)
    with torch.no_grad():
        mixed = tiny(x, cf, c, t, drop_mask=torch.tensor([False, True]))
        cond = tiny(x, cf, c, t)
        uncond = tiny(x, cf, c, t, drop_cond=True)
    torch.testing.assert_close(mixed[0], cond[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mixed[1], uncond[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weight", [2.0, 0.5])
def test_batched_guidance_equals_two_forwards(tiny: lmdm.MotionDecoder, weight: float) -> None:
    x, cf, c, t = _inputs(tiny, seed=3)
    calls: list[int] = []

    def counting(
        x_t: torch.Tensor,
        cond_frame: torch.Tensor,
        cond: torch.Tensor,
        t: torch.Tensor,
        drop_cond: bool = False,
        drop_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        calls.append(x_t.shape[0])
        return tiny(x_t, cond_frame, cond, t, drop_cond=drop_cond, drop_mask=drop_mask)

    with torch.no_grad():
        guided = guided_denoise(counting, x, cf, c, t, weight)
        u = tiny(x, cf, c, t, drop_cond=True)
        cc = tiny(x, cf, c, t, drop_cond=False)
    assert calls == [4]  # one forward over the doubled batch
    torch.testing.assert_close(guided, u + (cc - u) * weight, rtol=1e-5, atol=1e-5)
