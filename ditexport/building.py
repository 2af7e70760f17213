"""`build` and `validate`: export -> validate -> engine into one export directory, skipped when up to date.

The manifest is the export's seal: it is removed before anything is rewritten and written last, so a
build that stops half-way leaves a directory that every reader treats as incomplete.
"""
from __future__ import annotations

import datetime
import json
import time
from pathlib import Path

from . import artifacts, locking, verification
from .artifacts import ArtifactError
from .errors import DitexportError
from .engine.profile import BatchProfile
from .engine.stage import add_missing_engines, engine_stage, recheck_engines
from .export import (DEFAULT_OPSET, GRAPHS, PRECISIONS, QUANT_PRECISIONS, CalibrationSettings, QuantRecipe,
                     export_graphs, io_spec)
from .model import DiT, DiTConfig
from .progress import heartbeat
from .settings import BuildSettings
from .source import ModelSource
from .logs import get_logger

LOG = get_logger("build")


def parse_precisions(text: str) -> tuple[str, ...]:
    """"fp32,fp16,int8" -> ("fp32", "fp16", "int8"); fp32 always comes along, being the graph the others are
    derived from and checked against."""
    asked = [p.strip() for p in text.split(",") if p.strip()]
    unknown = [p for p in asked if p not in PRECISIONS]
    if unknown or not asked:
        raise DitexportError(f"--precision takes a comma-separated list of {', '.join(PRECISIONS)}, got {text!r}")
    return tuple(p for p in PRECISIONS if p in asked or p == "fp32")


def build_flags(source: ModelSource, settings: BuildSettings, calibration: CalibrationSettings | None = None,
                recipe: QuantRecipe | None = None) -> list[str]:
    """The CLI flags that rebuild this export: the model's, then each build setting (and, for 8-bit graphs, each
    calibration and recipe setting) that is not its default."""
    flags = source.flags()
    for flag, name in (("--precision", "precisions"), ("--max-batch", "max_images"), ("--opset", "opset"),
                       ("--vae", "vae")):
        value = getattr(settings, name)
        if value != getattr(BuildSettings, name):
            flags += [flag, ",".join(value) if isinstance(value, tuple) else str(value)]
    if any(p in QUANT_PRECISIONS for p in settings.precisions):
        calibration, recipe = calibration or CalibrationSettings(), recipe or QuantRecipe()
        for flag, value, default in (("--calib-images", calibration.images, CalibrationSettings.images),
                                     ("--calib-steps", calibration.steps, CalibrationSettings.steps),
                                     ("--calib-amax", recipe.activation_amax, QuantRecipe.activation_amax),
                                     ("--smoothquant", recipe.smoothquant_alpha, QuantRecipe.smoothquant_alpha),
                                     ("--quantize", ",".join(recipe.layers), ",".join(QuantRecipe.layers))):
            if value != default:
                flags += [flag, str(value)]
    return flags


def quantization_inputs(precisions, calibration: CalibrationSettings | None, recipe: QuantRecipe | None) -> dict | None:
    """The recipe and calibration settings of an export's 8-bit graphs (None without any)."""
    if not any(p in QUANT_PRECISIONS for p in precisions):
        return None
    return {"recipe": (recipe or QuantRecipe()).to_dict(),
            "calibration": (calibration or CalibrationSettings()).to_dict()}


# ----------------------------------------------------------------------------------------- sources

