"""TensorRT engines: the batch profile, the strongly typed build, the plan's metadata and checked loading.

Precision lives in the ONNX graph (TensorRT 11 has no FP16 builder flag), so the network is always built
strongly typed. A plan only runs on the TensorRT version and GPU it was built for, so the metadata beside
it records both, with the hashes of the plan and of the ONNX it came from, and `load_engine` checks them
before TensorRT ever sees the bytes. Everything here but the build and the deserialisation is plain
Python and is tested on machines without TensorRT.

`profile` holds the batch profiles, `plans` the availability checks, file names and metadata; this module
builds, compares and loads plans.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..artifacts import atomic_path, atomic_write_json
from ..errors import summary
from .plans import (METADATA_FORMAT, MIN_TENSORRT_VERSION, TENSORRT_INSTALL_HINT, EngineError, _device_scope,
                    _onnx_header, check_engine_compatibility, check_onnx_unchanged, current_environment,
                    engine_metadata, find_plan, load_engine, metadata_path, onnx_input_shapes, onnx_precision,
                    plan_filename, plan_path_for, plan_precision, plan_stems, read_engine_metadata, rebuild_for,
                    sanitize_gpu_name, tensorrt_unavailable_reason, tensorrt_version_problem, timing_cache_filename,
                    verify_plan_file)
from .profile import (DEFAULT_MAX_BATCH_IMAGES, BatchProfile, batch_profiles, engine_profile, profile_for_batch,
                      profile_shapes)
from ..logs import get_logger

LOG = get_logger("engine")

__all__ = ["BatchProfile", "DEFAULT_MAX_BATCH_IMAGES", "EngineError", "METADATA_FORMAT", "MIN_TENSORRT_VERSION",
           "TENSORRT_INSTALL_HINT", "batch_profiles", "build_engine", "check_engine_compatibility",
           "check_onnx_unchanged", "compare_with_onnxruntime", "current_environment", "engine_metadata",
           "engine_profile", "find_plan", "load_engine", "metadata_path", "onnx_input_shapes", "onnx_precision",
           "plan_bytes_from_onnx", "plan_filename", "plan_path_for", "plan_precision", "plan_stems",
           "profile_for_batch", "profile_shapes", "read_engine_metadata", "rebuild_for", "sanitize_gpu_name", "tensorrt_unavailable_reason",
           "tensorrt_version_problem", "timing_cache_filename", "verify_plan_file"]


# ---------------------------------------------------------------------------------------- build and load

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
