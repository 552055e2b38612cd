"""Audio features -> per-frame motion: diffusion over sliding windows (LMDM), samplers, window scheduler,
displacement heads, controls, smoothing, and the weight-free classic (analytic) motion."""
