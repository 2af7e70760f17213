"""`build` and `validate`: export -> validate -> engine into one export directory, skipped when up to date.

The manifest is the export's seal: it is removed before anything is rewritten and written last, so a
build that stops half-way leaves a directory that every reader treats as incomplete.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from . import artifacts
from .artifacts import ArtifactError, onnx_filename
from .checkpoint import sha256_file
from .errors import DitexportError
from .export import DEFAULT_MAX_BATCH_IMAGES, DEFAULT_OPSET, GRAPHS, PRECISIONS, BatchProfile, export_graphs, io_spec
from .model import DiT, DiTConfig
from .progress import heartbeat


def parse_precisions(text: str) -> tuple[str, ...]:
    """"fp32,fp16" -> ("fp32", "fp16"); fp32 always comes along, being the graph fp16 is checked against."""
    asked = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PRECISIONS]
    if unknown or not asked:
        raise DitexportError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)}, got {text!r}")
    return tuple(p for p in PRECISIONS if p in asked or p == "fp32")


# ----------------------------------------------------------------------------------------- sources

def describe_source(model_name: str | None, checkpoint: str | Path | None, seed: int = 0) -> dict:
    """Where the weights come from, with their SHA-256 where a file holds them."""
    from .model import DIT_CONFIGS
    from .zoo import BUILTIN_MODELS, builtin_weights

    if checkpoint is not None:
        path = Path(checkpoint).resolve()
        return {"kind": "checkpoint", "model": None, "checkpoint": {"path": str(path), "sha256": sha256_file(path)}}
    name = model_name or "digits"
    if name in BUILTIN_MODELS:
        return {"kind": "builtin", "model": name, "checkpoint": None,
                "weights_sha256": sha256_file(builtin_weights(name))}
    if name in DIT_CONFIGS:
        return {"kind": "random", "model": name, "checkpoint": None, "seed": seed}
    raise DitexportError(f"unknown model {name!r}")


def load_reference(manifest: dict) -> DiT:
    """The torch model an export was built from, refusing weights that changed since."""
    from .checkpoint import load_checkpoint
    from .model import create_model
    from .zoo import builtin_weights, load_builtin

    source, config = manifest["source"], DiTConfig.from_dict(manifest["config"])
    if source["kind"] == "builtin":
        if sha256_file(builtin_weights(source["model"])) != source["weights_sha256"]:
            raise ArtifactError(f"the weights of built-in model {source['model']!r} changed since this export; "
                                f"rebuild with: python -m ditexport build --model {source['model']} --force")
        return load_builtin(source["model"])
    if source["kind"] == "random":
        return create_model(config, seed=source["seed"])
    path, sha = source["checkpoint"]["path"], source["checkpoint"]["sha256"]
    if not Path(path).is_file():
        raise ArtifactError(f"the checkpoint this export came from is gone ({path}); validation needs it")
    if sha256_file(path) != sha:
        raise ArtifactError(f"{path} changed since this export (SHA-256 differs); rebuild with --force")
    return load_checkpoint(path, config)


# ------------------------------------------------------------------------------------------- build

def build_inputs(config: DiTConfig, source: dict, precisions, max_images: int, opset: int) -> dict:
    """Everything that decides an export's bytes; equal inputs mean the build can be skipped."""
    if source.get("checkpoint"):
        weights = source["checkpoint"]["sha256"]
    else:
        weights = source.get("weights_sha256") or f"random weights, seed {source.get('seed')}"
    return {"manifest_format": artifacts.MANIFEST_FORMAT, "config": config.to_dict(), "weights": weights,
            "precisions": list(precisions), "graphs": list(GRAPHS), "max_images": max_images, "opset": opset,
            "tools": artifacts.tool_versions()}


def up_to_date(export_dir: Path, inputs: dict, log=print) -> str | None:
    """Why the export in `export_dir` can be reused (None when it must be rebuilt)."""
    try:
        manifest = artifacts.read_manifest(export_dir)
    except ArtifactError:
        return None
    if manifest.get("inputs") != inputs or not manifest.get("validation", {}).get("passed"):
        return None
    with heartbeat(log, f"build: checking the SHA-256 of {len(manifest['files'])} files in {export_dir}"):
        if artifacts.verify_files(export_dir, manifest["files"]):
            return None
    return f"validated {manifest.get('created', '')}, {len(manifest['files'])} files match their hashes"


def _remove_outputs(export_dir: Path) -> None:
    """Deletes what a previous build made, so no stale graph or engine survives next to the new ones."""
    for pattern in ("model*.onnx", "model*.onnx.data", "cond*.onnx", "cond*.onnx.data", "*.plan", "*.plan.json",
                    artifacts.REPORT_NAME):
        for path in export_dir.glob(pattern):
            path.unlink()


