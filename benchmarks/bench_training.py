"""Learning from video, end to end on this CPU, with the numbers: planted clips -> dataset -> personalize -> train
-> eval. Writes ``benchmarks/results/training_cpu.json`` (device, commit, load) and the run folders' loss curves.

    python benchmarks/bench_training.py [--work DIR] [--clips-per-avatar 6] [--heads-steps 1500]

1. Two real photos (``skimage.data.astronaut()``, matplotlib's ``grace_hopper.jpg``) speak espeak-ng phrases in
   classic mode with a planted style each: the astronaut with lips 1.6x and head sway 2.5x, Grace Hopper with
   lips 1.0x and sway 1.0x; some clips carry a classic emotion (happy, sad, surprised) from the first frame.
2. ``engine dataset build`` on them (1 and 2 worker processes): seconds per clip, frames per second.
3. ``engine personalize`` of each avatar from its clips: time, held-out errors, the learned lip amplitude against
   the default classic generator (planted 1.6 and 1.0), head-motion statistics against the clips', and the
   emotions learned (IEDP) classifying the person's held-out emotional clips.
4. ``engine train heads`` on the dataset with 1 process and with 2 (gloo, ``torchrun``): steps per second; then
   ``engine eval``.
5. ``engine train motion`` steps per second for the ``tiny`` and the full-size ``logmel`` LMDM on synthetic keypoint
   windows (the values are meaningless without LivePortrait weights to extract real keypoints; the speed is not).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from click.testing import CliRunner
from PIL import Image

from engine.avatar.prepare import prepare_avatar
from engine.avatar.record import Avatar
from engine.avatar.store import AvatarStore
from engine.motion.personal_model import PersonalModel
from engine.train.config import load_config
from engine.train.shards import Dataset, ShardWriter
from engine.train.tasks import DiffusionTask
from engine.train.trainer import train
from streaming.cli import main as cli
from streaming.measure.info import environment, write_result
from streaming.measure.planted import (
    PHRASES,
    PlantedStyle,
    espeak_available,
    head_style,
    lip_amplitude,
    render_clip,
    speech,
)

RESULTS = Path(__file__).parent / "results" / "training_cpu.json"
EMOTIONS = ("neutral", "neutral", "neutral", "happy", "sad", "surprised")


def _photos(work: Path) -> dict[str, Path]:
    from matplotlib import cbook
    from skimage import data

    out = {"astro": work / "astronaut.png", "grace": work / "grace.png"}
    Image.fromarray(np.asarray(data.astronaut(), np.uint8)).save(out["astro"])
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as img:
        img.convert("RGB").save(out["grace"])
    return out


def _run(args: list[str]) -> tuple[Any, float]:
    start = time.perf_counter()
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    if result.exit_code != 0:
        raise SystemExit(f"engine {' '.join(args)} failed:\n{result.output}")
    return result, time.perf_counter() - start


def render(work: Path, avatars: dict[str, Avatar], per_avatar: int) -> tuple[dict[str, list[Path]], dict[str, Any]]:
    styles = {"astro": (1.6, 2.5), "grace": (1.0, 1.0)}
    clips: dict[str, list[Path]] = {name: [] for name in avatars}
    start = time.perf_counter()
    frames = 0
    for name, avatar in avatars.items():
        lip, head = styles[name]
        for i in range(per_avatar):
            emotion = EMOTIONS[i % len(EMOTIONS)]
            folder = work / "videos" / name / "video" / "front" / emotion / "level_3"
            folder.mkdir(parents=True, exist_ok=True)
            audio = speech(PHRASES[i % len(PHRASES)])
            style = PlantedStyle(lip_scale=lip, head_motion=head, seed=i, emotion=emotion)
            path = folder / f"{i:03d}.mp4"
            if not path.is_file():  # a --work folder of an earlier run keeps its clips
                render_clip(path, avatar, audio, style, size=256)
            clips[name].append(path)
            frames += len(audio) // 640
    return clips, {"clips": sum(map(len, clips.values())), "frames": frames, "seconds": time.perf_counter() - start}


def personalize(name: str, avatar: Avatar, clips: list[Path], steps: int) -> dict[str, Any]:
    train_clips = [c for c in clips if c.parent.parent.name == "neutral"] + [
        c for c in clips if c.parent.parent.name != "neutral"
    ][:2]
    _, seconds = _run(["personalize", *map(str, train_clips), "--avatar", name, "--steps", str(steps),
                            "--no-progress", "--report", str(clips[0].parent / f"{name}-report.json")])  # fmt: skip
    report = json.loads((clips[0].parent / f"{name}-report.json").read_text())["mesh"]
    model = PersonalModel.load(AvatarStore().personal_dir(name, "mesh"))
    track = model.reference_pose
    clips_std = [float(track[:, 2].std()), float(track[:, 3].std()), float(track[:, 4].std())]
    ours = head_style(model, avatar, len(track)).tolist()
    return {
        "clips": len(train_clips),
        "seconds_of_video": report["seconds"],
        "personalize_s": round(seconds, 2),
        "fit_s": report["fit_s"],
        "val": report["val"],
        "val_no_motion": report["val_zero"],
        "emotions_learned": report["emotions"],
        "lip_amplitude_vs_default_classic": round(lip_amplitude(model, avatar, speech(PHRASES[5])), 3),
        "head_std_generated_roll_tx_ty": [round(v, 4) for v in ours],
        "head_std_clips_roll_tx_ty": [round(v, 4) for v in clips_std],
    }


def keypoint_dataset(root: Path, clips: int = 4, frames: int = 200) -> None:
    """Random-walk keypoint clips (Ditto's 265-d layout) for timing the diffusion tasks."""
    rng = np.random.default_rng(0)
    writer = ShardWriter(root, {"timing": True, "spaces": ["keypoints"]})
    for i in range(clips):
        motion = np.cumsum(rng.normal(0, 0.01, (frames, 265)), axis=0).astype(np.float32)
        arrays = {
            "audio": rng.normal(-8, 2, (frames, 81)).astype(np.float32),
            "valid": np.ones(frames, np.uint8),
            "keypoints/motion": motion,
            "keypoints/geometry": rng.normal(0, 0.3, (21, 3)).astype(np.float32),
        }
        writer.add({"id": f"k{i}", "frames": frames, "split": "train", "spaces": ["keypoints"]}, arrays)
    writer.close()


def motion_speed(work: Path, steps: int) -> list[dict[str, Any]]:
    ds = work / "kp-ds"
    if not ds.exists():
        keypoint_dataset(ds)
    out = []
    for preset, batch in (("tiny", 16), ("logmel", 4)):
        for threads in (1, 2):  # on a shared machine two threads can be far slower than one (they spin)
            config = load_config(None, task="motion", steps=steps, batch=batch, val_every=steps, val_batches=1,
                                 checkpoint_every=10_000, threads=threads, **{"diffusion.preset": preset})  # fmt: skip
            task = DiffusionTask(Dataset(ds), config, "motion")
            result = train(task, config, work / f"motion-{preset}-{threads}", resume=False)
            speed = {"steps_per_s": result.steps_per_s, "windows_per_s": round(result.steps_per_s * batch, 2)}
            out.append({"preset": preset, "batch": batch, "threads": threads, "steps": steps, **speed})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=None, help="Working folder (default: a temporary one).")
    parser.add_argument("--clips-per-avatar", type=int, default=6)
    parser.add_argument("--personal-steps", type=int, default=800)
    parser.add_argument("--heads-steps", type=int, default=1500)
    parser.add_argument("--motion-steps", type=int, default=20)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    env = environment()
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-training-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("AVATAR_ENGINE_HOME", str(work / "home"))
    photos = _photos(work)
    avatars = {name: AvatarStore().add(prepare_avatar(path, name)) for name, path in photos.items()}
    record: dict[str, Any] = {"environment": env, "espeak_ng": espeak_available(), "work": str(work)}

    clips, record["render"] = render(work, avatars, args.clips_per_avatar)
    print("rendered", record["render"], flush=True)
    for workers in (1, 2):
        out = work / f"ds-w{workers}"
        shutil.rmtree(out, ignore_errors=True)
        _, seconds = _run(["dataset", "build", str(work / "videos"), "--out", str(out), "--workers", str(workers),
                           "--val-fraction", "0.0", "--no-progress"])  # fmt: skip
        ds = Dataset(out)
        frames = sum(c.frames for c in ds.clips)
        record[f"dataset_build_workers_{workers}"] = {
            "clips": len(ds), "frames": frames, "seconds": round(seconds, 2),
            "frames_per_s": round(frames / seconds, 1), "seconds_per_clip": round(seconds / max(len(ds), 1), 2),
        }  # fmt: skip
        print(f"dataset build, {workers} worker(s)", record[f"dataset_build_workers_{workers}"], flush=True)

    record["personalize"] = {}
    for name, avatar in avatars.items():
        record["personalize"][name] = personalize(name, avatar, clips[name], args.personal_steps)
        print("personalize", name, record["personalize"][name], flush=True)

    ds = work / "ds-w1"
    common = ["--steps", str(args.heads_steps), "--batch", "256", "--no-progress", "--device", "cpu", "--threads", "1",
              "--no-resume"]  # fmt: skip
    _, seconds = _run(["train", "heads", str(ds), "--out", str(work / "heads-1"), *common])
    one = json.loads((work / "heads-1" / "summary.json").read_text())
    record["train_heads_1_process"] = {**one, "wall_s": round(seconds, 2)}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
                    "streaming.cli", "train", "heads", str(ds), "--out", str(work / "heads-2"), *common], check=True,
                   capture_output=True)  # fmt: skip
    two = json.loads((work / "heads-2" / "summary.json").read_text())
    record["train_heads_2_processes_gloo"] = {**two, "wall_s": round(time.perf_counter() - start, 2)}
    _run(["eval", str(work / "heads-1"), str(ds), "--split", "train"])
    record["eval_heads"] = {
        k: v for k, v in json.loads((work / "heads-1" / "eval" / "metrics.json").read_text()).items() if k != "per_clip"
    }
    print("train heads", record["train_heads_1_process"], record["train_heads_2_processes_gloo"], flush=True)
    print("eval", record["eval_heads"], flush=True)
    record["train_motion"] = motion_speed(work, args.motion_steps)
    print("train motion", record["train_motion"], flush=True)
    write_result(args.out, record)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
