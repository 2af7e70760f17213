"""TensorRT engines: the batch profile, the strongly typed build, the plan's metadata and checked loading.

Precision lives in the ONNX graph (TensorRT 11 has no FP16 builder flag), so the network is always built
strongly typed. A plan only runs on the TensorRT version and GPU it was built for, so the metadata beside
it records both, with the hashes of the plan and of the ONNX it came from, and `load_engine` checks them
before TensorRT ever sees the bytes. Everything here but the build and the deserialisation is plain
Python and is tested on machines without TensorRT.
"""
from __future__ import annotations

import datetime
import json
import re
import time
from pathlib import Path

from .artifacts import atomic_path, atomic_write_json
from .hashing import sha256_file
from .errors import DitexportError, UsageError, summary

METADATA_FORMAT = 1
REBUILD_COMMAND = "python -m ditexport build --force"
TENSORRT_INSTALL_HINT = "pip install tensorrt; its CUDA wheels come from NVIDIA's index, pypi.nvidia.com"


class EngineError(DitexportError):
    """A plan that cannot be built or loaded here; the message says how to rebuild it."""


# ---------------------------------------------------------------------------------------- availability

# 10.1 added what the backend calls: set_device_memory(ptr, size) and get_device_memory_size_for_profile_v2.
MIN_TENSORRT_VERSION = (10, 1)


def tensorrt_version_problem(version: str | None) -> str | None:
    """Why an imported TensorRT of this version cannot run ditexport's engines, or None when it can."""
    if not version:
        # `tensorrt-stubs` alone installs a `tensorrt` folder of .pyi files, which imports as an empty namespace.
        return f"tensorrt is not installed (an importable tensorrt without a version: type stubs only?) ({TENSORRT_INSTALL_HINT})"
    match = re.match(r"(\d+)\.(\d+)", version)
    if match is None:
        return f"cannot read the TensorRT version {version!r}; ditexport needs TensorRT 10.1 or newer"
    if (int(match[1]), int(match[2])) < MIN_TENSORRT_VERSION:
        return (f"TensorRT {version} is too old: ditexport needs TensorRT 10.1 or newer "
                f"(set_device_memory with a size and per-profile memory sizes arrived in 10.1)")
    return None


def tensorrt_unavailable_reason(for_build: bool = True) -> str | None:
    """None when TensorRT >= 10.1 imports and torch sees a CUDA GPU (and, to build, Polygraphy imports); else why not."""
    reasons = []
    try:
        import tensorrt
    except ImportError:
        reasons.append(f"tensorrt is not installed ({TENSORRT_INSTALL_HINT})")
    except Exception as e:  # a wheel whose CUDA libraries do not load raises OSError and friends
        reasons.append(f"tensorrt failed to import ({type(e).__name__}: {e})")
    else:
        problem = tensorrt_version_problem(getattr(tensorrt, "__version__", None))
        if problem:
            reasons.append(problem)
    if for_build:
        try:
            import polygraphy  # noqa: F401
        except ImportError:
            reasons.append("polygraphy is not installed (pip install 'ditexport[trt]')")
    import torch

    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU is visible to torch")
    return "; ".join(reasons) or None


# ---------------------------------------------------------------------------------------- profile

def engine_profile(max_batch_images: int, guided: bool = True,
                   opt_batch_images: int | None = None) -> tuple[int, int, int]:
    """(min, opt, max) engine batch for up to `max_batch_images` images; guidance runs [x; x], doubling it.

    opt defaults to max: TensorRT picks its kernels for the opt shape, and the large batches are where
    the time goes; pass `opt_batch_images` to favour interactive sizes instead.
    """
    from .export import BatchProfile

    p = BatchProfile.for_images(max_batch_images, guided, opt_batch_images)
    return p.min, p.opt, p.max


