"""Audio front end: PCM validation and 16 kHz resampling, streaming log-mel / loudness / HuBERT features."""

from engine.audio.features import (
    ConcatFeatures,
    LogMelConfig,
    LogMelFeatures,
    LoudnessFeatures,
    frame_loudness_db,
    log_mel_offline,
    mel_filterbank,
)
from engine.audio.hubert import HubertStreaming, hubert_offline
from engine.audio.pcm import StreamingResampler, to_mono_16k

__all__ = [
    "ConcatFeatures",
    "HubertStreaming",
    "LogMelConfig",
    "LogMelFeatures",
    "LoudnessFeatures",
    "StreamingResampler",
    "frame_loudness_db",
    "hubert_offline",
    "log_mel_offline",
    "mel_filterbank",
    "to_mono_16k",
]