def _engine_stage(export_dir: Path, precisions, profile: BatchProfile, log, rebuild_command: str | None = None) -> dict:
    """TensorRT engines from the fp16 graphs (fp32 when fp16 is not built), where TensorRT and a GPU exist."""
    try:
        from . import engine
    except ImportError:
        reason = "the TensorRT stage (ditexport.engine) is not part of this installation"
    else:
        reason = engine.tensorrt_unavailable_reason()
    if reason:
        log(f"engine: skipped — {reason}")
        return {"status": "skipped", "reason": reason}
    precision = "fp16" if "fp16" in precisions else "fp32"
    plans = {}
    for graph, stem in (("xty", "model"), ("cond", "cond")):
        onnx_path = export_dir / onnx_filename(graph, precision)
        plan_path = engine.plan_path_for(export_dir, stem)
        start = time.perf_counter()
        with heartbeat(log, f"engine: building {plan_path.name} from {onnx_path.name}"):
            meta = engine.build_engine(onnx_path, plan_path, min_batch=profile.min, opt_batch=profile.opt,
                                       max_batch=profile.max, rebuild_command=rebuild_command)
        log(f"engine: {plan_path.name} from {onnx_path.name} ({time.perf_counter() - start:.1f} s)")
        plans[stem] = {"plan": plan_path.name, "onnx": onnx_path.name,
                       "tensorrt_version": meta.get("tensorrt_version"), "gpu_name": meta.get("gpu_name")}
    return {"status": "built", "plans": plans}


def build_export(model: DiT, source: dict, export_dir: str | Path, *, precisions=PRECISIONS,
                 max_images: int = DEFAULT_MAX_BATCH_IMAGES, opset: int | None = None, force: bool = False,
                 sample_steps: int | None = None, model_name: str = "", rebuild_command: str | None = None,
                 log=print) -> int:
    """Export -> validate -> engine; returns the exit code (0 passed or up to date, 1 validation failed)."""
    start = time.perf_counter()
    opset = opset or DEFAULT_OPSET
    export_dir = artifacts.ensure_writable_dir(export_dir)
    inputs = build_inputs(model.config, source, precisions, max_images, opset)
    profile = BatchProfile.for_images(max_images, guided=model.config.has_null_class)
    if not force and (why := up_to_date(export_dir, inputs, log)):
        log(f"{export_dir}: up to date ({why}); use --force to rebuild")
        return _add_missing_engines(export_dir, model, precisions, profile, log, rebuild_command)
    artifacts.remove_manifest(export_dir)
    _remove_outputs(export_dir)
    log(f"build: {model_name} -> {export_dir} ({', '.join(precisions)}; opset {opset}; "
        f"up to {max_images} images per request)")
    paths = export_graphs(model, export_dir, precisions=precisions, opset=opset, log=log)
    report = _validate_and_report(export_dir, model, model_name, sample_steps, opset, log)
    engine = (_engine_stage(export_dir, precisions, profile, log, rebuild_command) if report.passed
              else {"status": "skipped", "reason": "validation failed"})
    if not report.passed:
        log("engine: skipped — validation failed")
    elif engine["status"] == "built":
        _check_engines(export_dir, model, report, log)
    files = {}
    with heartbeat(log, "build: hashing the files for the manifest"):
        for path in sorted(paths.values()):
            for f in (path, *artifacts.external_data_files(path)):
                files[f.name] = artifacts.file_record(f)
    manifest = {
        "format": artifacts.MANIFEST_FORMAT,
        "name": export_dir.name,
        "model": source.get("model"),
        "source": source,
        "checkpoint": source.get("checkpoint"),
        "config": model.config.to_dict(),
        "inputs": inputs,
        "tools": inputs["tools"],
        "io_spec": io_spec(model.config, max_images, opset),
        "graphs": [{"graph": g, "precision": p, "file": path.name} for (g, p), path in paths.items()],
        "files": files,
        "validation": {"passed": report.passed, "report": artifacts.REPORT_NAME},
        "engine": engine,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "build_seconds": round(time.perf_counter() - start, 1),
    }
    artifacts.write_manifest(export_dir, manifest)
    log(f"build: {'done' if report.passed else 'FAILED'} in {manifest['build_seconds']:.1f} s; "
        f"manifest {export_dir / artifacts.MANIFEST_NAME}")
    return 0 if report.passed else 1


