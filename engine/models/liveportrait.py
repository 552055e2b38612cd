"""The LivePortrait-compatible renderer networks as one object: presets, deterministic build, store loading.

Presets (same classes, different constructor arguments):

* ``liveportrait``: the exact reference (loads official checkpoints). Input 256^2, volume [32, 16, 64, 64],
  warp output [256, 64, 64], image 512^2.
* ``tiny``: a small CPU-friendly variant for tests and benchmarks (never trained; there are no weights for it).
  Input 128^2 -> 3 down blocks -> appearance volume [32, 2, 16, 16] (reshape of a 64-channel 16^2 map) ->
  warp output [32, 16, 16] -> decoder: fc + 1 middle block at 32 ch 16^2, up_0 16 ch at 32^2, up_1 8 ch at
  64^2, conv_img 48 ch, pixel shuffle x4 -> image 256^2 (a x4 shuffle so no stage runs at 128^2).
  Motion extractor ConvNeXt-V2 dims (24, 48, 96, 192), depths (1, 1, 2, 1) (stages 32^2 ... 4^2).
  Dense motion: compress 1 (hourglass input 44 ch), expansion 8, 3 blocks, 3^3 mask / 3x3 occlusion kernels.
  Sized so warp + decode runs at >= 25 fps at batch 1 on 2 CPU threads (benchmarks/bench_renderer.py).

Usage::

    nets = liveportrait.load(weights_dir)            # imported store, eval fp32 CPU, untrained=False
    nets = liveportrait.build("tiny")                # deterministic random weights, untrained=True (warns)
    nets = liveportrait.load_or_build(None, "tiny")  # store in the engine home if imported, else build
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType

import torch
from torch import nn

from engine.keypoints import NUM_KP
from engine.models.appearance import AppearanceFeatureExtractor
from engine.models.motion_extractor import MotionExtractor
from engine.models.retargeting import RetargetingMLP
from engine.models.spade_decoder import SPADEDecoder
from engine.models.warping import WarpingNetwork
from engine.paths import default_weights_dir
from engine.weights import warn_untrained
from engine.weights.checkpoint import RECORD_NAME, CheckpointError, check_keys, load_tensors, read_record
from engine.weights.deterministic import deterministic_state_dict

logger = logging.getLogger(__name__)

NUM_BINS = 66
STORE_KIND = "liveportrait"
NETWORK_NAMES: tuple[str, ...] = ("appearance", "motion", "warping", "decoder", "stitching", "eye", "lip")


@dataclass(frozen=True)
class LivePortraitConfig:
    """Constructor arguments of the seven networks for one preset (defaults: the reference)."""

    name: str
    input_size: int = 256
    # appearance F
    block_expansion: int = 64
    num_down_blocks: int = 2
    max_features: int = 512
    feature_channels: int = 32
    feature_depth: int = 16
    num_resblocks: int = 6
    # motion M
    motion_depths: tuple[int, ...] = (3, 3, 9, 3)
    motion_dims: tuple[int, ...] = (96, 192, 384, 768)
    # warping W
    warp_channels: int = 256
    dense_block_expansion: int = 32
    dense_max_features: int = 1024
    dense_num_blocks: int = 5
    dense_compress: int = 4
    dense_mask_kernel: int = 7
    dense_occlusion_kernel: int = 7
    # decoder G
    decoder_hidden: int = 512
    decoder_middle_blocks: int = 6
    decoder_up_channels: tuple[int, ...] = (256, 64)
    decoder_upscale: int = 2
    spade_hidden: int = 128
    # stitching / retargeting MLP hidden widths
    stitching_hidden: tuple[int, ...] = (128, 128, 64)
    lip_hidden: tuple[int, ...] = (128, 128, 64)
    eye_hidden: tuple[int, ...] = (256, 256, 128, 128, 64)

    def __post_init__(self) -> None:
        motion_stride = 4 * 2 ** (len(self.motion_dims) - 1)
        if self.input_size % motion_stride or self.input_size % 2**self.num_down_blocks:
            raise ValueError(f"preset {self.name}: input_size {self.input_size} must be divisible by {motion_stride}")
        if self.feature_size % 2**self.dense_num_blocks:
            raise ValueError(f"preset {self.name}: volume size {self.feature_size} too small for the hourglass")

    @property
    def feature_size(self) -> int:
        """Spatial side of the appearance volume and of the warp output."""
        return self.input_size // 2**self.num_down_blocks

    @property
    def output_size(self) -> int:
        return self.feature_size * 2 ** len(self.decoder_up_channels) * self.decoder_upscale

    @property
    def volume_shape(self) -> tuple[int, int, int, int]:
        """``(C, D, H, W)`` of the appearance feature volume."""
        return (self.feature_channels, self.feature_depth, self.feature_size, self.feature_size)


PRESETS: Mapping[str, LivePortraitConfig] = MappingProxyType(
    {
        "liveportrait": LivePortraitConfig(name="liveportrait"),
        "tiny": LivePortraitConfig(
            name="tiny",
            input_size=128,
            block_expansion=16,
            num_down_blocks=3,
            max_features=64,
            feature_channels=32,
            feature_depth=2,
            num_resblocks=1,
            motion_depths=(1, 1, 2, 1),
            motion_dims=(24, 48, 96, 192),
            warp_channels=32,
            dense_block_expansion=8,
            dense_max_features=32,
            dense_num_blocks=3,
            dense_compress=1,
            dense_mask_kernel=3,
            dense_occlusion_kernel=3,
            decoder_hidden=32,
            decoder_middle_blocks=1,
            decoder_up_channels=(16, 8),
            decoder_upscale=4,
            spade_hidden=16,
        ),
    }
)


@dataclass
class LivePortraitNets:
    """The seven networks of one preset, eval-mode fp32 on CPU unless moved with :meth:`to`."""

    appearance: AppearanceFeatureExtractor
    motion: MotionExtractor
    warping: WarpingNetwork
    decoder: SPADEDecoder
    stitching: RetargetingMLP
    eye: RetargetingMLP
    lip: RetargetingMLP
    preset: str
    config: LivePortraitConfig
    untrained: bool
    weights_id: str  # identifies the weights (cache key for per-avatar features)

    def networks(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in NETWORK_NAMES}

    def to(self, device: torch.device | str, dtype: torch.dtype = torch.float32) -> LivePortraitNets:
        for module in self.networks().values():
            module.to(device=device, dtype=dtype)
        return self


def get_config(preset: str) -> LivePortraitConfig:
    try:
        return PRESETS[preset]
    except KeyError:
        raise ValueError(f"unknown renderer preset {preset!r}; choose one of {sorted(PRESETS)}") from None


def make_networks(config: LivePortraitConfig) -> dict[str, nn.Module]:
    """Freshly constructed (PyTorch-initialised) networks of ``config``, keyed like :data:`NETWORK_NAMES`."""
    c = config
    return {
        "appearance": AppearanceFeatureExtractor(
            image_channel=3,
            block_expansion=c.block_expansion,
            num_down_blocks=c.num_down_blocks,
            max_features=c.max_features,
            reshape_channel=c.feature_channels,
            reshape_depth=c.feature_depth,
            num_resblocks=c.num_resblocks,
        ),
        "motion": MotionExtractor(
            in_chans=3, depths=c.motion_depths, dims=c.motion_dims, num_kp=NUM_KP, num_bins=NUM_BINS
        ),
        "warping": WarpingNetwork(
            feature_channels=c.feature_channels,
            feature_depth=c.feature_depth,
            out_channels=c.warp_channels,
            num_kp=NUM_KP,
            dense_block_expansion=c.dense_block_expansion,
            dense_max_features=c.dense_max_features,
            dense_num_blocks=c.dense_num_blocks,
            dense_compress=c.dense_compress,
            dense_mask_kernel=c.dense_mask_kernel,
            dense_occlusion_kernel=c.dense_occlusion_kernel,
        ),
        "decoder": SPADEDecoder(
            in_channels=c.warp_channels,
            hidden_channels=c.decoder_hidden,
            num_middle_blocks=c.decoder_middle_blocks,
            up_channels=c.decoder_up_channels,
            upscale=c.decoder_upscale,
            spade_hidden=c.spade_hidden,
        ),
        "stitching": RetargetingMLP(2 * 3 * NUM_KP, c.stitching_hidden, 3 * NUM_KP + 2),
        "eye": RetargetingMLP(3 * NUM_KP + 3, c.eye_hidden, 3 * NUM_KP),
        "lip": RetargetingMLP(3 * NUM_KP + 2, c.lip_hidden, 3 * NUM_KP),
    }


def expected_entries(config: LivePortraitConfig) -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """``{network: [(key, shape), ...]}`` of the engine-side state dicts (spectral norm already folded)."""
    with torch.device("meta"):
        nets = make_networks(config)
    return {name: [(k, tuple(v.shape)) for k, v in m.state_dict().items()] for name, m in nets.items()}


def _assemble(
    config: LivePortraitConfig, states: Mapping[str, Mapping[str, torch.Tensor]], **info: object
) -> LivePortraitNets:
    with torch.device("meta"):  # no throw-away init of ~100M parameters; the weights are assigned below
        nets = make_networks(config)
    for name, module in nets.items():
        state = {k: (v.float() if v.is_floating_point() else v) for k, v in states[name].items()}
        module.load_state_dict(state, strict=True, assign=True)
        module.eval().requires_grad_(False)
    return LivePortraitNets(**nets, preset=config.name, config=config, **info)  # type: ignore[arg-type]


def build(preset: str = "tiny", seed_weights: bool = True) -> LivePortraitNets:
    """Networks of ``preset`` with deterministic random weights (``seed_weights``) or PyTorch's init.

    Untrained weights render noise: the result has ``untrained=True`` and a warning is logged.
    """
    config = get_config(preset)
    warn_untrained(logger, f"renderer networks (preset {preset})")
    if seed_weights:
        states = {name: deterministic_state_dict(entries) for name, entries in expected_entries(config).items()}
    else:
        states = {name: m.state_dict() for name, m in make_networks(config).items()}
    return _assemble(
        config, states, untrained=True, weights_id=f"untrained-{preset}-{'seeded' if seed_weights else 'init'}"
    )


def load(weights_dir: Path) -> LivePortraitNets:
    """Networks from an engine weight store written by ``engine weights import liveportrait`` (strict)."""
    weights_dir = Path(weights_dir)
    record = read_record(weights_dir)
    if record.get("kind") != STORE_KIND:
        raise CheckpointError(f"{weights_dir}: store holds {record.get('kind')!r} weights, not {STORE_KIND!r}")
    config = get_config(str(record.get("preset", "liveportrait")))
    expected = expected_entries(config)
    states = {}
    for name in NETWORK_NAMES:
        path = weights_dir / f"{name}.safetensors"
        state = load_tensors(path)
        check_keys(state, expected[name], str(path))
        states[name] = state
    return _assemble(config, states, untrained=False, weights_id=str(record.get("weights_id", weights_dir.name)))


def load_or_build(weights_dir: Path | None, preset: str = "tiny") -> LivePortraitNets:
    """Imported weights when ``weights_dir`` (default: the engine home's store) holds a store, else :func:`build`."""
    directory = Path(weights_dir) if weights_dir is not None else default_weights_dir()
    if (directory / RECORD_NAME).is_file():
        return load(directory)
    logger.info("no LivePortrait store at %s", directory)
    return build(preset)


def reference_manifest() -> dict[str, list[tuple[str, tuple[int, ...]]]]:
    """Key/shape manifest of the official checkpoint files (shipped with the package)."""
    text = resources.files("engine.models").joinpath("liveportrait_manifest.json").read_text()
    return {net: [(k, tuple(s)) for k, s, *_ in entries] for net, entries in json.loads(text).items()}


def config_dict(config: LivePortraitConfig) -> dict[str, object]:
    return dataclasses.asdict(config)
