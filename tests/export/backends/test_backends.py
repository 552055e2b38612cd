"""Backends behind one interface: selection and errors, eager / torch.compile / onnxruntime parity with the
modules (tiny preset, fp32, 1e-4), the renderer and denoiser runtimes, and ``engine bench`` (JSON + PNG)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from engine.keypoints import NUM_KP
from engine.models import liveportrait
from engine.motion import lmdm
from export import backends, graphs
from export.backends import BackendConfig, BackendError, DenoiserRuntime, RendererRuntime, get_backend
from streaming.cli import main

TOL = 1e-4


@pytest.fixture(scope="module")
def nets() -> liveportrait.LivePortraitNets:
    return liveportrait.build("tiny")


@pytest.fixture(scope="module")
def denoiser() -> lmdm.MotionDecoder:
    return lmdm.build("tiny")


def _max_err(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]) -> float:
    assert [x.shape for x in a] == [y.shape for y in b]
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def test_selection_errors_list_the_usable_backends() -> None:
    with pytest.raises(BackendError, match=r"unknown backend 'nope'; available on cpu: \['eager', 'compile'"):
        get_backend(BackendConfig("nope", "cpu"))
    reasons = backends.available_backends("cpu")
    assert list(reasons) == list(backends.BACKEND_NAMES) == ["eager", "compile", "onnxruntime", "tensorrt"]
    assert reasons["eager"] is None and reasons["onnxruntime"] is None
    assert reasons["tensorrt"] is not None  # CUDA-only, whatever is installed
    with pytest.raises(BackendError, match=r"backend 'tensorrt' is unavailable on cpu: .*Available there: \["):
        get_backend(BackendConfig("tensorrt", "cpu"))


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_tensorrt_missing_is_explained() -> None:
    reason = backends.backend_class("tensorrt").unavailable_reason(torch.device("cuda"))
    assert reason is not None and "pip install tensorrt" in reason


def test_eager_runner_matches_the_module_and_checks_arity(nets: liveportrait.LivePortraitNets) -> None:
    graph = graphs.renderer_graphs(nets, names=["warping"])["warping"]
    runner = get_backend(BackendConfig("eager", "cpu", "fp32")).load(graph)
    inputs = graph.example_inputs(2)
    direct = nets.warping(*inputs)
    assert _max_err(runner(*inputs), (direct.out, direct.occlusion, direct.deformation)) == 0.0
    with pytest.raises(ValueError, match=r"warping takes 3 inputs \('feature_3d', 'kp_driving', 'kp_source'\)"):
        runner(inputs[0])


def test_eager_bfloat16_runs_in_reduced_precision(nets: liveportrait.LivePortraitNets) -> None:
    graph = graphs.renderer_graphs(nets, names=["stitching"])["stitching"]
    inputs = graph.example_inputs(4)
    (out,) = get_backend(BackendConfig("eager", "cpu", "bf16")).load(graph)(*inputs)
    assert out.dtype == torch.bfloat16
    # bf16 keeps 8 significant bits (relative step 3.9e-3); four layers of O(1) values stay well inside 3e-2
    err = float((out.float() - graph.run(*inputs)[0]).abs().max())
    assert 0 < err <= 3e-2
    assert next(nets.stitching.parameters()).dtype == torch.float32  # the shared network is left as it was


def test_onnxruntime_float16_keeps_fp32_io() -> None:
    graph = graphs.head_graphs(graphs.build_heads())["lip_head"]
    inputs = graph.example_inputs(2)
    (out,) = get_backend(BackendConfig("onnxruntime", "cpu", "fp16")).load(graph)(*inputs)
    assert out.dtype == torch.float32  # fp16 inside, fp32 at the interface
    # one conv, a mean and a linear layer on O(1) values: fp16's relative step 4.9e-4 stays far below 1e-2
    err = float((out - graph.run(*inputs)[0]).abs().max())
    assert 0 < err <= 1e-2


def test_onnxruntime_runs_through_io_binding_into_torch_tensors(
    nets: liveportrait.LivePortraitNets, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inputs are bound where the torch tensors live and outputs written into torch tensors: no NumPy round trip
    and no ``session.run`` per call (on CUDA that round trip moved the feature volume over the bus twice)."""
    import onnxruntime as ort

    graph = graphs.renderer_graphs(nets, names=["warping"])["warping"]
    runner = get_backend(BackendConfig("onnxruntime", "cpu", "fp32")).load(graph)
    inputs = graph.example_inputs(3)

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a NumPy / session.run round trip on the hot path")

    monkeypatch.setattr(torch.Tensor, "numpy", refuse)
    monkeypatch.setattr(ort.InferenceSession, "run", refuse)
    got = runner(*inputs)
    monkeypatch.undo()
    assert [tuple(t.shape) for t in got] == [(3, 32, 16, 16), (3, 1, 16, 16), (3, 2, 16, 16, 3)]
    assert _max_err(got, graph.run(*inputs)) <= TOL
    assert _max_err(runner(*graph.example_inputs(1)), graph.run(*graph.example_inputs(1))) <= TOL  # new batch size