def _check_engines(export_dir: Path, model: DiT, report, log) -> None:
    """ONNX Runtime vs the new TensorRT engines (Polygraphy), added to the report written beside them."""
    from .validate import tensorrt_parity

    report.tensorrt = tensorrt_parity(export_dir, model, log=log)
    artifacts.atomic_write_json(export_dir / artifacts.REPORT_NAME, report.to_dict())
    print(report.format())


def _add_missing_engines(export_dir: Path, model: DiT, precisions, profile: BatchProfile, log,
                         rebuild_command: str | None) -> int:
    """An export validated where TensorRT was missing gets this machine's engines on its next build here."""
    from . import engine

    if engine.tensorrt_unavailable_reason() is not None:
        return 0
    if all(engine.plan_path_for(export_dir, stem).is_file() for stem in ("model", "cond")):
        return 0
    manifest = artifacts.read_manifest(export_dir)
    log(f"engine: {export_dir} has no engine for this GPU and TensorRT version; building it")
    manifest["engine"] = _engine_stage(export_dir, precisions, profile, log, rebuild_command)
    from .validate import tensorrt_parity

    manifest["engine"]["parity"] = parity = tensorrt_parity(export_dir, model, log=log)
    artifacts.write_manifest(export_dir, manifest)
    return 0 if parity.get("passed", True) else 1


def _validate_and_report(export_dir: Path, model: DiT, model_name: str, sample_steps, opset, log):
    from .validate import validate_export

    report = validate_export(export_dir, model, model_name=model_name, sample_steps=sample_steps, opset=opset,
                             log=log)
    artifacts.atomic_write_json(export_dir / artifacts.REPORT_NAME, report.to_dict())
    print(report.format())
    return report


# ---------------------------------------------------------------------------------------- validate

def revalidate(export_dir: str | Path, *, sample_steps: int | None = None, log=print) -> int:
    """Re-runs validation of an existing export against the model it came from; updates report and manifest."""
    export_dir = Path(export_dir)
    manifest = artifacts.read_manifest(export_dir)
    problems = artifacts.verify_files(export_dir, manifest["files"])
    if problems:
        raise ArtifactError(f"{export_dir}: {'; '.join(problems)}; rebuild with: python -m ditexport build --force")
    model = load_reference(manifest)
    name = manifest.get("model") or Path(manifest["source"].get("checkpoint", {}).get("path", "")).name
    report = _validate_and_report(export_dir, model, name, sample_steps, manifest["io_spec"].get("opset"), log)
    manifest["validation"] = {"passed": report.passed, "report": artifacts.REPORT_NAME,
                              "revalidated": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                  timespec="seconds")}
    artifacts.write_manifest(export_dir, manifest)
    return 0 if report.passed else 1


def ensure_export(model: DiT, source: dict, export_dir: str | Path, *, model_name: str = "",
                  sample_steps: int | None = None, log=print) -> tuple[Path, dict]:
    """The validated export of `model` in `export_dir`, as `build` makes it, built there first when there is none.

    An existing export is reused whatever options built it; one of another config or other weights, or one
    that failed validation, is refused with a one-line error, never overwritten.
    """
    export_dir = Path(export_dir)
    cached = (export_dir / artifacts.MANIFEST_NAME).is_file()
    if not cached:
        log(f"{export_dir}: no complete export yet; building it as `python -m ditexport build` would")
        build_export(model, source, export_dir, model_name=model_name, sample_steps=sample_steps, log=log)
    export_dir, manifest = export_for_backend(export_dir, model.config)
    weights = build_inputs(model.config, source, (), 0, 0)["weights"]
    if manifest.get("inputs", {}).get("weights") != weights:
        raise ArtifactError(f"the export in {export_dir} was built from other weights than {model_name or 'this model'}"
                            "; pass another --export-dir, or rebuild it with: python -m ditexport build --force")
    if cached:
        log(f"{export_dir}: found cached ONNX export, validated {manifest.get('created', '(date unknown)')}")
    return export_dir, manifest


def export_for_backend(export_dir: str | Path, config: DiTConfig | None = None) -> tuple[Path, dict]:
    """A validated export directory and its manifest, for `sample --backend onnxruntime`; else a clear error."""
    export_dir = Path(export_dir)
    manifest = artifacts.read_manifest(export_dir)
    if not manifest.get("validation", {}).get("passed"):
        raise ArtifactError(f"the export in {export_dir} failed validation (see {artifacts.REPORT_NAME}); "
                            "rebuild it with: python -m ditexport build --force")
    if config is not None and DiTConfig.from_dict(manifest["config"]) != config:
        raise ArtifactError(f"the export in {export_dir} was built for another model config "
                            f"({json.dumps(manifest['config'])}); pass the matching --model/--checkpoint "
                            "or --export-dir")
    return export_dir, manifest
