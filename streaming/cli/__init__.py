"""The ``engine`` command. Each subcommand lives in its own module and is imported only when used, so
``engine --help`` stays fast and a missing optional dependency only affects the command that needs it."""

from __future__ import annotations

import importlib
import logging
import os

import click

# name -> (module, attribute, one-line help shown by ``engine --help``)
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "weights": ("streaming.cli.weights", "weights", "Import and inspect checkpoints (LivePortrait, Ditto)."),
    "avatar": ("streaming.cli.avatar", "avatar", "Prepare, list and remove avatars."),
    "emotion": ("streaming.cli.emotion", "emotion", "Emotions from example photos or clips (add, list, remove)."),
    "render": ("streaming.cli.render", "render", "Render a talking video from an audio file (offline)."),
    "serve": (
        "streaming.cli.serve",
        "serve",
        "Serve live sessions over WebRTC (browser page, WHIP, websocket).",
    ),
    "client": ("streaming.cli.client", "client", "Python client: stream a microphone or WAV to a server."),
    "export": ("streaming.cli.export", "export", "Export models to ONNX / TensorRT."),
    "bench": ("streaming.cli.bench", "bench", "Benchmarks (renderer, backends, lip sync) written as JSON."),
    "dataset": ("streaming.cli.dataset", "dataset", "Build training datasets of per-frame motion from videos."),
    "personalize": (
        "streaming.cli.personalize",
        "personalize",
        "Learn a person's lips, head motion and emotions from their clips.",
    ),
    "train": ("streaming.cli.train", "train", "Train the heads, an emotion adapter or the motion diffusion."),
    "eval": ("streaming.cli.eval", "eval_command", "Evaluate a trained run on a dataset's held-out clips."),
}

# Environment defaults of a command, set before its module (and so torch) is imported; a value already set wins.
# serve: PyTorch's OpenMP threads spin between operations by default, holding the cores that the other sessions'
# rendering, VP8 encoding and audio need. Sleeping instead, two silent classic sessions on two cores rendered about
# 48 % more fresh pictures each (frames in 10 s: 83 -> 122); the speech soak, whose clients decode on the same cores,
# stayed at ~9 a second. Alone a frame takes ~2.5 ms more and a third less CPU (benchmarks/bench_classic.py: 18.0 ->
# 20.6 ms median, 37.4 -> 25.4 ms CPU). The OpenMP runtime reads the variable once, when torch loads it.
_ENVIRONMENT: dict[str, dict[str, str]] = {"serve": {"OMP_WAIT_POLICY": "PASSIVE"}}


class LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(_COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in _COMMANDS:
            return None
        module_name, attr, _ = _COMMANDS[cmd_name]
        for key, value in _ENVIRONMENT.get(cmd_name, {}).items():
            os.environ.setdefault(key, value)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            # a command whose optional dependency is absent still shows up, with the reason
            missing = exc.name

            @click.command(cmd_name, help=_COMMANDS[cmd_name][2])
            def unavailable() -> None:
                raise click.ClickException(f"'engine {cmd_name}' is unavailable: module {missing!r} is missing")

            return unavailable
        command = getattr(module, attr)
        assert isinstance(command, click.Command)
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, help_) for name, (_, _, help_) in sorted(_COMMANDS.items())]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="avatar-engine")
def main(verbose: int) -> None:
    """Real-time streaming avatar engine: a portrait and a live voice in, a talking face out."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
