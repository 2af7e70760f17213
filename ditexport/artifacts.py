"""The `exports/<name>/` layout: file names, the manifest, content hashes and atomic writes.

An export directory is complete when, and only when, its `manifest.json` exists: every other file is
written under a temporary name and renamed into place, and the manifest is written last (and removed
first when a rebuild starts), so an interrupted build never looks finished.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import sha256_file
from .errors import DitexportError

EXPORTS_ROOT = Path("exports")
MANIFEST_NAME = "manifest.json"
REPORT_NAME = "report.json"
MANIFEST_FORMAT = 1  # bump when the manifest's meaning changes, so old exports rebuild instead of misleading


class ArtifactError(DitexportError):
    """An export directory that is missing, incomplete, unwritable or does not match its manifest."""


# ------------------------------------------------------------------------------------------- names

def onnx_filename(graph: str = "xty", precision: str = "fp32") -> str:
    """model.onnx, model.fp16.onnx, cond.onnx, cond.fp16.onnx (fp32 carries no suffix)."""
    base = {"xty": "model", "cond": "cond"}[graph]
    return f"{base}.onnx" if precision == "fp32" else f"{base}.{precision}.onnx"


def export_name(model: str | None = None, checkpoint: str | Path | None = None) -> str:
    """The directory name of an export: the checkpoint's stem, or the model name ("DiT-S/2" -> "DiT-S-2")."""
    raw = Path(checkpoint).stem if checkpoint is not None else (model or "digits")
    return re.sub(r"[^A-Za-z0-9._-]+", "-", raw).strip("-.") or "model"


def default_export_dir(model: str | None = None, checkpoint: str | Path | None = None,
                       root: str | Path = EXPORTS_ROOT) -> Path:
    return Path(root) / export_name(model, checkpoint)


# ---------------------------------------------------------------------------------- atomic writes

def publish(tmp: str | Path, path: str | Path) -> None:
    """Renames a finished temporary file onto `path`, with the permissions a plain new file would get
    (temporary files are created private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, 0o666 & ~mask)
    os.replace(tmp, path)


@contextmanager
def atomic_path(path: str | Path):
    """Yields a temporary path beside `path`; renames it onto `path` only if the block finishes."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
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


def ensure_writable_dir(path: str | Path) -> Path:
    """Creates `path` if needed and proves it writable, or raises one clear ArtifactError."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise ArtifactError(f"cannot write to output directory {path}: {e.strerror or e}") from None
    return path


# --------------------------------------------------------------------------------------- hashes

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


def verify_files(export_dir: str | Path, files: dict[str, dict], check_hashes: bool = True) -> list[str]:
    """Problems with the files a manifest lists: missing, resized or (with check_hashes) modified."""
    export_dir = Path(export_dir)
    problems = []
    for name, record in files.items():
        path = export_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
        elif path.stat().st_size != record["size"]:
            problems.append(f"{name} has {path.stat().st_size} bytes, the manifest says {record['size']} "
                            "(truncated or replaced)")
        elif check_hashes and sha256_file(path) != record["sha256"]:
            problems.append(f"{name} does not match its SHA-256 in the manifest (corrupt or modified)")
    return problems


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


def read_manifest(export_dir: str | Path) -> dict:
    """The manifest of a complete export, or an ArtifactError saying how to make one."""
    export_dir = Path(export_dir)
    path = export_dir / MANIFEST_NAME
    if not path.is_file():
        raise ArtifactError(f"no complete export in {export_dir} ({MANIFEST_NAME} missing); "
                            "build one with: python -m ditexport build")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ArtifactError(f"cannot read {path}: {e}; rebuild with: python -m ditexport build --force") from None
    if not isinstance(manifest, dict) or "config" not in manifest or "files" not in manifest:
        raise ArtifactError(f"{path} is not a ditexport manifest; rebuild with: python -m ditexport build --force")
    return manifest


@dataclass
class ExportEntry:
    """One complete export directory and its manifest."""
    path: Path
    manifest: dict

    @property
    def name(self) -> str:
        return self.path.name

    def graph_path(self, graph: str = "xty", precision: str = "fp32") -> Path | None:
        """The ONNX file of a graph and precision, when this export has it."""
        name = onnx_filename(graph, precision)
        return self.path / name if name in self.manifest.get("files", {}) else None


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