def batch_profiles(opt_batches) -> list[tuple[int, int, int]]:
    """One (min, opt, max) profile per batch in `opt_batches`: each covers the batches above the previous one
    up to its own, which is its opt (and max), so every batch from 1 up runs on kernels chosen near its size."""
    batches = sorted(set(int(b) for b in opt_batches))
    if not batches or batches[0] < 1:
        raise UsageError(f"profile batches must be at least 1, got {list(opt_batches)}")
    lows = [1] + [b + 1 for b in batches[:-1]]
    return [(lo, b, b) for lo, b in zip(lows, batches)]


def profile_for_batch(ranges: list[tuple[int, int, int]], batch: int) -> int:
    """The index of the profile that runs `batch`: one whose range holds it, the nearest opt first."""
    fits = [i for i, (lo, _, hi) in enumerate(ranges) if lo <= batch <= hi]
    if not fits:
        raise EngineError(f"no optimization profile of the engine takes batch {batch}; its profiles are "
                          f"{', '.join(f'{lo}..{hi}' for lo, _, hi in ranges)}")
    return min(fits, key=lambda i: abs(ranges[i][1] - batch))


def _onnx_header(onnx_path: str | Path):
    import onnx

    try:
        return onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise EngineError(f"cannot read ONNX file {onnx_path}: {e}") from None


def onnx_input_shapes(onnx_path: str | Path, model=None) -> dict[str, list[int | str]]:
    """Each graph input's shape, a symbolic or unknown dimension given as its name (or "?")."""
    model = model if model is not None else _onnx_header(onnx_path)
    initializers = {init.name for init in model.graph.initializer}
    shapes = {}
    for value in model.graph.input:
        if value.name in initializers:  # old exporters list weights as inputs too
            continue
        dims = value.type.tensor_type.shape.dim
        shapes[value.name] = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
    return shapes


def onnx_precision(onnx_path: str | Path, model=None) -> str:
    """The precision an export wrote into the graph's metadata; from the file name for graphs without it."""
    model = model if model is not None else _onnx_header(onnx_path)
    props = {p.key: p.value for p in model.metadata_props}
    return props.get("ditexport.precision") or ("fp16" if ".fp16." in Path(onnx_path).name else "fp32")


def plan_precision(metadata: dict) -> str:
    """What a plan computes in: the precision of the graph it was built from (strong typing keeps it)."""
    return metadata.get("precision") or ("fp16" if ".fp16." in metadata.get("onnx_file", "") else "fp32")


def profile_shapes(input_shapes: dict[str, list[int | str]], min_batch: int, opt_batch: int,
                   max_batch: int) -> dict[str, dict[str, list[int]]]:
    """The optimisation profile: every input's min/opt/max shape, the batch axis (0) being the only dynamic one."""
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise UsageError(f"an engine profile needs 1 <= min <= opt <= max, got {min_batch}, {opt_batch}, {max_batch}")
    profile = {}
    for name, shape in input_shapes.items():
        if not shape:
            raise EngineError(f"ONNX input {name!r} is a scalar; every input needs a leading batch axis")
        if isinstance(shape[0], int):
            raise EngineError(f"ONNX input {name!r} has a fixed batch of {shape[0]}; export it with a dynamic batch "
                              "axis (the export pipeline does this) before building an engine")
        rest = shape[1:]
        if any(not isinstance(d, int) for d in rest):
            raise EngineError(f"ONNX input {name!r} has dynamic dimensions besides the batch ({shape}); "
                              "only the batch may be dynamic in an engine profile")
        profile[name] = {"min": [min_batch, *rest], "opt": [opt_batch, *rest], "max": [max_batch, *rest]}
    return profile


# ---------------------------------------------------------------------------------------- naming

def sanitize_gpu_name(name: str) -> str:
    """A file-name-safe GPU name: "NVIDIA H100 80GB HBM3" -> "nvidia-h100-80gb-hbm3"."""
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-gpu"


