"""Plans without TensorRT: availability, file names, the environment a plan needs, and its metadata."""
from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

from ..hashing import sha256_file
from ..errors import DitexportError, summary
from ..logs import get_logger

LOG = get_logger("engine")


METADATA_FORMAT = 1
TENSORRT_INSTALL_HINT = "pip install tensorrt; its CUDA wheels come from NVIDIA's index, pypi.nvidia.com"


def rebuild_for(plan_path: str | Path, metadata: dict | None = None) -> str:
    """The command that rebuilds a plan: the one its build recorded, else the export directory's (artifacts')."""
    from ..artifacts import rebuild_command

    return (metadata or {}).get("rebuild_command") or rebuild_command(Path(plan_path).parent)


def plan_stems() -> list[tuple[str, str]]:
    """(graph, plan stem) of every plan an export may hold: each DiT graph's (from its fp16 or fp32 graph), its
    8-bit plans (`<stem>.<precision>`), then a latent export's VAE decoder's."""
    from ..artifacts import GRAPH_STEMS, VAE_GRAPH
    from ..precisions import QUANT_PRECISIONS

    stems = [(graph, f"{stem}{suffix}") for graph, stem in GRAPH_STEMS.items()
             for suffix in ("", *(f".{p}" for p in QUANT_PRECISIONS))]
    return [*stems, (VAE_GRAPH, VAE_GRAPH)]


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
                          f"rebuild it here with: {rebuild_for(path)}")
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
                          f"version are unknown; rebuild it with: {rebuild_for(plan_path)}")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError) as e:
        raise EngineError(f"cannot read engine metadata {meta_path}: {e}; rebuild it with: "
                          f"{rebuild_for(plan_path)}") from None
    missing = [k for k in ("tensorrt_version", "compute_capability", "gpu_name", "plan_sha256", "plan_bytes")
               if k not in meta]
    if not isinstance(meta, dict) or missing:
        raise EngineError(f"engine metadata {meta_path} lacks {', '.join(missing) or 'its fields'}; "
                          f"rebuild it with: {rebuild_for(plan_path)}")
    return meta


def check_engine_compatibility(metadata: dict, environment: dict, plan_path: str | Path) -> list[str]:
    """Raises an EngineError when a plan cannot run here; returns warnings for what merely may be slower.

    TensorRT deserialises a plan only with the exact version that built it and on the same compute
    capability; another GPU model of the same capability loads it but with tactics timed elsewhere.
    """
    built = (f"{metadata['gpu_name']} (compute {metadata['compute_capability']}) with TensorRT "
             f"{metadata['tensorrt_version']}")
    here = (f"{environment['gpu_name']} (compute {environment['compute_capability']}) with TensorRT "
            f"{environment['tensorrt_version']}")
    plan_name, rebuild = Path(plan_path).name, rebuild_for(plan_path, metadata)
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
    rebuild = rebuild_for(plan_path, metadata)
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
                          f"{rebuild_for(Path(onnx_path), metadata)}")


def engine_metadata(*, plan_path: Path, plan_bytes: bytes, onnx_path: Path, environment: dict, profile: dict,
                    batch: tuple[int, int, int], builder_optimization_level: int, build_seconds: float,
                    timing_cache_path: Path | None, rebuild_command: str | None = None,
                    profiles: list[dict] | None = None, batch_ranges: list[tuple[int, int, int]] | None = None,
                    precision: str | None = None) -> dict:
    """The JSON written beside a plan; `profile`/`batch` describe the first optimization profile and
    `profiles`/`batch_profiles` all of them (one unless the build asked for several)."""
    import hashlib

    from .. import __version__

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


# ---------------------------------------------------------------------------------------- loading

def _device_scope(device):
    """Enters `device` (a CUDA torch device) for TensorRT calls, which act on the current device."""
    import contextlib

    import torch

    return torch.cuda.device(device) if device is not None else contextlib.nullcontext()


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
        for warning in check_engine_compatibility(meta, current_environment(device), plan_path):
            LOG.warning(f"warning: {warning}")
        if verify:
            verify_plan_file(plan_path, meta)
        if onnx_path is not None:
            check_onnx_unchanged(meta, onnx_path)
        try:
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        except Exception as e:  # the bindings raise for some broken plans instead of returning None
            raise EngineError(f"TensorRT could not deserialise {plan_path}: {summary(e)}; rebuild it with: "
                              f"{rebuild_for(plan_path, meta)}") from None
    if engine is None:
        raise EngineError(f"TensorRT could not deserialise {plan_path} (see its log above); rebuild it with: "
                          f"{rebuild_for(plan_path, meta)}")
    return runtime, engine, meta
