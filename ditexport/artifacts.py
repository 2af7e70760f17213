"""The `exports/<name>/` layout: file names, the manifest, atomic writes (checks before use: verification.py).

An export directory is complete when, and only when, its `manifest.json` exists: every other file is
written under a temporary name and renamed into place, and the manifest is written last (and removed
first when a rebuild starts), so an interrupted build never looks finished.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from . import locking
from .hashing import sha256_file
from .errors import DitexportError

EXPORTS_ROOT = Path("exports")
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
MANIFEST_FORMAT = 2  # bump when the manifest's meaning changes, so old exports rebuild instead of misleading


class ArtifactError(DitexportError):
    """An export directory that is missing, incomplete, unwritable or does not match its manifest."""


# ------------------------------------------------------------------------------------------- names

# Graph -> the stem of its files: its ONNX graphs (one per precision) and its TensorRT plans.
GRAPH_STEMS = {"xty": "model", "cond": "cond"}


VAE_GRAPH = "vae"  # the VAE decoder's graph name in a manifest's "graphs" (latent models built with --vae)


def onnx_filename(graph: str = "xty", precision: str = "fp32", form: str = "") -> str:
    """model.onnx, model.fp16.onnx, model.int8.onnx, cond.fp8.onnx, vae.fp16.onnx, ... (fp32 carries no suffix); an
    8-bit graph's CPU form adds ".cpu": model.int8.cpu.onnx."""
    base = VAE_GRAPH if graph == VAE_GRAPH else GRAPH_STEMS[graph]
    name = base if precision == "fp32" else f"{base}.{precision}"
    return f"{name}.{form}.onnx" if form else f"{name}.onnx"


def vae_onnx_filename(precision: str = "fp32") -> str:
    return onnx_filename(VAE_GRAPH, precision)


def pixel_size(config) -> int:
    """The pixel side a config samples: latent side x 8 for SD-VAE latent models (4 channels), else its input."""
    return config.input_size * 8 if config.in_channels == 4 else config.input_size


def describe_config(config) -> str:
    """A config in words, e.g. "DiT-S/2 at 256 px" (or its shape where it is no registry entry)."""
    from dataclasses import replace

    from .model import DIT_CONFIGS

    name = next((n for n, c in DIT_CONFIGS.items() if replace(c, input_size=config.input_size) == config), None)
    if name is None:
        name = (f"a DiT of depth {config.depth}, width {config.hidden_size}, patch {config.patch_size}, "
                f"{config.num_classes} classes")
    return f"{name} at {pixel_size(config)} px"


def export_name(model: str | None = None, checkpoint: str | Path | None = None, size: int | None = None) -> str:
    """The directory name of an export: the checkpoint's stem, the built-in model's name, or a registry config
    with its pixel size ("DiT-S/2", 256 -> "DiT-S-2-256"), so 256 and 512 px exports do not share a directory."""
    raw = Path(checkpoint).stem if checkpoint is not None else (model or "digits")
    if checkpoint is None and size is not None:
        raw = f"{raw}-{size}"
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"


def default_export_dir(model: str | None = None, checkpoint: str | Path | None = None,
                       root: str | Path = EXPORTS_ROOT, image_size: int | None = None) -> Path:
    """exports/<name>; a registry config's name gets its pixel size (its default size when not given)."""
    from .model import DIT_CONFIGS

    size = None
    if checkpoint is None and model in DIT_CONFIGS:
        size = image_size or pixel_size(DIT_CONFIGS[model])
    return Path(root) / export_name(model, checkpoint, size)


def rebuild_command(export_dir: str | Path | None, model_flags: list[str] | None = None) -> str:
    """The build command that remakes an export: the model flags (the user's, or those recorded in its
    manifest) and its directory (left out where it is not known: the default one of the flags), forced."""
    import shlex

    words = ["python -m ditexport build", *map(shlex.quote, model_flags or []),
             *(["--export-dir", shlex.quote(str(export_dir))] if export_dir is not None else []), "--force"]
    return " ".join(words)


# ---------------------------------------------------------------------------------- atomic writes

def fault_point(name: str) -> None:
    """Fault-injection tests (tests/test_faults_builds.py) set DITEXPORT_KILL_AT=<name> to have the process SIGKILLed
    right here, a real crash at a known point of a write; or DITEXPORT_PAUSE_AT=<name> to hold it here until
    the file DITEXPORT_RESUME_WHEN exists, so other processes meet it mid-build without timing guesses."""
    if os.environ.get("DITEXPORT_KILL_AT") == name:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("DITEXPORT_PAUSE_AT") == name:
        resume = Path(os.environ.get("DITEXPORT_RESUME_WHEN", ""))
        while not resume.is_file():
            time.sleep(0.05)


