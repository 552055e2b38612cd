"""Real-time streaming avatar engine.

Data flows audio -> motion -> keypoints -> warp -> decode -> track:

- ``engine.audio``     PCM ingest, resampling, streaming log-mel / HuBERT features
- ``engine.motion``    motion diffusion (LMDM), samplers, window scheduler, displacement heads, controls, classic motion
- ``engine.keypoints`` LivePortrait keypoint math (pose bins, rotation, transform, stitching/retargeting calls)
- ``engine.models``    the renderer networks (appearance F, motion M, warping W, decoder G, stitching/eye/lip)
- ``engine.render``    renderers behind one interface (neural warp+decode, classic warp-only), paste-back
- ``engine.avatar``    avatar preparation and the on-disk avatar store
- ``engine.weights``   safe checkpoint import and the engine's weight store
- ``streaming``        session pipeline, clock, batching, WebRTC/websocket serving (top-level package)
"""

__version__ = "0.1.0"
