"""Checking an export against its manifest before anything in it is opened: every listed file's size, the
SHA-256 of the files a consumer opens, and remembered hashes so that an unchanged multi-GB file is not read
on every load.

A verified hash is remembered per file under (device, inode, size, mtime_ns, ctime_ns), for the manifest it
matched, in the user's cache directory (readers never write into an export). User code cannot set ctime
(os.utime itself updates it), so an in-place edit that restores a file's size and mtime still changes the key
and the file is hashed again; a file changed less than RACY_SECONDS before it was hashed is not remembered.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

from .artifacts import (MANIFEST_NAME, REPORT_NAME, ArtifactError, ExportEntry, atomic_write_json, manifest_flags,
                        read_manifest, rebuild_command)
from .hashing import sha256_file

# A file changed less than this long before it was hashed may change again within the same timestamp tick
# unseen, so its hash is not remembered ("racily clean", as git calls it).
RACY_SECONDS = 2.0
CACHED_EXPORTS = 64  # exports whose verified files are remembered: the most recently verified ones


# ------------------------------------------------------------------------------------------ hashing

def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def hash_file(path: str | Path) -> tuple[str, list[int] | None]:
    """(SHA-256, the stat key to remember it by); the key is None when the file changed too recently or
    while it was read."""
    path = Path(path)
    before = path.stat()
    digest = sha256_file(path)
    after = path.stat()
    settled = after.st_ctime_ns < time.time_ns() - RACY_SECONDS * 1e9
    return digest, (_stat_key(after) if settled and _stat_key(before) == _stat_key(after) else None)


def manifest_digest(export_dir: str | Path) -> str:
    return hashlib.sha256((Path(export_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


# -------------------------------------------------------------------------------- remembered hashes

def hash_cache_path() -> Path:
    """$DITEXPORT_CACHE_DIR, else $XDG_CACHE_HOME/ditexport, else ~/.cache/ditexport; verified-exports.json."""
    root = os.environ.get("DITEXPORT_CACHE_DIR")
    if not root:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditexport"
    return Path(root) / "verified-exports.json"


def _cache_table() -> dict:
    try:
        table = json.loads(hash_cache_path().read_text())
    except (OSError, ValueError):
        return {}
    return table if isinstance(table, dict) else {}


def remembered(export_dir: Path, manifest_sha: str) -> dict[str, list[int]]:
    """Stat keys of the files of `export_dir` that last matched the manifest with this SHA-256."""
    entry = _cache_table().get(str(export_dir.resolve()))
    if not isinstance(entry, dict) or entry.get("manifest_sha256") != manifest_sha:
        return {}
    return entry["files"] if isinstance(entry.get("files"), dict) else {}


def remember(export_dir: str | Path, keys: dict[str, list[int] | None], manifest_sha: str | None = None) -> None:
    """Records files that matched the manifest (None keys, for files that were not settled, are left out)."""
    export_dir = Path(export_dir)
    keys = {name: key for name, key in keys.items() if key is not None}
    if not keys:
        return
    table = _cache_table()
    where = str(export_dir.resolve())
    table.pop(where, None)
    table[where] = {"manifest_sha256": manifest_sha or manifest_digest(export_dir), "files": keys}
    while len(table) > CACHED_EXPORTS:
        table.pop(next(iter(table)))
    try:
        hash_cache_path().parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(hash_cache_path(), table)
    except OSError:
        pass  # without a writable cache, files are simply hashed on every load


# --------------------------------------------------------------------------------------- verifying

def verify_files(export_dir: str | Path, files: dict[str, dict], check_hashes: bool | list[str] = True,
                 manifest_sha: str | None = None) -> list[str]:
    """Problems with the files a manifest lists: missing or resized (every file), modified (the SHA-256 of
    all files, or of those named in `check_hashes`).

    With `manifest_sha` (the SHA-256 of the manifest's bytes), a file whose stat key is remembered for that
    manifest is not hashed again, and files that match are remembered.
    """
    export_dir = Path(export_dir)
    known = dict(remembered(export_dir, manifest_sha)) if manifest_sha else {}
    learned = False
    problems = []
    for name, record in files.items():
        path = export_dir / name
        if not path.is_file():
            problems.append(f"{name} is missing")
            continue
        st = path.stat()
        if st.st_size != record["size"]:
            problems.append(f"{name} has {st.st_size} bytes, the manifest says {record['size']} "
                            "(truncated or replaced)")
            continue
        if check_hashes is False or (isinstance(check_hashes, list) and name not in check_hashes):
            continue
        if known.get(name) == _stat_key(st):
            continue
        digest, key = hash_file(path)
        if digest != record["sha256"]:
            problems.append(f"{name} does not match its SHA-256 in the manifest (corrupt or modified)")
            known.pop(name, None)
        elif key is not None and manifest_sha:
            known[name] = key
            learned = True
    if learned:
        remember(export_dir, known, manifest_sha)
    return problems


def verify_export(export_dir: str | Path, open_files=(), *, rebuild: str | None = None,
                  require_validated: bool = True, all_sizes: bool = True, config=None) -> ExportEntry:
    """The export in `export_dir`, checked before anything in it is opened: every listed file (only `open_files`
    without `all_sizes`) present with its size, the SHA-256 of `open_files` (with their external data), and, with
    `config` (a DiTConfig), that it was built for that model config.

    Refuses, in one ArtifactError naming the file and the rebuild command, an incomplete, damaged, (with
    `require_validated`) unvalidated or other-model export. Call it under `locking.read_lock` and open the files
    there too.
    """
    export_dir = Path(export_dir)
    manifest = read_manifest(export_dir, rebuild)
    rebuild = rebuild or rebuild_command(export_dir, manifest_flags(manifest))
    if config is not None:
        _check_config(export_dir, manifest, config)
    if require_validated and not (manifest.get("validation") or {}).get("passed"):
        raise ArtifactError(f"the export in {export_dir} failed validation (see {export_dir / REPORT_NAME}); "
                            f"rebuild it with: {rebuild}")
    names = [Path(f).name for f in open_files]
    names += [f"{n}.data" for n in names if f"{n}.data" in manifest["files"]]
    unknown = [n for n in names if n not in manifest["files"]]
    if unknown:
        raise ArtifactError(f"{export_dir / unknown[0]} is not a file of the export its manifest describes; "
                            f"rebuild with: {rebuild}")
    files = manifest["files"] if all_sizes else {n: manifest["files"][n] for n in names}
    problems = verify_files(export_dir, files, check_hashes=names,
                            manifest_sha=manifest_digest(export_dir))
    if problems:
        raise ArtifactError(f"{export_dir}: {'; '.join(problems)}; rebuild with: {rebuild}")
    return ExportEntry(export_dir, manifest)


def _check_config(export_dir: Path, manifest: dict, config) -> None:
    from .artifacts import describe_config
    from .model import DiTConfig

    built = DiTConfig.from_dict(manifest["config"])
    if built != config:
        raise ArtifactError(f"the export in {export_dir} was built for another model config, "
                            f"{describe_config(built)}, and this model is {describe_config(config)}; pass the "
                            "matching --model/--image-size/--checkpoint, or the --export-dir of this model's export")
