"""Learning from video: datasets of per-frame motion, personalization from short clips, dataset-scale training.

* :mod:`engine.train.sources` lists talking-face videos (a folder, a glob, a CSV) and parses MEAD / CREMA-D labels.
* :mod:`engine.train.video` decodes a video at 25 fps with its 16 kHz audio.
* :mod:`engine.train.tracking` tracks the face and its 68-point landmark mesh (weight-free, classic mode's space).
* :mod:`engine.train.extract` turns a clip into per-frame motion (mesh or LivePortrait keypoints) and audio features.
* :mod:`engine.train.shards` / :mod:`engine.train.dataset` write and read resumable safetensors shards.
* :mod:`engine.train.samples` builds the displacement heads' inputs and targets from clip records.
* :mod:`engine.train.personalize` fits an avatar's personal heads (EP-Talk's LADP, IMDP, IEDP) on a CPU.
* :mod:`engine.train.config`, :mod:`engine.train.trainer`, :mod:`engine.train.tasks`: dataset-scale training of
  the heads, an EAT-style emotion adapter and the motion diffusion, on one or many processes (``torchrun``).

Nothing here imports :mod:`streaming`; the lip-sync part of evaluation lives in ``streaming.measure.eval``.
"""