def plan_filename(gpu_name: str, tensorrt_version: str, stem: str = "model") -> str:
    """`<stem>.<gpu>.trt<version>.plan`: a plan only runs where both match, so both are in its name."""
    version = re.sub(r"[^0-9A-Za-z.]+", "-", tensorrt_version)
    return f"{stem}.{sanitize_gpu_name(gpu_name)}.trt{version}.plan"


def timing_cache_filename(gpu_name: str, tensorrt_version: str) -> str:
    return f"timing-cache.{sanitize_gpu_name(gpu_name)}.trt{tensorrt_version}.cache"


def metadata_path(plan_path: str | Path) -> Path:
    """The metadata JSON beside a plan: `model.<gpu>.<trt>.plan.json`."""
    plan_path = Path(plan_path)
    return plan_path.with_name(plan_path.name + ".json")


# ---------------------------------------------------------------------------------------- environment

def current_environment(device=None) -> dict:
    """What a plan is tied to on this machine: the TensorRT version and the GPU (name, compute capability) of
    `device` (torch's current device when None)."""
    import tensorrt as trt
    import torch

    index = torch.device(device).index if device is not None else None
    index = torch.cuda.current_device() if index is None else index
    major, minor = torch.cuda.get_device_capability(index)
    return {"tensorrt_version": trt.__version__, "gpu_name": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}"}


def plan_path_for(export_dir: str | Path, stem: str = "model", environment: dict | None = None) -> Path:
    """Where this machine's plan of `stem` lives in an export directory."""
    env = environment or current_environment()
    return Path(export_dir) / plan_filename(env["gpu_name"], env["tensorrt_version"], stem)


def find_plan(export_dir: str | Path, stem: str = "model", environment: dict | None = None) -> Path:
    """This machine's plan in `export_dir`, or an EngineError naming what is there and how to build it."""
    export_dir = Path(export_dir)
    if not export_dir.is_dir():
        raise EngineError(f"export directory not found: {export_dir}; create it with: python -m ditexport build")
    path = plan_path_for(export_dir, stem, environment)
    if path.is_file():
        return path
    others = sorted(p.name for p in export_dir.glob(f"{stem}.*.plan"))
    env = environment or current_environment()
    here = f"{env['gpu_name']} with TensorRT {env['tensorrt_version']}"
    if others:
        raise EngineError(f"{export_dir} has no engine for {here} (it has {', '.join(others)}, built elsewhere); "
                          f"rebuild it here with: {REBUILD_COMMAND}")
    raise EngineError(f"{export_dir} has no TensorRT engine; build one with: python -m ditexport build")


# ---------------------------------------------------------------------------------------- metadata

