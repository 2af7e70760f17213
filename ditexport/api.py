"""The public API: load a model, build its validated export, open an export, and sample from it.

    import ditexport

    export = ditexport.build("digits", "exports/digits")                    # export -> validate -> engines
    pipe = ditexport.Pipeline.from_export("exports/digits", backend="onnxruntime")
    images = pipe(class_labels=[3, 1, 4], num_steps=10, sampler="dpmpp-2m").images   # PIL images

Every command of `python -m ditexport` is an adapter over these functions. They never print: they log to the
"ditexport" logger and raise `DitexportError` subclasses.
"""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from .artifacts import REPORT_NAME, ArtifactError, ExportEntry, default_export_dir, rebuild_command
from .errors import DitexportError
from .settings import BuildSettings


class ValidationFailedError(DitexportError):
    """An export whose graphs were built but did not pass validation; `export` is what was written."""

    def __init__(self, message: str, export: "Export"):
        super().__init__(message)
        self.export = export


#################################################################################
#                                    Models                                     #
#################################################################################

def load_model(model="digits", *, image_size: int | None = None, config: str | None = None, seed: int = 0):
    """The torch DiT (eval mode, CPU, float32) named by `model`: "digits" (built in), a registry config such as
    "DiT-XL/2" (seeded random weights, `image_size` 256 or 512), or the path of a checkpoint file (official `.pt`,
    `train.py` checkpoint, `.safetensors`) or directory (diffusers layout); `config` names the config of a checkpoint
    whose shapes do not decide it."""
    from .source import ModelSource, remember_source

    source = ModelSource.named(model, image_size=image_size, config=config, seed=seed)
    return remember_source(source.load(), source)


def _source_and_model(model_or_source, image_size, config):
    """(ModelSource or None, DiT) of what `build` was given: a name or path, a ModelSource, or a DiT."""
    from .model import DiT
    from .source import ModelSource, source_of

    if isinstance(model_or_source, DiT):
        return source_of(model_or_source), model_or_source
    if isinstance(model_or_source, ModelSource):
        return model_or_source, model_or_source.load()
    source = ModelSource.named(model_or_source, image_size=image_size, config=config)
    return source, source.load()


#################################################################################
#                                    Exports                                    #
#################################################################################

