"""Run-time compilation and launch of kernels/csrc/*.cu through cuda-python (NVRTC + driver API).

The same sources are built into the TensorRT plugin by nvcc (kernels/CMakeLists.txt). Here each source is compiled
once per GPU architecture: a cubin when this NVRTC knows the architecture, otherwise PTX for the newest one it
knows (the driver finishes it). Results are cached in memory and on disk under :func:`cache_dir`,
keyed by a hash of the sources, options and NVRTC version, so a changed kernel is never served stale.
Kernels are loaded as context-independent libraries (cuLibraryLoadData) and launched on torch's current stream.

cuda-python is an optional dependency (``pip install avatar-engine[cuda]``); it is imported lazily.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import tempfile
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

CSRC_DIR = Path(__file__).parent / "csrc"
HEADERS = ("avatar_common.cuh",)
SOURCES = ("grid_sample_3d.cu", "flow_warp.cu", "sparse_motion.cu")
COMPILE_OPTIONS = ("--std=c++17",)
BLOCK_SIZE = 256  # matches __launch_bounds__(256) in the sources
MAX_BLOCKS = 1 << 20  # the kernels loop grid-stride, so huge inputs need no more blocks than this

# A pointer argument is a tensor (its data pointer) or None (null); an int is passed as a C int.
KernelArg = torch.Tensor | int | None


class KernelError(RuntimeError):
    """NVRTC compilation, module loading or kernel launch failed; the message names the step."""


@dataclass(frozen=True)
class CompiledSource:
    image: bytes  # cubin, or NUL-terminated PTX
    target: str  # "sm_90" for a cubin, "compute_90" for PTX


def _bindings() -> tuple[Any, Any]:
    from cuda.bindings import driver, nvrtc

    return driver, nvrtc


def _nvrtc_call(nvrtc: Any, result: Any, program: Any = None, what: str = "nvrtc") -> None:
    if int(result) == 0:
        return
    message = f"{what} failed: {result.name if hasattr(result, 'name') else result}"
    if program is not None:
        _, size = nvrtc.nvrtcGetProgramLogSize(program)
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(program, log)
        message += "\n" + log.rstrip(b"\x00 ").decode(errors="replace")
    raise KernelError(message)


def _driver_call(driver: Any, result: Any, what: str) -> None:
    if int(result) == 0:
        return
    _, text = driver.cuGetErrorString(result)
    detail = text.decode() if isinstance(text, bytes) else str(result)
    raise KernelError(f"{what} failed: {detail}")


@functools.cache
def unavailable_reason() -> str | None:
    """Why the fused kernels cannot run here (None when they can): CUDA, cuda-python, NVRTC, driver."""
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    try:
        driver, nvrtc = _bindings()
    except ImportError as error:
        return f"cuda-python is not installed ({error}); pip install 'avatar-engine[cuda]'"
    try:
        result, *_ = nvrtc.nvrtcVersion()
        _nvrtc_call(nvrtc, result, what="nvrtcVersion")
        (result,) = driver.cuInit(0)
        _driver_call(driver, result, "cuInit")
    except Exception as error:  # a missing libnvrtc / libcuda surfaces as a loader error from cuda.pathfinder
        return f"NVRTC or the CUDA driver cannot be loaded: {error}"
    return None


@torch.compiler.assume_constant_result  # torch.compile evaluates the probe once instead of tracing into it
def available() -> bool:
    """True when CUDA, cuda-python and NVRTC are all present, so the fused kernels can be compiled and run."""
    return unavailable_reason() is None


@functools.cache
def nvrtc_version() -> tuple[int, int]:
    _, nvrtc = _bindings()
    result, major, minor = nvrtc.nvrtcVersion()
    _nvrtc_call(nvrtc, result, what="nvrtcVersion")
    return int(major), int(minor)


@functools.cache
def supported_archs() -> tuple[int, ...]:
    """Architectures (e.g. 80 for sm_80) this NVRTC can build cubins for."""
    _, nvrtc = _bindings()
    result, archs = nvrtc.nvrtcGetSupportedArchs()
    _nvrtc_call(nvrtc, result, what="nvrtcGetSupportedArchs")
    return tuple(int(a) for a in archs)


def select_target(arch: int, supported: Sequence[int]) -> str:
    """``sm_<arch>`` when NVRTC knows the architecture, else PTX for the newest older one it knows."""
    if arch in supported:
        return f"sm_{arch}"
    older = [a for a in supported if a < arch]
    if not older:
        raise KernelError(f"this NVRTC cannot target compute capability {arch / 10:.1f} (supports {list(supported)})")
    return f"compute_{max(older)}"


def _read_sources(name: str) -> tuple[bytes, dict[str, bytes]]:
    if name not in SOURCES:
        raise KernelError(f"unknown kernel source {name!r}; expected one of {SOURCES}")
    headers = {header: (CSRC_DIR / header).read_bytes() for header in HEADERS}
    return (CSRC_DIR / name).read_bytes(), headers


def _cache_key(name: str, target: str, source: bytes, headers: dict[str, bytes], version: tuple[int, int]) -> str:
    digest = hashlib.sha256()
    for part in (name, target, *COMPILE_OPTIONS, f"nvrtc-{version[0]}.{version[1]}"):
        digest.update(part.encode() + b"\x00")
    digest.update(source)
    for header in sorted(headers):
        digest.update(header.encode() + b"\x00" + headers[header])
    return digest.hexdigest()[:24]


def cache_dir() -> Path:
    """``$AVATAR_ENGINE_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/avatar-engine/kernels`` (``~/.cache``): compiled
    images are a cache, rebuilt when missing, so they live with the user's caches rather than the engine's data."""
    env = os.environ.get("AVATAR_ENGINE_KERNEL_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "avatar-engine" / "kernels"


def compile_program(name: str, target: str) -> bytes:
    """Compile ``csrc/<name>`` for ``target`` (``sm_XY`` -> cubin, ``compute_XY`` -> PTX) with NVRTC; no GPU needed.

    Headers are handed to NVRTC by content, so the build does not depend on include paths or a CUDA toolkit.
    """
    _, nvrtc = _bindings()
    source, headers = _read_sources(name)
    names = [header.encode() for header in headers]
    result, program = nvrtc.nvrtcCreateProgram(source, name.encode(), len(headers), list(headers.values()), names)
    _nvrtc_call(nvrtc, result, what=f"nvrtcCreateProgram({name})")
    try:
        options = [f"--gpu-architecture={target}".encode(), *(option.encode() for option in COMPILE_OPTIONS)]
        (result,) = nvrtc.nvrtcCompileProgram(program, len(options), options)
        _nvrtc_call(nvrtc, result, program, what=f"NVRTC compile of {name} for {target}")
        if target.startswith("sm_"):
            result, size = nvrtc.nvrtcGetCUBINSize(program)
            _nvrtc_call(nvrtc, result, what="nvrtcGetCUBINSize")
            image = b" " * size
            (result,) = nvrtc.nvrtcGetCUBIN(program, image)
            _nvrtc_call(nvrtc, result, what="nvrtcGetCUBIN")
        else:
            result, size = nvrtc.nvrtcGetPTXSize(program)
            _nvrtc_call(nvrtc, result, what="nvrtcGetPTXSize")
            image = b" " * size
            (result,) = nvrtc.nvrtcGetPTX(program, image)
            _nvrtc_call(nvrtc, result, what="nvrtcGetPTX")
    finally:
        nvrtc.nvrtcDestroyProgram(program)
    return image


@functools.cache
def compiled_source(name: str, arch: int) -> CompiledSource:
    """The compiled image of ``csrc/<name>`` for compute capability ``arch`` (e.g. 90), from the caches if present."""
    target = select_target(arch, supported_archs())
    source, headers = _read_sources(name)
    key = _cache_key(name, target, source, headers, nvrtc_version())
    path = cache_dir() / f"{Path(name).stem}-{target}-{key}.{'cubin' if target.startswith('sm_') else 'ptx'}"
    if path.is_file():
        return CompiledSource(path.read_bytes(), target)
    image = compile_program(name, target)
    _write_atomic(path, image)
    return CompiledSource(image, target)


def _write_atomic(path: Path, data: bytes) -> None:
    # A crash or a concurrent process must never leave a truncated image under the final name.
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


_LOAD_LOCK = threading.Lock()


@functools.cache
def _library(name: str, arch: int) -> Any:
    driver, _ = _bindings()
    compiled = compiled_source(name, arch)
    result, library = driver.cuLibraryLoadData(compiled.image, None, None, 0, None, None, 0)
    _driver_call(driver, result, f"loading {name} ({compiled.target})")
    return library


@functools.cache
def _kernel(name: str, kernel_name: str, arch: int) -> Any:
    driver, _ = _bindings()
    with _LOAD_LOCK:  # functools.cache does not stop two threads from compiling and loading the same library
        library = _library(name, arch)
    result, kernel = driver.cuLibraryGetKernel(library, kernel_name.encode())
    _driver_call(driver, result, f"looking up {kernel_name} in {name}")
    return kernel


def _ensure_context(driver: Any, device_index: int) -> None:
    # A launch on the legacy default stream uses the calling thread's current context. torch runs on the device's
    # primary context but binds it to a thread lazily, so bind it here when this thread has none yet.
    result, context = driver.cuCtxGetCurrent()
    _driver_call(driver, result, "cuCtxGetCurrent")
    if int(context) != 0:
        return
    result, device = driver.cuDeviceGet(device_index)
    _driver_call(driver, result, "cuDeviceGet")
    result, context = driver.cuDevicePrimaryCtxRetain(device)
    _driver_call(driver, result, "cuDevicePrimaryCtxRetain")
    (result,) = driver.cuCtxSetCurrent(context)
    _driver_call(driver, result, "cuCtxSetCurrent")


def launch(name: str, kernel_name: str, threads: int, args: Sequence[KernelArg], device: torch.device) -> None:
    """Launch ``kernel_name`` from ``csrc/<name>`` with ``threads`` work items on torch's current stream."""
    reason = unavailable_reason()
    if reason is not None:
        raise KernelError(f"fused kernels unavailable: {reason}")
    if threads <= 0:
        return
    driver, _ = _bindings()
    index = device.index if device.index is not None else torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(index)
    kernel = _kernel(name, kernel_name, major * 10 + minor)
    values: list[ctypes.c_void_p | ctypes.c_int] = []
    for arg in args:
        if isinstance(arg, torch.Tensor):
            values.append(ctypes.c_void_p(arg.data_ptr()))
        elif arg is None:
            values.append(ctypes.c_void_p(0))
        else:
            values.append(ctypes.c_int(arg))
    # cuLaunchKernel reads a void** array whose entries point at each argument's value.
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(value) for value in values))
    blocks = min((threads + BLOCK_SIZE - 1) // BLOCK_SIZE, MAX_BLOCKS)
    with torch.cuda.device(index):
        _ensure_context(driver, index)
        stream = driver.CUstream(torch.cuda.current_stream(index).cuda_stream)
        (result,) = driver.cuLaunchKernel(
            kernel, blocks, 1, 1, BLOCK_SIZE, 1, 1, 0, stream, ctypes.addressof(pointers), 0
        )
    _driver_call(driver, result, f"launching {kernel_name}")