def test_onnxruntime_output_of_unknown_shape_is_copied_out(nets: liveportrait.LivePortraitNets) -> None:
    """An output whose declared shape has a symbol no input carries is allocated by onnxruntime and copied out."""
    graph = graphs.renderer_graphs(nets, names=["stitching"])["stitching"]
    runner = get_backend(BackendConfig("onnxruntime", "cpu", "fp32")).load(graph)
    bound = runner._fn
    bound.outputs = [(name, dtype, ("rows", *shape[1:])) for name, dtype, shape in bound.outputs]
    inputs = graph.example_inputs(2)
    assert _max_err(runner(*inputs), graph.run(*inputs)) <= TOL


@pytest.mark.slow  # inductor compiles C++ for ~30 s on 2 cores
def test_compile_backend_matches_eager(nets: liveportrait.LivePortraitNets) -> None:
    graph = graphs.renderer_graphs(nets, names=["stitching"])["stitching"]
    runner = get_backend(BackendConfig("compile", "cpu", "fp32")).load(graph)
    inputs = graph.example_inputs(2)
    assert _max_err(runner(*inputs), graph.run(*inputs)) <= TOL


def test_renderer_runtime_matches_the_networks(nets: liveportrait.LivePortraitNets) -> None:
    runtime = RendererRuntime(nets, get_backend(BackendConfig("eager", "cpu", "fp32")))
    image = torch.rand(2, 3, nets.config.input_size, nets.config.input_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feature = nets.appearance(image)
        motion = nets.motion(image)
        kp_s = motion.kp.view(2, NUM_KP, 3)
        kp_d = kp_s + 0.05
        expected = nets.decoder(nets.warping(feature, kp_d, kp_s).out)
    assert _max_err((runtime.appearance(image),), (feature,)) == 0.0
    assert _max_err(tuple(runtime.motion(image)), tuple(motion)) == 0.0
    assert _max_err((runtime.warp_decode(feature, kp_d, kp_s),), (expected,)) <= 1e-6


def test_denoiser_runtime_on_onnxruntime_matches_the_denoiser(denoiser: lmdm.MotionDecoder) -> None:
    runtime = DenoiserRuntime(denoiser, get_backend(BackendConfig("onnxruntime", "cpu", "fp32")))
    assert runtime.config == denoiser.config and runtime.untrained
    x_t, cond_frame, cond, t, _ = graphs.denoiser_graph(denoiser).example_inputs(3)
    mask = torch.tensor([False, True, False])
    with torch.inference_mode():
        for kwargs in ({}, {"drop_cond": True}, {"drop_mask": mask}):
            expected = denoiser(x_t, cond_frame, cond, t, **kwargs)
            got = runtime(x_t, cond_frame, cond, t, **kwargs)
            assert _max_err((got,), (expected,)) <= TOL, kwargs
    with pytest.raises(ValueError, match="either drop_cond=True or drop_mask"):
        runtime(x_t, cond_frame, cond, t, drop_cond=True, drop_mask=mask)


def test_bench_writes_json_and_plot(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    args = ["bench", "--backend", "eager", "--backend", "onnxruntime", "--module", "stitching"]
    args += ["--module", "lip_head", "--iters", "5", "--warmup", "1", "--threads", "1", "--out", str(out)]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    env = report["environment"]
    assert report["benchmark"] == "backends" and env["device_type"] == "cpu" and env["device"]
    assert env["commit"] and report["untrained_weights"] is True
    assert report["config"]["preset"] == "tiny" and report["config"]["threads"] == 1
    assert list(report["results"]) == ["eager", "onnxruntime"]
    for result_ in report["results"].values():
        assert list(result_["modules"]) == ["stitching", "lip_head"]
        assert result_["frames_per_s"] is None  # no warping_decoder timed
        for stats in result_["modules"].values():
            assert 0 < stats["min_ms"] <= stats["median_ms"] <= stats["p90_ms"] <= stats["p99_ms"]
            assert stats["iters"] == 5 and stats["peak_memory_mb"] > 0 and stats["load_s"] > 0
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_subcommand_and_errors(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["bench", "backends", "--backend", "nope", "--out", str(tmp_path / "x.json")])
    assert result.exit_code != 0 and "unknown backend 'nope'" in result.output
    result = runner.invoke(main, ["bench", "backends", "--module", "nope", "--out", str(tmp_path / "y.json")])
    assert result.exit_code != 0 and "nope" in result.output
    assert not (tmp_path / "x.json").exists()


def test_buckets_pad_to_a_few_shapes_and_cut_back(nets: liveportrait.LivePortraitNets) -> None:
    """A batch of 3 runs at bucket 4 (its last row repeated) and comes back as 3 rows equal to an unpadded run."""
    graph = graphs.renderer_graphs(nets, names=["warping_decoder"])["warping_decoder"]
    plain = get_backend(BackendConfig("eager", "cpu", "fp32")).load(graph)
    seen: list[int] = []
    bucketed = get_backend(BackendConfig("eager", "cpu", "fp32")).load(graph)
    inner = bucketed._fn
    bucketed._fn = lambda *x: (seen.append(x[0].shape[0]), inner(*x))[1]  # type: ignore[assignment]
    bucketed.buckets = backends.base.BATCH_BUCKETS
    inputs = graph.example_inputs(3)
    (out,) = bucketed(*inputs)
    assert seen == [4] and out.shape[0] == 3
    assert _max_err((out,), plain(*inputs)) <= TOL
    assert [backends.base.bucket(b) for b in (1, 2, 3, 5, 9, 16, 40)] == [1, 2, 4, 8, 16, 16, 40]
    renderer = RendererRuntime(nets, get_backend(BackendConfig("eager", "cpu", "fp32")))
    assert renderer.runners["warping_decoder"].buckets == backends.base.BATCH_BUCKETS


def test_kernels_option_selects_the_warping_ops(nets: liveportrait.LivePortraitNets) -> None:
    """``kernels=fused`` runs the fused ops' custom ops (their CPU kernel is the twin): the same picture within
    the twins' tolerance; an unknown value or option is refused."""
    graph_inputs = graphs.renderer_graphs(nets, names=["warping_decoder"])["warping_decoder"].example_inputs(2)
    fused = RendererRuntime(nets, get_backend(BackendConfig("eager", "cpu", "fp32", {"kernels": "fused"})))
    standard = RendererRuntime(nets, get_backend(BackendConfig("eager", "cpu", "fp32", {"kernels": "standard"})))
    assert (fused.backend.warp_ops.name, standard.backend.warp_ops.name) == ("fused", "standard")
    with torch.inference_mode():
        assert _max_err((fused.warp_decode(*graph_inputs),), (standard.warp_decode(*graph_inputs),)) <= 1e-4
    with pytest.raises(BackendError, match="kernels must be one of"):
        get_backend(BackendConfig("eager", "cpu", options={"kernels": "fast"}))
    with pytest.raises(BackendError, match=r"takes no option\(s\) \['threads'\]"):
        get_backend(BackendConfig("eager", "cpu", options={"threads": 2}))


@pytest.mark.cuda
def test_cuda_graphs_replay_equals_eager_on_the_gpu(nets: liveportrait.LivePortraitNets) -> None:
    """On a GPU the eager backend replays CUDA graphs (one per bucket): the same outputs as plain calls, for two
    batch sizes in one bucket, and a graph is captured once per shape."""
    graph = graphs.renderer_graphs(nets, names=["warping_decoder"])["warping_decoder"]
    graphed = get_backend(BackendConfig("eager", "cuda", "fp32", {"cuda_graphs": True})).load(graph)
    plain = get_backend(BackendConfig("eager", "cuda", "fp32", {"cuda_graphs": False})).load(graph)
    graphed.buckets = backends.base.BATCH_BUCKETS
    for batch in (3, 4, 3):
        inputs = tuple(t.cuda() for t in graph.example_inputs(batch, seed=batch))
        assert _max_err(graphed(*inputs), plain(*inputs)) <= 1e-5