def check_source(manifest: dict, export_dir: Path, *, model: str | None = None, checkpoint: str | None = None,
                 config: str | None = None, image_size: int | None = None) -> None:
    """Refuses an export that was not built from the model the user named (validate's model flags)."""
    from .model import get_config
    from .source import checkpoint_sha256

    source = manifest.get("source") or {}
    built = artifacts.describe_config(DiTConfig.from_dict(manifest["config"]))
    if checkpoint is not None:
        recorded = (source.get("checkpoint") or {}).get("sha256")
        if not Path(checkpoint).exists():
            raise ArtifactError(f"--checkpoint {checkpoint}: no such file or directory")
        if recorded != checkpoint_sha256(checkpoint):
            where = (source.get("checkpoint") or {}).get("path") or f"{source.get('kind')} weights"
            raise ArtifactError(f"{export_dir} was built from {where}, not from --checkpoint {checkpoint} "
                                "(SHA-256 differs); pass the export of that checkpoint with --export-dir")
        return
    if model is None and config is None and image_size is None:
        return
    name = model or "digits"
    if source.get("model") != name:
        from .model import DIT_CONFIGS

        wanted = f" ({artifacts.describe_config(get_config(name, image_size=image_size))})" if name in DIT_CONFIGS \
            else ""
        raise ArtifactError(f"{export_dir} was built from {source.get('model') or 'a checkpoint'} ({built}), "
                            f"not --model {name}{wanted}, another model config; pass its export with --export-dir")
    if source.get("kind") == "random" and image_size is not None:
        wanted = get_config(name, image_size=image_size)
        if wanted != DiTConfig.from_dict(manifest["config"]):
            raise ArtifactError(f"{export_dir} was built for {built}, not {artifacts.describe_config(wanted)}; "
                                "pass its export with --export-dir")


# ------------------------------------------------------------------------------------------- build

def build_inputs(config: DiTConfig, source: dict, precisions, max_images: int, opset: int,
                 vae: dict | None = None, quantization: dict | None = None) -> dict:
    """Everything that decides an export's bytes; equal inputs mean the build can be skipped. `vae` is the
    manifest's record of the VAE decoder exported beside the DiT; `quantization` the 8-bit recipe and calibration."""
    if source.get("checkpoint"):
        weights = source["checkpoint"]["sha256"]
    else:
        weights = source.get("weights_sha256") or f"random weights, seed {source.get('seed')}"
    inputs = {"manifest_format": artifacts.MANIFEST_FORMAT, "config": config.to_dict(), "weights": weights,
              "precisions": list(precisions), "graphs": list(GRAPHS), "max_images": max_images, "opset": opset,
              "tools": artifacts.tool_versions()}
    if vae is not None:
        inputs["vae"] = vae["source"]["sha256"]
    if quantization is not None:
        inputs["quantization"] = quantization
    return inputs


def up_to_date(export_dir: Path, inputs: dict, log=LOG.info) -> str | None:
    """Why the export in `export_dir` can be reused (None when it must be rebuilt)."""
    try:
        manifest = artifacts.read_manifest(export_dir)
    except ArtifactError:
        return None
    if manifest.get("inputs") != inputs or not manifest.get("validation", {}).get("passed"):
        return None
    with heartbeat(log, f"build: checking the SHA-256 of {len(manifest['files'])} files in {export_dir}"):
        if verification.verify_files(export_dir, manifest["files"],
                                     manifest_sha=verification.manifest_digest(export_dir)):
            return None
    return f"validated {manifest.get('created', '')}, {len(manifest['files'])} files match their hashes"


def _outputs(export_dir: Path) -> list[Path]:
    """What a previous build made, deleted before a rebuild so no stale graph or engine survives."""
    return [path for pattern in ("model*.onnx", "model*.onnx.data", "cond*.onnx", "cond*.onnx.data", "vae*.onnx",
                                 "vae*.onnx.data", "*.plan", "*.plan.json", artifacts.REPORT_NAME)
            for path in export_dir.glob(pattern)]


def _remove_outputs(export_dir: Path) -> None:
    for path in _outputs(export_dir):
        path.unlink()


def _check_free_space(export_dir: Path, model: DiT, precisions, reclaimed: int = 0) -> None:
    """Refuses, before anything is deleted or written, a disk that cannot hold the graphs: a lower bound of
    4 bytes per parameter per fp32 graph, 2 per fp16 graph and 1 per 8-bit graph (int8: 2, with its CPU form;
    xty and cond each), against the free space plus what the rebuild deletes (`reclaimed` bytes)."""
    import shutil

    per_parameter = {"fp32": 4, "fp16": 2, "int8": 2, "fp8": 1}
    params = sum(p.numel() for p in model.parameters())
    need = params * len(GRAPHS) * sum(per_parameter[p] for p in precisions)
    existing = next(p for p in (export_dir, *export_dir.parents) if p.exists())
    have = shutil.disk_usage(existing).free + reclaimed
    if need > have:
        raise ArtifactError(f"not enough space in {export_dir}: the graphs need at least {need / 1e6:.1f} MB, "
                            f"{have / 1e6:.1f} MB are free; free some space or pass another --export-dir")