class Export(ExportEntry):
    """One complete export directory: its manifest (`path`, `manifest`, `name`, `graph_path` of `ExportEntry`), its
    validation report, and the runtimes that can run it."""

    @property
    def config(self):
        """The DiTConfig the graphs were exported from."""
        from .model import DiTConfig

        return DiTConfig.from_dict(self.manifest["config"])

    @property
    def passed(self) -> bool:
        """Whether the graphs passed validation (TensorRT parity, which concerns the plans only, is not part of it)."""
        return self.validated

    @property
    def engine(self) -> dict:
        """The TensorRT stage's entry: status "built" (with "plans" and "parity"), "skipped" or "failed" (with
        "reason" and the "retry" command); a failed engine stage never fails the ONNX graphs."""
        return self.manifest.get("engine") or {"status": "skipped", "reason": "not recorded"}

    @property
    def report(self) -> dict:
        """The validation report (report.json) as a dict."""
        try:
            return json.loads((self.path / REPORT_NAME).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactError(f"cannot read {self.path / REPORT_NAME}: {e}") from None

    @property
    def precisions(self) -> list[str]:
        """The precisions of the (x, t, y) graph this export has."""
        return [g["precision"] for g in self.manifest.get("graphs", []) if g.get("graph") == "xty"]

    @property
    def files(self) -> dict[str, Path]:
        """Every file the manifest lists, by name."""
        return {name: self.path / name for name in self.manifest.get("files", {})}

    def graph(self, graph: str = "xty", precision: str = "fp32") -> Path | None:
        """The ONNX file of a graph ("xty", "cond" or "vae") in a precision, when the export has it."""
        return self.graph_path(graph, precision)

    def backend(self, kind: str = "onnxruntime", precision: str = "fp32", **options):
        """A backend running this export (`ditexport.backends.open.open_export_backend`): "onnxruntime",
        "tensorrt", or "torch" (the weights it was built from). options: device, max_batch, threads."""
        from .backends.open import open_export_backend

        return open_export_backend(self.path, kind, precision, **options)

    def pipeline(self, backend: str = "onnxruntime", precision: str = "fp32", **options):
        """`Pipeline.from_export` of this export."""
        from .pipeline import Pipeline

        return Pipeline.from_export(self.path, backend, precision, **options)

    def validate(self, *, sample_steps: int | None = BuildSettings.sample_steps, wait: bool = BuildSettings.wait,
                 log=None) -> "Export":
        """Re-checks the files' hashes and re-runs the validation against the model the export was built from;
        returns the export with its new report, or raises ValidationFailedError."""
        from .building import revalidate

        passed = revalidate(self.path, sample_steps=sample_steps, wait=wait, **({"log": log} if log else {}))
        export = open_export(self.path)
        if not passed:
            raise ValidationFailedError(f"the export in {self.path} failed validation (see "
                                        f"{self.path / REPORT_NAME})", export)
        return export


def open_export(export_dir: str | Path) -> Export:
    """The complete export in `export_dir`, every listed file present with its recorded size; a failed validation
    is reported by `Export.passed` (backends refuse such an export)."""
    from .verification import verify_export

    entry = verify_export(export_dir, [], require_validated=False)
    return Export(Path(export_dir), entry.manifest)


def build(model="digits", export_dir: str | Path | None = None, *, precisions=BuildSettings.precisions,
          max_images: int = BuildSettings.max_images, opset: int = BuildSettings.opset,
          sample_steps: int | None = BuildSettings.sample_steps, vae: str | Path | None = BuildSettings.vae,
          force: bool = BuildSettings.force, wait: bool = BuildSettings.wait, calibration=None, recipe=None,
          image_size: int | None = None, config: str | None = None, log=None) -> Export:
    """Exports `model` (a name or path as for `load_model`, a `ModelSource`, or a DiT) to ONNX in `export_dir`
    (default: exports/<model name>), validates every graph against torch fp32 and builds TensorRT engines where
    TensorRT and a GPU exist; reuses an up-to-date export. A latent model's VAE decoder (`vae`, by default a
    diffusers model directory's own vae/) is exported, validated and compiled beside it. Returns the `Export`; raises
    ValidationFailedError when validation failed, other `DitexportError`s when nothing could be built. `log`
    receives progress lines (default: the "ditexport.build" logger). The int8/fp8 graphs of `precisions` are
    calibrated by `calibration` (`ditexport.precisions.CalibrationSettings`) and quantized by `recipe` (`QuantRecipe`),
    their defaults where None (docs/quantization.md)."""
    from .building import build_export, build_flags, parse_precisions
    from .source import module_source_manifest

    precisions = parse_precisions(precisions if isinstance(precisions, str) else ",".join(precisions))
    settings = BuildSettings(precisions=precisions, max_images=max_images, opset=opset,
                             sample_steps=sample_steps, vae=None if vae is None else str(vae), force=force, wait=wait)
    source, dit = _source_and_model(model, image_size, config)
    if vae is None and source is not None and (own := source.default_vae()) is not None:
        settings = replace(settings, vae=str(own))  # a diffusers model directory decodes with its own vae/
    if export_dir is None:
        if source is None:
            raise DitexportError("name an export_dir for a DiT given in memory")
        export_dir = default_export_dir(source.model, source.checkpoint, image_size=source.image_size)
    export_dir = Path(export_dir)
    flags = build_flags(source, settings, calibration, recipe) if source is not None else []
    manifest_source = source.to_manifest() if source is not None else module_source_manifest(dit)
    passed = build_export(dit, manifest_source, export_dir, settings, calibration=calibration, recipe=recipe,
                          model_name=source.name if source is not None else "DiT",
                          rebuild_command=rebuild_command(export_dir, flags), build_flags=flags,
                          **({"log": log} if log is not None else {}))
    export = open_export(export_dir)
    if not passed:
        raise ValidationFailedError(f"the export in {export_dir} failed validation (see "
                                    f"{export_dir / REPORT_NAME})", export)
    return export


__all__ = ["Export", "ValidationFailedError", "build", "load_model", "open_export"]
