"""EAT's Emotional Adaptation Module on the LMDM denoiser, as a plug-in (the base network stays frozen).

The adapter (:class:`engine.motion.heads.EmotionAdapter`) turns the window's emotion condition (the 8 emotion
columns of the condition rows, averaged over the window) into channel-wise ``gamma, beta`` and modulates the
encoded condition tokens: ``tokens <- (1 + gamma) * tokens + beta`` (EAT §3.2, Eq. 4), right after the condition
projection, so both the cross-attention memory and the pooled FiLM conditioning see the emotion. It is attached
with a forward hook: no code of the denoiser changes, and the unconditional branch of classifier-free guidance
(which replaces the tokens by the null embedding) is untouched.

A Ditto store may carry ``adapter.safetensors`` (record ``files.adapter`` and ``adapter`` settings);
:func:`attach_stored_adapter` attaches it when present.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from engine.motion.heads import EmotionAdapter
from engine.motion.lmdm import MotionDecoder
from engine.weights.checkpoint import check_keys, load_tensors, read_record

ADAPTER_FILE = "adapter.safetensors"
EMOTION_DIM = 8


def emotion_slice(cond_dim: int) -> slice:
    """Columns of the emotion condition in LMDM condition rows: after the audio, before the 71 source columns."""
    start = cond_dim - 79
    return slice(start, start + EMOTION_DIM)


def attach_adapter(denoiser: MotionDecoder, adapter: EmotionAdapter) -> RemovableHandle:
    """Hook ``adapter`` onto ``denoiser.cond_projection``; returns the handle (``.remove()`` detaches it)."""
    cols = emotion_slice(int(denoiser.config.cond_dim))

    def hook(module: nn.Module, inputs: tuple[Tensor, ...], tokens: Tensor) -> Tensor:
        if adapter.fc1.weight.device != tokens.device:  # the denoiser moved to its backend's device
            adapter.to(tokens.device)
        emotion = inputs[0][:, :, cols].mean(dim=1)  # [B, 8]
        gamma, beta = adapter(emotion.to(tokens.dtype))
        return (1 + gamma[:, None, :]) * tokens + beta[:, None, :]

    return denoiser.cond_projection.register_forward_hook(hook)


def new_adapter(width: int, mid: int = 64) -> EmotionAdapter:
    """An adapter that starts as the identity (its last layer zero), so training starts from the base model."""
    adapter = EmotionAdapter(EMOTION_DIM, width, mid)
    nn.init.zeros_(adapter.fc2.weight)
    nn.init.zeros_(adapter.fc2.bias)
    return adapter


def attach_stored_adapter(denoiser: MotionDecoder, store: Path) -> RemovableHandle | None:
    """Attach the store's adapter when its record lists one (None when it has none)."""
    record = read_record(Path(store))
    name = record.get("files", {}).get("adapter")
    if not name:
        return None
    settings: dict[str, Any] = dict(record.get("adapter", {}))
    width = int(denoiser.config.width)
    adapter = EmotionAdapter(EMOTION_DIM, width, int(settings.get("mid", 64)))
    state = load_tensors(Path(store) / name)
    check_keys(state, [(k, tuple(v.shape)) for k, v in adapter.state_dict().items()], str(Path(store) / name))
    adapter.load_state_dict(state)
    adapter.eval().requires_grad_(False)
    return attach_adapter(denoiser, adapter)  # the hook holds the adapter: the denoiser's state dict is unchanged