def build_export(model: DiT, source: dict, export_dir: str | Path, settings: BuildSettings = BuildSettings(), *,
                 model_name: str = "", rebuild_command: str | None = None, build_flags: list[str] | None = None,
                 engines: bool = True, calibration: CalibrationSettings | None = None,
                 recipe: QuantRecipe | None = None, log=LOG.info) -> bool:
    """Export -> validate -> engine; returns whether the ONNX graphs passed validation (or were up to date). A failed
    engine stage keeps the validated ONNX export and discards only its plans: the manifest's engine entry says so.

    Holds the export directory's build lock throughout (another build waits, or with settings.wait=False is
    refused); an up-to-date export is only read, so it may sit on a read-only file system. engines=False leaves the
    TensorRT stage out (an up-to-date export then gets no missing engines either). `calibration` and `recipe` shape
    the int8/fp8 graphs (export/calibrate.py, export/quantize.py); they are checked before anything runs.
    """
    export_dir = Path(export_dir)
    precisions = settings.precisions
    if any(p in QUANT_PRECISIONS for p in precisions):
        (calibration or CalibrationSettings()).check()
        (recipe or QuantRecipe()).check()
    created = not export_dir.exists()
    if created:  # refuse a full or unwritable disk before a directory appears
        _check_free_space(export_dir, model, precisions)
        artifacts.ensure_writable_dir(export_dir)
    try:
        with locking.build_lock(export_dir, wait=settings.wait, log=log):
            return _build_locked(model, source, export_dir, precisions=precisions, max_images=settings.max_images,
                                 opset=settings.opset or DEFAULT_OPSET, force=settings.force,
                                 sample_steps=settings.sample_steps, model_name=model_name, build_flags=build_flags,
                                 vae_dir=settings.vae, engines=engines, calibration=calibration, recipe=recipe,
                                 log=log,
                                 rebuild_command=rebuild_command or artifacts.rebuild_command(export_dir, build_flags))
    except BaseException:
        if created:  # a build that made its directory and failed leaves nothing behind
            import shutil

            shutil.rmtree(export_dir, ignore_errors=True)
        raise


