"""ditexport.verification: files checked against the manifest before use, with remembered hashes that an in-place
edit cannot fool."""
from __future__ import annotations

import os

import pytest

from ditexport import verification
from ditexport.artifacts import ArtifactError, file_record, write_manifest
from ditexport.verification import manifest_digest, remembered, verify_export, verify_files


@pytest.fixture
def export(tmp_path, monkeypatch):
    """A small export-like directory whose files count as settled (no racy window) for the cache."""
    monkeypatch.setattr(verification, "RACY_SECONDS", -60.0)
    (tmp_path / "model.onnx").write_bytes(os.urandom(4096))
    (tmp_path / "cond.onnx").write_bytes(os.urandom(4096))
    write_manifest(tmp_path, {"config": {}, "files": {n: file_record(tmp_path / n) for n in ("model.onnx", "cond.onnx")},
                              "validation": {"passed": True}, "build_flags": ["--model", "DiT-S/2"]})
    return tmp_path


def counting_hashes(monkeypatch) -> list[str]:
    """Records which files verification reads in full (the real hash still runs)."""
    read = []
    real = verification.sha256_file

    def sha256_file(path, *args, **kwargs):
        read.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(verification, "sha256_file", sha256_file)
    return read


def test_an_unchanged_file_is_hashed_once_and_an_in_place_edit_is_still_caught(export, monkeypatch):
    read = counting_hashes(monkeypatch)
    verify_export(export, ["model.onnx"])
    verify_export(export, ["model.onnx"])
    assert read == ["model.onnx"]  # the second load used the remembered hash
    assert set(remembered(export, manifest_digest(export))) == {"model.onnx"}
    graph = export / "model.onnx"
    st = graph.stat()
    with open(graph, "r+b") as f:  # flip bytes in place, then restore the times: size and mtime unchanged
        f.seek(2048)
        f.write(b"\xff" * 16)
    os.utime(graph, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert graph.stat().st_size == st.st_size and graph.stat().st_mtime_ns == st.st_mtime_ns
    with pytest.raises(ArtifactError, match="model.onnx does not match its SHA-256.*"
                                            "build --model DiT-S/2 --export-dir .* --force"):
        verify_export(export, ["model.onnx"])
    assert read == ["model.onnx", "model.onnx"]


def test_recently_changed_files_are_not_remembered(export, monkeypatch):
    monkeypatch.setattr(verification, "RACY_SECONDS", 3600.0)
    read = counting_hashes(monkeypatch)
    verify_export(export, ["cond.onnx"])
    verify_export(export, ["cond.onnx"])
    assert read == ["cond.onnx", "cond.onnx"] and remembered(export, manifest_digest(export)) == {}


def test_a_new_manifest_forgets_what_the_old_one_verified(export, monkeypatch):
    verify_export(export, ["model.onnx"])
    write_manifest(export, {"config": {}, "files": {"model.onnx": file_record(export / "model.onnx")},
                            "validation": {"passed": True}})
    assert remembered(export, manifest_digest(export)) == {}


def test_sizes_of_every_file_are_checked_and_hashes_only_of_opened_ones(export, monkeypatch):
    read = counting_hashes(monkeypatch)
    (export / "cond.onnx").write_bytes(b"short")
    with pytest.raises(ArtifactError, match="cond.onnx has 5 bytes"):
        verify_export(export, ["model.onnx"])
    assert verify_files(export, {"model.onnx": file_record(export / "model.onnx")}, check_hashes=[]) == []
    assert read == ["model.onnx"]
    with pytest.raises(ArtifactError, match="not a file of the export"):
        verify_export(export, ["other.onnx"])
