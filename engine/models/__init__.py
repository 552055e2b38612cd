"""The renderer networks (LivePortrait-compatible): appearance F, motion M, warping W, decoder G and the
stitching / eye / lip MLPs, one network per module; :mod:`engine.models.liveportrait` assembles them per preset.
The hot dense-motion / warp pieces are plain functions in :mod:`engine.models.warping_ops`."""