def read_engine_metadata(plan_path: str | Path) -> dict:
    """The metadata written beside a plan by `build_engine`; an EngineError when missing or unreadable."""
    plan_path = Path(plan_path)
    if not plan_path.is_file():
        raise EngineError(f"TensorRT plan not found: {plan_path}; build it with: python -m ditexport build")
    meta_path = metadata_path(plan_path)
    if not meta_path.is_file():
        raise EngineError(f"{plan_path} has no metadata beside it ({meta_path.name}), so its GPU and TensorRT "
                          f"version are unknown; rebuild it with: {REBUILD_COMMAND}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read engine metadata {meta_path}: {e}; rebuild it with: {REBUILD_COMMAND}") from None
    missing = [k for k in ("tensorrt_version", "compute_capability", "gpu_name", "plan_sha256", "plan_bytes")
               if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise EngineError(f"engine metadata {meta_path} lacks {', '.join(missing) or 'its fields'}; "
                          f"rebuild it with: {REBUILD_COMMAND}")
    return meta


def check_engine_compatibility(metadata: dict, environment: dict, plan_name: str = "the plan") -> list[str]:
    """Raises an EngineError when a plan cannot run here; returns warnings for what merely may be slower.

    TensorRT deserialises a plan only with the exact version that built it and on the same compute
    capability; another GPU model of the same capability loads it but with tactics timed elsewhere.
    """
    built = (f"{metadata['gpu_name']} (compute {metadata['compute_capability']}) with TensorRT "
             f"{metadata['tensorrt_version']}")
    here = (f"{environment['gpu_name']} (compute {environment['compute_capability']}) with TensorRT "
            f"{environment['tensorrt_version']}")
    rebuild = metadata.get("rebuild_command") or REBUILD_COMMAND
    if metadata["tensorrt_version"] != environment["tensorrt_version"]:
        raise EngineError(f"{plan_name} was built for {built}, but this machine has TensorRT "
                          f"{environment['tensorrt_version']}; plans only load with the TensorRT version that "
                          f"built them. Rebuild it with: {rebuild}")
    if str(metadata["compute_capability"]) != str(environment["compute_capability"]):
        raise EngineError(f"{plan_name} was built for {built}, but this machine has {here}; plans only run on "
                          f"the GPU architecture they were built for. Rebuild it with: {rebuild}")
    warnings = []
    if metadata["gpu_name"] != environment["gpu_name"]:
        warnings.append(f"{plan_name} was built on {metadata['gpu_name']} and runs here on "
                        f"{environment['gpu_name']} (same architecture); rebuild for the best speed: {rebuild}")
    return warnings


def verify_plan_file(plan_path: str | Path, metadata: dict) -> None:
    """Size and SHA-256 of the plan against its metadata: a truncated or altered plan is refused."""
    plan_path = Path(plan_path)
    size = plan_path.stat().st_size
    rebuild = metadata.get("rebuild_command") or REBUILD_COMMAND
    if size != metadata["plan_bytes"]:
        raise EngineError(f"{plan_path} is corrupt: {size} bytes where {metadata['plan_bytes']} were written "
                          f"(truncated or overwritten); rebuild it with: {rebuild}")
    if sha256_file(plan_path) != metadata["plan_sha256"]:
        raise EngineError(f"{plan_path} is corrupt: its SHA-256 differs from the one recorded at build time; "
                          f"rebuild it with: {rebuild}")


def check_onnx_unchanged(metadata: dict, onnx_path: str | Path) -> None:
    """Refuses a plan built from a different ONNX file than the one now in the export."""
    if metadata.get("onnx_sha256") and sha256_file(onnx_path) != metadata["onnx_sha256"]:
        raise EngineError(f"the engine is stale: {onnx_path} changed since the plan was built; rebuild it with: "
                          f"{metadata.get('rebuild_command') or REBUILD_COMMAND}")


def engine_metadata(*, plan_path: Path, plan_bytes: bytes, onnx_path: Path, environment: dict, profile: dict,
                    batch: tuple[int, int, int], builder_optimization_level: int, build_seconds: float,
                    timing_cache_path: Path | None, rebuild_command: str | None = None,
                    profiles: list[dict] | None = None, batch_ranges: list[tuple[int, int, int]] | None = None,
                    precision: str | None = None) -> dict:
    """The JSON written beside a plan; `profile`/`batch` describe the first optimization profile and
    `profiles`/`batch_profiles` all of them (one unless the build asked for several)."""
    import hashlib

    from . import __version__

    ranges = batch_ranges or [batch]
    return {
        "format": METADATA_FORMAT,
        "plan_file": plan_path.name,
        "plan_sha256": hashlib.sha256(plan_bytes).hexdigest(),
        "plan_bytes": len(plan_bytes),
        "onnx_file": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
        "precision": precision or onnx_precision(onnx_path),
        **environment,
        "strongly_typed": True,
        "profile": profile,
        "profiles": profiles or [profile],
        # The batches the whole engine takes (min and max over its profiles; opt of the first profile).
        "batch": {"min": min(r[0] for r in ranges), "opt": ranges[0][1], "max": max(r[2] for r in ranges)},
        "batch_profiles": [list(r) for r in ranges],
        "builder_optimization_level": builder_optimization_level,
        "timing_cache": str(timing_cache_path) if timing_cache_path else None,
        "build_seconds": round(build_seconds, 2),
        "rebuild_command": rebuild_command,
        "ditexport_version": __version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# ---------------------------------------------------------------------------------------- build and load

def _device_scope(device):
    """Enters `device` (a CUDA torch device) for TensorRT calls, which act on the current device."""
    import contextlib

    import torch

    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()


def build_engine(onnx_path: str | Path, plan_path: str | Path, *, min_batch: int | None = None,
                 opt_batch: int | None = None, max_batch: int | None = None,
                 batch_ranges: list[tuple[int, int, int]] | None = None, builder_optimization_level: int = 3,
                 timing_cache_path: str | Path | None = None, rebuild_command: str | None = None,
                 device=None) -> dict:
    """Builds a strongly typed engine from an ONNX file, writes the plan and its metadata; returns the metadata.

    One optimization profile (min_batch, opt_batch, max_batch), or one per (min, opt, max) in `batch_ranges`
    (see `batch_profiles`). The timing cache defaults to the export root (the parent of the plan's
    directory), named after the GPU and TensorRT version, and is loaded and extended by every build there.
    Every failure on the TensorRT side is an EngineError.
    """
    reason = tensorrt_unavailable_reason(for_build=True)
    if reason:
        raise EngineError(f"cannot build a TensorRT engine: {reason}")
    if batch_ranges is None:
        if min_batch is None or opt_batch is None or max_batch is None:
            raise ValueError("build_engine needs min_batch, opt_batch and max_batch, or batch_ranges")
        batch_ranges = [(min_batch, opt_batch, max_batch)]
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise EngineError(f"ONNX file not found: {onnx_path}; export it with: python -m ditexport build")
    header = _onnx_header(onnx_path)
    shapes, precision = onnx_input_shapes(onnx_path, header), onnx_precision(onnx_path, header)
    del header
    profiles = [profile_shapes(shapes, *r) for r in batch_ranges]
    with _device_scope(device):
        env = current_environment(device)
        if timing_cache_path is None:
            timing_cache_path = plan_path.resolve().parent.parent / timing_cache_filename(env["gpu_name"],
                                                                                          env["tensorrt_version"])
        timing_cache_path = Path(timing_cache_path)
        timing_cache_path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        plan = plan_bytes_from_onnx(onnx_path, profiles, builder_optimization_level, timing_cache_path)
        seconds = time.perf_counter() - start
    meta = engine_metadata(plan_path=plan_path, plan_bytes=plan, onnx_path=onnx_path, environment=env,
                           profile=profiles[0], batch=batch_ranges[0], profiles=profiles, batch_ranges=batch_ranges,
                           precision=precision, builder_optimization_level=builder_optimization_level,
                           build_seconds=seconds, timing_cache_path=timing_cache_path,
                           rebuild_command=rebuild_command)
    # The plan first, then its metadata: a plan without metadata is refused at load, never trusted.
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    metadata_path(plan_path).unlink(missing_ok=True)
    with atomic_path(plan_path) as tmp:
        tmp.write_bytes(plan)
    atomic_write_json(metadata_path(plan_path), meta)
    return meta


def plan_bytes_from_onnx(onnx_path: Path, profiles: list[dict], builder_optimization_level: int,
                         timing_cache_path: Path) -> bytes:
    """Parses and builds through Polygraphy; whatever fails there (parser, builder, the install) is an EngineError."""
    try:
        from polygraphy.backend.trt import CreateConfig, EngineBytesFromNetwork, NetworkFromOnnxPath, Profile

        trt_profiles = []
        for shapes in profiles:
            trt_profile = Profile()
            for name, s in shapes.items():
                trt_profile.add(name, min=s["min"], opt=s["opt"], max=s["max"])
            trt_profiles.append(trt_profile)
        # Never Polygraphy's fp16 option: the graph's own types decide precision (strong typing).
        config = CreateConfig(profiles=trt_profiles, builder_optimization_level=builder_optimization_level,
                              load_timing_cache=str(timing_cache_path) if timing_cache_path.is_file() else None)
        network = NetworkFromOnnxPath(str(onnx_path), strongly_typed=True)
        return bytes(EngineBytesFromNetwork(network, config=config, save_timing_cache=str(timing_cache_path))())
    except Exception as e:  # PolygraphyException for parser and builder failures; anything from a broken install
        raise EngineError(f"TensorRT could not build {onnx_path}: {summary(e)}") from None


def compare_with_onnxruntime(onnx_path: str | Path, plan_path: str | Path, feeds: list[dict],
                             tolerance: float = 5e-3) -> list[dict]:
    """ONNX Runtime (CPU) on `onnx_path` vs TensorRT on `plan_path`, run side by side by Polygraphy's Comparator.

    `feeds` are dicts of numpy inputs (one per iteration, any batch in the profile). Returns, per feed and
    output, ‖trt − ort‖/‖ort‖, the max abs difference, finiteness and pass/fail against `tolerance`.
    """
    import numpy as np

    _, engine, _ = load_engine(plan_path)
    try:
        from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx
        from polygraphy.backend.trt import TrtRunner
        from polygraphy.comparator import Comparator, RunResults

        ort_runner = OnnxrtRunner(SessionFromOnnx(str(onnx_path), providers=["CPUExecutionProvider"]))
        trt_runner = TrtRunner(engine)
        results = Comparator.run([ort_runner, trt_runner], data_loader=feeds)
        if not isinstance(results, RunResults):  # a generator only with streaming=True; narrows the type too
            raise TypeError(f"Comparator.run returned {type(results).__name__}, not RunResults")
        ort_outputs, trt_outputs = results[ort_runner.name], results[trt_runner.name]  # one dict per iteration
    except Exception as e:
        raise EngineError(f"Polygraphy could not compare {Path(plan_path).name} with ONNX Runtime: "
                          f"{summary(e)}") from None
    rows = []
    for i, (expected, got) in enumerate(zip(ort_outputs, trt_outputs)):
        for name in expected.keys():
            a, b = np.asarray(got[name], np.float32), np.asarray(expected[name], np.float32)
            rel = float(np.linalg.norm(a - b) / max(float(np.linalg.norm(b)), 1e-30))
            finite = bool(np.isfinite(a).all())
            rows.append({"iteration": i, "output": name, "batch": int(a.shape[0]), "rel_err": rel,
                         "max_abs": float(np.abs(a - b).max()), "finite": finite,
                         "passed": finite and rel <= tolerance})
    return rows


def load_engine(plan_path: str | Path, *, verify: bool = True, onnx_path: str | Path | None = None, device=None):
    """Deserialises a plan on `device` (default: the current one) after checking its metadata against that GPU;
    returns (runtime, engine, metadata). The runtime is returned because the engine must not outlive it.
    """
    reason = tensorrt_unavailable_reason(for_build=False)
    if reason:
        raise EngineError(f"cannot load a TensorRT engine: {reason}")
    import tensorrt as trt

    plan_path = Path(plan_path)
    meta = read_engine_metadata(plan_path)
    with _device_scope(device):
        for warning in check_engine_compatibility(meta, current_environment(device), plan_path.name):
            print(f"warning: {warning}")
        if verify:
            verify_plan_file(plan_path, meta)
        if onnx_path is not None:
            check_onnx_unchanged(meta, onnx_path)
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        except Exception as e:  # the bindings raise for some broken plans instead of returning None
            raise EngineError(f"TensorRT could not deserialise {plan_path}: {summary(e)}; rebuild it with: "
                              f"{meta.get('rebuild_command') or REBUILD_COMMAND}") from None
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise {plan_path} (see its log above); rebuild it with: "
                          f"{meta.get('rebuild_command') or REBUILD_COMMAND}")
    return runtime, engine, meta