def publish(tmp: str | Path, path: str | Path) -> None:
    """Renames a finished temporary file onto `path`, with the permissions a plain new file would get
    (temporary files are created private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    fault_point(f"before-publish:{Path(path).name}")
    os.replace(tmp, path)
    fault_point(f"after-publish:{Path(path).name}")


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`, named after its writer; renames it onto `path` only if the
    block finishes. Stale temporaries of crashed writers in that directory are removed first."""
    path = Path(path)
    locking.remove_stale_temporaries(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=locking.temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def atomic_write_json(path: str | Path, obj) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextmanager
def scratch_dir(parent: str | Path, purpose: str):
    """A temporary directory inside `parent` (an export directory: never /tmp), named after its writer and
    removed when the block ends; a crash leaves it for the next build to remove."""
    path = Path(tempfile.mkdtemp(prefix=locking.temp_prefix(purpose), dir=parent))
    try:
        fault_point(f"scratch:{purpose}")
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def ensure_writable_dir(path: str | Path) -> Path:
    """Creates `path` if needed and proves it writable, or raises one clear ArtifactError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=locking.temp_prefix("write-test"), dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArtifactError(f"cannot write to output directory {path}: {e.strerror or e}") from None
    return path


def write_problem(path: str | Path) -> str | None:
    """Why files cannot be created in an existing directory, or None (a probe file: root ignores mode bits,
    but not a read-only or full file system)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=locking.temp_prefix("write-test"), dir=path)
    except OSError as e:
        return e.strerror or str(e)
    os.close(fd)
    os.unlink(probe)
    return None


# ----------------------------------------------------------------------------------------- files

def external_data_files(onnx_path: str | Path) -> list[Path]:
    """The external-data files an ONNX file refers to (read without loading the weights)."""
    import onnx

    onnx_path = Path(onnx_path)
    try:
        proto = onnx.load(str(onnx_path), load_external_data=False)
    except Exception as e:
        raise ArtifactError(f"{onnx_path} is not a readable ONNX file (corrupt or truncated?): {e}") from None
    locations = set()
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                locations.add(entry.value)
    return [onnx_path.parent / loc for loc in sorted(locations)]


def file_record(path: str | Path) -> dict:
    path = Path(path)
    return {"size": path.stat().st_size, "sha256": sha256_file(path)}


# ------------------------------------------------------------------------------------- manifest

def tool_versions() -> dict[str, str]:
    """Versions of the tools that shape an export; a change makes the next build redo it."""
    import importlib.metadata as md

    from . import __version__

    versions = {"ditexport": __version__}
    for dist in ("torch", "onnx", "onnxruntime", "onnxscript", "onnx-graphsurgeon", "polygraphy"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = "not installed"
    return versions


def write_manifest(export_dir: str | Path, manifest: dict) -> Path:
    return atomic_write_json(Path(export_dir) / MANIFEST_NAME, manifest)


def remove_manifest(export_dir: str | Path) -> None:
    """Marks an export incomplete before its files are rewritten."""
    (Path(export_dir) / MANIFEST_NAME).unlink(missing_ok=True)


def manifest_flags(manifest: dict) -> list[str]:
    """The model flags an export was built with (recorded by `build`; older manifests: from their source)."""
    if isinstance(manifest.get("build_flags"), list):
        return [str(f) for f in manifest["build_flags"]]
    source = manifest.get("source") or {}
    if source.get("kind") == "checkpoint" and (source.get("checkpoint") or {}).get("path"):
        return ["--checkpoint", source["checkpoint"]["path"]]
    return ["--model", source["model"]] if source.get("model") else []


def read_manifest(export_dir: str | Path, rebuild: str | None = None) -> dict:
    """The manifest of a complete export, or an ArtifactError saying how to make one."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    rebuild = rebuild or rebuild_command(export_dir)
    if not path.is_file():
        raise ArtifactError(f"no complete export in {export_dir} ({MANIFEST_NAME} missing); "
                            f"build one with: {rebuild.removesuffix(' --force')}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}; rebuild with: {rebuild}") from None
    if not isinstance(manifest, dict) or "config" not in manifest or "files" not in manifest:
        raise ArtifactError(f"{path} is not a ditexport manifest; rebuild with: {rebuild}")
    return manifest


@dataclass
class ExportEntry:
    """One complete export directory and its manifest."""
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        """The export directory's name (the model is `manifest["model"]`)."""
        return self.path.name

    @property
    def validated(self) -> bool:
        """Whether the manifest says the graphs passed validation."""
        return bool((self.manifest.get("validation") or {}).get("passed"))

    def graph_path(self, graph: str = "xty", precision: str = "fp32", form: str = "") -> Path | None:
        """The ONNX file of a graph and precision (an 8-bit graph's `form`: "" the TensorRT form, "cpu" the CPU
        form), when this export has it (as its manifest records it)."""
        files = self.manifest.get("files", {})
        for entry in self.manifest.get("graphs", []):
            if (entry.get("graph") == graph and entry.get("precision") == precision
                    and entry.get("form", "") == form and entry.get("file") in files):
                return self.path / entry["file"]
        return None

    def graph_paths(self, graph: str = "xty") -> dict[str, Path]:
        """Precision -> ONNX file of a graph, for every precision this export has."""
        from .precisions import PRECISIONS

        found = {p: self.graph_path(graph, p) for p in PRECISIONS}
        return {p: path for p, path in found.items() if path is not None}


def list_exports(root: str | Path = EXPORTS_ROOT) -> list[ExportEntry]:
    """Every complete export under `root` (directories with a readable manifest), sorted by name."""
    root = Path(root)
    if not root.is_dir():
        return []
    entries = []
    for manifest_path in sorted(root.glob(f"*/{MANIFEST_NAME}")):
        try:
            entries.append(ExportEntry(manifest_path.parent, read_manifest(manifest_path.parent)))
        except ArtifactError:
            continue  # an unreadable manifest is an incomplete export, not an error for a listing
    return entries
