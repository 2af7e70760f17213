"""The backend behind each bench name, opened through open_backend, or Skip with the reason."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import DitexportError
from ..model import DiT
from .settings import BENCH_BACKENDS, bench_rows, BenchSettings, Skip


# ---------------------------------------------------------------------------------------- backends

@dataclass
class BenchContext:
    """What backend factories need: the pristine fp32 model, where to run, and the export to take graphs from."""
    model: DiT
    device: torch.device
    settings: BenchSettings
    max_batch: int
    engine_dir: Path                                # where the bench builds its own TensorRT engine
    log: callable = print
    export: Callable[[], Path] | None = None        # the validated export (`build`'s, built when missing)
    _export_dir: Path | None = None
    _export_error: Exception | None = None

    def export_dir(self) -> Path:
        """The export directory: from `export` (resolved once; a failure is remembered and raised again, so that
        no later row builds it a second time), else --export-dir as it is."""
        if self._export_error is not None:
            raise self._export_error
        if self._export_dir is None:
            if self.export is not None:
                try:
                    self._export_dir = Path(self.export())
                except Exception as e:
                    self._export_error = e
                    raise
            elif self.settings.export_dir is not None:
                self._export_dir = Path(self.settings.export_dir)
            else:
                raise Skip("no export to take the ONNX graphs from: build one (python -m ditexport build) "
                           "and pass --export-dir")
        return self._export_dir

    def graph(self, precision: str) -> Path:
        """The path of the (x, t, y) ONNX graph of a precision in the export; Skip where it has none."""
        from ..artifacts import onnx_filename

        path = self.export_dir() / onnx_filename("xty", precision)
        if not path.is_file():
            raise Skip(f"the export has no {precision} graph ({path}); rebuild it with --precision fp32,{precision}")
        return path

    def onnx(self, precision: str) -> Path:
        """The (x, t, y) ONNX graph of a precision in the export, verified."""
        from ..verification import verify_export

        path = self.graph(precision)

        # Checked against the manifest before ONNX Runtime reads it, as every consumer of an export does; a damaged
        # graph fails its own rows (its ArtifactError is recorded), the others still run.
        verify_export(self.export_dir(), [path], all_sizes=False)
        return path


def absent_reason(ctx: BenchContext, name: str) -> str | None:
    """Why this machine does not run bench backend `name`, found cheaply (nothing is exported, built or opened);
    None when it does. A backend that is present may still fail when it is made or measured."""
    gpu = ctx.device.type == "cuda"
    if name == "torch-cuda-graph" and not gpu:
        return "CUDA graphs need a CUDA GPU (torch sees none, or --device cpu)"
    if name == "torch-compile" and not gpu and ctx.settings.backends is None:
        return "not run on the CPU unless asked for (compiling takes minutes on few cores): --backends torch-compile"
    if name.startswith("onnxruntime"):
        try:
            import onnxruntime as ort
        except ImportError as e:
            return f"the onnxruntime backend is unavailable ({e})"
        if gpu and "CUDAExecutionProvider" not in ort.get_available_providers():
            return ("onnxruntime has no CUDA provider here (pip install onnxruntime-gpu); the CPU provider is "
                    "benchmarked with --device cpu")
    if name.startswith("tensorrt"):  # tensorrt and its 8-bit rows
        from ..engine import tensorrt_unavailable_reason

        reason = tensorrt_unavailable_reason(for_build=ctx.settings.export_dir is None)
        if reason:
            return reason
        if not gpu:
            return "TensorRT runs on the GPU; this run benchmarks the CPU (--device cpu)"
    return None


def _torch_backend(ctx: BenchContext, name: str):
    from ..backends.open import open_backend

    precision = "fp16" if ctx.device.type == "cuda" else "fp32"
    model = copy.deepcopy(ctx.model)  # TorchBackend moves and casts its model in place
    if name == "torch-eager":
        return open_backend("torch", precision, model=model, device=ctx.device)
    if name == "torch-cuda-graph":
        return open_backend("torch", precision, model=model, device=ctx.device, cuda_graph=True)
    return open_backend("torch", precision, model=model, device=ctx.device, compile_mode=ctx.settings.compile_mode)


def _onnxruntime_backend(ctx: BenchContext, name: str):
    from ..backends.open import open_backend

    providers = None
    if ctx.device.type == "cuda":
        # TF32 off and the bench's GPU, and refused in one line if ONNX Runtime falls back to the CPU: see
        # OnnxRuntimeBackend.
        providers = ["CUDAExecutionProvider"]
    precision = name.rsplit("-", 1)[1]
    ctx.graph(precision)  # a missing graph skips its rows
    # A damaged graph fails its own rows (its ArtifactError is recorded), the others still run.
    return open_backend("onnxruntime", precision, config=ctx.model.config, export_dir=ctx.export_dir(),
                        providers=providers, device=ctx.device, all_sizes=False)


def _tensorrt_backend(ctx: BenchContext, name: str):
    from ..backends.open import open_backend
    from ..engine import batch_profiles, build_engine, current_environment, find_plan, plan_path_for, \
        timing_cache_filename

    env = current_environment(ctx.device)
    # "tensorrt" runs the fp16 graph; "tensorrt-int8"/"-fp8" the Q/DQ graph, from a plan of its own.
    precision = name.partition("-")[2] or "fp16"
    stem = "model" if precision == "fp16" else f"model.{precision}"
    if ctx.settings.export_dir is not None:
        plan = find_plan(ctx.export_dir(), stem=stem, environment=env)  # built by `build`: one profile
    else:
        # The bench's own engine, from the export's graph, kept apart from the export's engines (which cover
        # `build --max-batch` only).
        ctx.engine_dir.mkdir(parents=True, exist_ok=True)
        plan = plan_path_for(ctx.engine_dir, stem=stem, environment=env)
        graph = ctx.onnx(precision)
        # One optimization profile per timed batch, its opt at that batch: each row is timed on kernels
        # chosen for its own size, in one plan (see docs/gpu.md).
        ranges = batch_profiles(b for b, _ in bench_rows(ctx.settings))
        if _usable_plan(plan, graph, ranges, ctx.settings.builder_optimization_level, env):
            ctx.log(f"  found cached engine {plan}")
        else:
            ctx.log(f"  building {plan.name} (profiles {', '.join(f'{lo}..{hi}' for lo, _, hi in ranges)}, "
                    f"builder level {ctx.settings.builder_optimization_level}) ...")
            meta = build_engine(graph, plan, batch_ranges=ranges, device=ctx.device,
                                builder_optimization_level=ctx.settings.builder_optimization_level,
                                timing_cache_path=Path(ctx.settings.out_dir) / timing_cache_filename(
                                    env["gpu_name"], env["tensorrt_version"]))
            ctx.log(f"  built in {meta['build_seconds']:.0f} s")
    return open_backend("tensorrt", precision, config=ctx.model.config, plan=plan, device=ctx.device)


def _usable_plan(plan: Path, onnx_path: Path, ranges: list, level: int, env: dict) -> bool:
    """Whether an earlier bench's plan was built here, from this very ONNX, with these profiles."""
    from ..engine import EngineError, check_engine_compatibility, check_onnx_unchanged, read_engine_metadata

    try:
        meta = read_engine_metadata(plan)
        check_engine_compatibility(meta, env, plan)
        check_onnx_unchanged(meta, onnx_path)
    except EngineError:
        return False
    return meta.get("batch_profiles") == [list(r) for r in ranges] and meta.get("builder_optimization_level") == level


def make_bench_backend(ctx: BenchContext, name: str):
    """The backend behind a bench name, or Skip with the reason."""
    if name not in BENCH_BACKENDS:
        raise DitexportError(f"unknown bench backend {name!r}; choose from {', '.join(BENCH_BACKENDS)}")
    reason = absent_reason(ctx, name)
    if reason:
        raise Skip(reason)
    if name.startswith("torch"):
        return _torch_backend(ctx, name)
    if name.startswith("onnxruntime"):
        return _onnxruntime_backend(ctx, name)
    return _tensorrt_backend(ctx, name)
