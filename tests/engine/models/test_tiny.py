"""Tiny preset end to end (shapes, determinism, the neural renderer) and the warping reference ops."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.avatar.record import Avatar
from engine.models import liveportrait, warping_ops
from engine.models.spade_decoder import fold_spectral_norm
from streaming.testing import eager_renderer


@pytest.fixture(scope="module")
def tiny() -> liveportrait.LivePortraitNets:
    return liveportrait.build("tiny")


def _avatar(seed: int, name: str = "a") -> Avatar:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:512, 0:512] / 511.0
    base = np.stack([xx, yy, 0.5 * (xx + yy)], -1) * 200 + rng.uniform(0, 55, (1, 1, 3))
    crop = np.clip(base + rng.normal(0, 3, base.shape), 0, 255).astype(np.uint8)
    return Avatar(
        name=name,
        content_hash=f"{seed:064x}",
        image=crop.copy(),
        crop=crop,
        crop_to_image=np.array([[1.0, 0, 0], [0, 1.0, 0]]),
    )


def test_tiny_shapes(tiny: liveportrait.LivePortraitNets) -> None:
    cfg = tiny.config
    assert tiny.preset == "tiny" and tiny.untrained
    x = torch.rand(2, 3, cfg.input_size, cfg.input_size)
    with torch.inference_mode():
        feature = tiny.appearance(x)
        motion = tiny.motion(x)
        kp = torch.rand(2, 21, 3) * 0.8 - 0.4
        warped = tiny.warping(feature, kp + 0.01, kp)
        image = tiny.decoder(warped.out)
    c, d, h, w = cfg.volume_shape
    assert feature.shape == (2, c, d, h, w)
    assert motion._fields == ("pitch", "yaw", "roll", "t", "exp", "scale", "kp")
    assert [tuple(v.shape) for v in motion] == [(2, 66)] * 3 + [(2, 3), (2, 63), (2, 1), (2, 63)]
    assert warped.out.shape == (2, cfg.warp_channels, h, w)
    assert warped.occlusion.shape == (2, 1, h, w) and warped.deformation.shape == (2, d, h, w, 3)
    assert image.shape == (2, 3, cfg.output_size, cfg.output_size)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert tiny.stitching(torch.zeros(1, 126)).shape == (1, 65)
    assert tiny.eye(torch.zeros(1, 66)).shape == (1, 63) and tiny.lip(torch.zeros(1, 65)).shape == (1, 63)


def test_build_is_deterministic_and_warns(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        a, b = liveportrait.build("tiny"), liveportrait.build("tiny")
    assert "UNTRAINED" in caplog.text
    for name, module in a.networks().items():
        other = b.networks()[name].state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(value, other[key]), f"{name}.{key}"
    with pytest.raises(ValueError, match="unknown renderer preset"):
        liveportrait.build("huge")


def test_load_or_build_falls_back_to_untrained(tmp_path: Path) -> None:
    nets = liveportrait.load_or_build(tmp_path / "nothing-here", "tiny")
    assert nets.untrained and nets.preset == "tiny"


def test_renderer_portrait_to_frame(tiny: liveportrait.LivePortraitNets) -> None:
    renderer = eager_renderer(tiny)
    assert renderer.untrained and renderer.size == 256
    a, b = _avatar(0, "a"), _avatar(1, "b")
    pa, pb = renderer.prepare(a), renderer.prepare(b)
    assert pa.source.kp_canonical.shape == (21, 3) and pa.source.kp_source.shape == (21, 3)
    kp_a = renderer.drive(pa, pa.source.params)
    assert kp_a.shape == (1, 21, 3)
    frames = renderer.render([pa, pb], torch.cat([kp_a, renderer.drive(pb, pb.source.params)]))
    assert frames.shape == (2, 3, 256, 256)
    # batching over avatars must not mix them, and everything is deterministic
    single = renderer.render([renderer.prepare(a)], kp_a)
    assert torch.allclose(frames[:1], single, atol=1e-5)
    assert not torch.allclose(frames[0], frames[1], atol=1e-3)
    with pytest.raises(ValueError, match="driving keypoint"):
        renderer.render([pa, pb], kp_a)


def test_drive_applies_stitching(tiny: liveportrait.LivePortraitNets) -> None:
    avatar = _avatar(2)
    with_stitch, without = eager_renderer(tiny), eager_renderer(tiny, use_stitching=False)
    prepared = with_stitch.prepare(avatar)
    plain = without.drive(prepared, prepared.source.params)
    assert torch.allclose(plain, prepared.source.kp_source[None], atol=1e-5)
    stitched = with_stitch.drive(prepared, prepared.source.params)
    x_s = prepared.source.kp_source[None]
    delta = tiny.stitching(torch.cat([x_s.reshape(1, -1), plain.reshape(1, -1)], 1))
    assert torch.allclose(stitched[0, :, 2], plain[0, :, 2] + delta[0, 2:63:3], atol=1e-5)


def test_renderer_uses_feature_cache(tiny: liveportrait.LivePortraitNets) -> None:
    renderer = eager_renderer(tiny)
    avatar = _avatar(3)
    features = renderer.compute_features(avatar)
    assert features["feature_3d"].shape == tiny.config.volume_shape
    features = {**features, "feature_3d": np.zeros_like(features["feature_3d"])}
    cached = Avatar(**{**avatar.__dict__, "features": {tiny.weights_id: features}})
    assert float(renderer.prepare(cached).state.abs().max()) == 0.0
    # features made by other weights are ignored
    stale = Avatar(**{**avatar.__dict__, "features": {"other-weights": features}})
    assert float(renderer.prepare(stale).state.abs().max()) > 0.0


def test_identity_motion_gives_the_grid_and_zero_heatmaps() -> None:
    kp = torch.rand(2, 21, 3, dtype=torch.float64) * 0.8 - 0.4
    logits = torch.randn(2, 22, 3, 5, 6, dtype=torch.float64)
    grid = warping_ops.coordinate_grid(3, 5, 6, torch.float64, "cpu")
    assert torch.allclose(grid[0, 0, 0], torch.tensor([-1.0, -1.0, -1.0], dtype=torch.float64))
    assert torch.allclose(grid[2, 4, 5], torch.ones(3, dtype=torch.float64))
    assert float(grid[1, 2, 3, 0]) == pytest.approx(2 * 3 / 5 - 1)  # x indexes W
    deformation = warping_ops.deformation_from_mask(logits, kp, kp)
    assert torch.allclose(deformation, grid.expand(2, 3, 5, 6, 3))
    inp = warping_ops.sparse_motion_input(torch.rand(2, 4, 3, 5, 6, dtype=torch.float64), kp, kp)
    assert inp.shape == (2, 22 * 5, 3, 5, 6)
    assert float(inp[:, ::5].abs().max()) == 0.0  # heatmap channels first per motion, all zero here


def test_heatmap_channel_layout() -> None:
    kp_s = torch.zeros(1, 21, 3)
    kp_d = kp_s.clone()
    kp_d[0, 4] = torch.tensor([0.5, 0.0, 0.0])
    inp = warping_ops.sparse_motion_input(torch.rand(1, 2, 3, 5, 5), kp_d, kp_s)
    heat = inp[0, ::3]  # [22, D, H, W]
    assert float(heat[0].abs().max()) == 0.0
    moved = [m for m in range(22) if float(heat[m].abs().max()) > 0]
    assert moved == [5]  # keypoint 4 is motion 5 (motion 0 is the background)


def test_spectral_fold_matches_torch_eval() -> None:
    torch.manual_seed(0)
    conv = torch.nn.utils.spectral_norm(torch.nn.Conv2d(6, 5, 3, padding=1))
    x = torch.randn(2, 6, 7, 7)
    for _ in range(3):
        conv(x)  # a few power iterations so u, v are not the initial ones
    conv.eval()
    with torch.no_grad():
        expected = conv(x)
        folded = fold_spectral_norm(conv.state_dict())
        plain = torch.nn.Conv2d(6, 5, 3, padding=1)
        plain.load_state_dict(folded)
        assert torch.allclose(plain(x), expected, atol=1e-5)