def _build_locked(model: DiT, source: dict, export_dir: Path, *, precisions, max_images: int, opset: int,
                  force: bool, sample_steps, model_name: str, build_flags, rebuild_command: str, vae_dir,
                  engines: bool, calibration: CalibrationSettings | None, recipe: QuantRecipe | None, log) -> bool:
    start = time.perf_counter()
    from .vae import export_vae_graphs, load_fitting_vae

    vae, vae_record = load_fitting_vae(vae_dir, model.config) if vae_dir else (None, None)  # before anything goes
    inputs = build_inputs(model.config, source, precisions, max_images, opset, vae_record,
                          quantization_inputs(precisions, calibration, recipe))
    profile = BatchProfile.for_images(max_images, guided=model.config.has_null_class)
    writable = artifacts.write_problem(export_dir) is None
    if writable and (removed := locking.remove_stale_temporaries(export_dir, legacy=True)):
        log(f"build: removed {len(removed)} temporary file(s) left by a build that did not finish: "
            f"{', '.join(sorted(removed))}")
    if not force and (why := up_to_date(export_dir, inputs, log)):
        log(f"{export_dir}: up to date ({why}); use --force to rebuild")
        if not writable or not engines:
            return True  # read-only: nothing is written, not even this machine's engines
        return add_missing_engines(export_dir, model, precisions, profile, log, rebuild_command)
    artifacts.ensure_writable_dir(export_dir)
    _check_free_space(export_dir, model, precisions, sum(p.stat().st_size for p in _outputs(export_dir)))
    locking.mark_writer(export_dir)
    artifacts.remove_manifest(export_dir)
    _remove_outputs(export_dir)
    log(f"build: {model_name} -> {export_dir} ({', '.join(precisions)}; opset {opset}; "
        f"up to {max_images} images per request)")
    artifacts.fault_point("build:old-export-removed")
    try:
        paths = export_graphs(model, export_dir, precisions=precisions, opset=opset, calibration=calibration,
                              recipe=recipe, log=log)
        if vae is not None:
            vae_paths = export_vae_graphs(vae, export_dir, latent_size=vae_record["latent_size"], opset=opset,
                                          precisions=[p for p in ("fp32", "fp16") if p in precisions], log=log)
            paths.update({(artifacts.VAE_GRAPH, p): path for p, path in vae_paths.items()})
        report = _validate_and_report(export_dir, model, model_name, sample_steps, opset, log, vae)
        if report.passed and engines:
            engine = engine_stage(export_dir, model, precisions, profile, log, rebuild_command)
        else:
            engine = {"status": "skipped", "reason": "not asked for" if report.passed else "validation failed"}
            log(f"engine: skipped — {engine['reason']}")
        files, keys = {}, {}
        with heartbeat(log, "build: hashing the files for the manifest"):
            for path in sorted(paths.values()):
                for f in (path, *artifacts.external_data_files(path)):
                    digest, keys[f.name] = verification.hash_file(f)
                    files[f.name] = {"size": f.stat().st_size, "sha256": digest}
        manifest = {
            "format": artifacts.MANIFEST_FORMAT,
            "name": export_dir.name,
            "model": source.get("model"),
            "source": source,
            "config": model.config.to_dict(),
            "build_flags": list(build_flags or []),
            "inputs": inputs,
            "io_spec": io_spec(model.config, max_images, opset),
            "graphs": [{"graph": key[0], "precision": key[1], **({"form": key[2]} if len(key) > 2 else {}),
                        "file": path.name} for key, path in paths.items()],
            "quantization": _quantization_records(paths),
            "files": files,
            "validation": {"passed": report.passed, "report": artifacts.REPORT_NAME},
            "engine": engine,
            **({"vae": vae_record} if vae_record else {}),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
        artifacts.write_manifest(export_dir, manifest)
    except OSError as e:
        # A full or failing disk: the export stays incomplete (no manifest) and every temporary is gone.
        import errno
        import shutil

        cause = f"{e.strerror or e}" + (f" ({e.filename})" if e.filename else "")
        free = shutil.disk_usage(export_dir).free
        if e.errno != errno.ENOSPC and free < 1 << 20:  # some writers (numpy's) report a full disk without errno
            cause += f"; its file system is full ({free} bytes free)"
        raise ArtifactError(f"writing the export into {export_dir} failed: {cause}; "
                            "nothing was published as an export") from None
    verification.remember(export_dir, keys)
    verdict = "FAILED" if not report.passed else "done, without TensorRT engines" if engine["status"] == "failed" \
        else "done"
    log(f"build: {verdict} in {manifest['build_seconds']:.1f} s; manifest {export_dir / artifacts.MANIFEST_NAME}")
    return report.passed


def _quantization_records(paths: dict) -> dict:
    """Per 8-bit graph file: its recipe, calibration and scales' hash, as the graph's metadata records them."""
    from .export import quantization_record

    records = {}
    for key, path in paths.items():
        if key[1] in QUANT_PRECISIONS:
            records[path.name] = quantization_record(path)
    return records


def _validate_and_report(export_dir: Path, model: DiT, model_name: str, sample_steps, opset, log, vae=None):
    from .validate import validate_export

    report = validate_export(export_dir, model, model_name=model_name, sample_steps=sample_steps, opset=opset,
                             vae=vae, log=log)
    artifacts.atomic_write_json(export_dir / artifacts.REPORT_NAME, report.to_dict())
    log(report.format())
    return report


# ---------------------------------------------------------------------------------------- validate

def revalidate(export_dir: str | Path, *, sample_steps: int | None = None, rebuild: str | None = None,
               wait: bool = True, log=LOG.info) -> bool:
    """Re-runs validation of an existing export against the model it came from; updates report and manifest.

    Refuses up front, in one line, an export it could not write its report into (before minutes of work).
    """
    export_dir = Path(export_dir)
    manifest = artifacts.read_manifest(export_dir, rebuild)
    rebuild = rebuild or artifacts.rebuild_command(export_dir, artifacts.manifest_flags(manifest))
    problem = artifacts.write_problem(export_dir)
    if problem:
        raise ArtifactError(f"validate writes {artifacts.REPORT_NAME} and {artifacts.MANIFEST_NAME} into "
                            f"{export_dir}, which cannot be written ({problem}); validate a writable copy")
    with locking.build_lock(export_dir, wait=wait, log=log):
        manifest = artifacts.read_manifest(export_dir, rebuild)  # as it is now that no build is running
        problems = verification.verify_files(export_dir, manifest["files"])
        if problems:
            raise ArtifactError(f"{export_dir}: {'; '.join(problems)}; rebuild with: {rebuild}")
        model = ModelSource.from_manifest(manifest).load_recorded(manifest, rebuild, export_dir)
        name = manifest.get("model") or Path((manifest["source"].get("checkpoint") or {}).get("path", "")).name
        from .validate import report_differences

        previous = _read_report(export_dir)
        from .vae import recorded_vae

        report = _validate_and_report(export_dir, model, name, sample_steps, manifest["io_spec"].get("opset"), log,
                                      recorded_vae(manifest, rebuild))
        if previous is not None:
            differences = report_differences(previous, report.to_dict())
            if differences:
                log(f"note: the {artifacts.REPORT_NAME} this run replaced differed from it: "
                    f"{'; '.join(differences[:5])}" + (f"; ... ({len(differences)} in all)" if len(differences) > 5
                                                         else ""))
        manifest["validation"] = {"passed": report.passed, "report": artifacts.REPORT_NAME,
                                  "revalidated": datetime.datetime.now(datetime.timezone.utc).isoformat(
                                      timespec="seconds")}
        manifest["engine"] = recheck_engines(export_dir, model, manifest.get("engine") or {}, log, rebuild)
        artifacts.write_manifest(export_dir, manifest)
    return report.passed


def _read_report(export_dir: Path) -> dict | None:
    try:
        report = json.loads((export_dir / artifacts.REPORT_NAME).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return {}  # unreadable: every verdict below differs
    return report if isinstance(report, dict) else {}


def ensure_export(model: DiT, source: dict, export_dir: str | Path, *, model_name: str = "",
                  sample_steps: int | None = None, engines: bool = True, precisions=BuildSettings.precisions,
                  calibration: CalibrationSettings | None = None, log=LOG.info) -> tuple[Path, dict]:
    """The validated export of `model` in `export_dir`, as `build` makes it (of `precisions`), built there first
    when there is none.

    An existing export is reused whatever options built it; one of another config or other weights, or one
    that failed validation, is refused with a one-line error, never overwritten. engines=False builds it
    without the TensorRT stage (gpu-check builds its own engine).
    """
    export_dir = Path(export_dir)
    cached = (export_dir / artifacts.MANIFEST_NAME).is_file()
    if not cached:
        log(f"{export_dir}: no complete export yet; building it as `python -m ditexport build` would")
        build_export(model, source, export_dir, BuildSettings(precisions=tuple(precisions), sample_steps=sample_steps),
                     model_name=model_name, engines=engines, calibration=calibration, log=log)
    # Each consumer verifies the files it opens, so one damaged graph fails its own bench row, not the bench.
    manifest = verification.verify_export(export_dir, [], config=model.config, all_sizes=False).manifest
    weights = build_inputs(model.config, source, (), 0, 0)["weights"]
    if manifest.get("inputs", {}).get("weights") != weights:
        raise ArtifactError(f"the export in {export_dir} was built from other weights than {model_name or 'this model'}"
                            "; pass another --export-dir, or rebuild it with: python -m ditexport build --force")
    if cached:
        log(f"{export_dir}: found cached ONNX export, validated {manifest.get('created', '(date unknown)')}")
    return export_dir, manifest
