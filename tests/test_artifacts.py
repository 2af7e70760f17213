"""ditexport.artifacts: names, atomic writes, manifests, hashes and the export listing."""
from __future__ import annotations

import json

import pytest

from ditexport.artifacts import (ArtifactError, atomic_path, atomic_write_json, default_export_dir,
                                 ensure_writable_dir, export_name, file_record, list_exports, onnx_filename,
                                 read_manifest, write_manifest)
from ditexport.verification import verify_files


def test_layout_names():
    assert [onnx_filename(g, p) for g in ("xty", "cond") for p in ("fp32", "fp16")] == \
        ["model.onnx", "model.fp16.onnx", "cond.onnx", "cond.fp16.onnx"]
    assert export_name("DiT-XL/2") == "DiT-XL-2"
    assert export_name(None) == "digits"
    assert export_name("digits", checkpoint="/ckpts/DiT-XL-2-256x256.pt") == "DiT-XL-2-256x256"
    # Issue 14 item 6: a registry config's directory carries its pixel size (it was "out/DiT-S-2" for both).
    assert str(default_export_dir("DiT-S/2", root="out")) == "out/DiT-S-2-256"
    assert str(default_export_dir("DiT-S/2", root="out", image_size=512)) == "out/DiT-S-2-512"
    assert str(default_export_dir("digits", root="out")) == "out/digits"
    assert str(default_export_dir("DiT-S/2", "/ckpts/DiT-S-2-512x512.pt", root="out")) == "out/DiT-S-2-512x512"


def test_atomic_write_leaves_the_old_file_when_interrupted(tmp_path):
    target = tmp_path / "manifest.json"
    atomic_write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half written")
            raise RuntimeError("interrupted")
    assert json.loads(target.read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.json"]  # no temporary left behind


def test_manifest_round_trip_and_listing(tmp_path):
    complete, incomplete, broken = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (complete, incomplete, broken):
        d.mkdir()
    (complete / "model.onnx").write_bytes(b"graph")
    manifest = {"config": {"depth": 2}, "files": {"model.onnx": file_record(complete / "model.onnx")},
                "graphs": [{"graph": "xty", "precision": "fp32", "file": "model.onnx"}]}
    write_manifest(complete, manifest)
    (incomplete / "model.onnx").write_bytes(b"graph")  # no manifest: an interrupted build
    (broken / "manifest.json").write_text("{not json")
    assert read_manifest(complete) == manifest
    with pytest.raises(ArtifactError, match="build one"):
        read_manifest(incomplete)
    with pytest.raises(ArtifactError, match="cannot read"):
        read_manifest(broken)
    entries = list_exports(tmp_path)
    assert [e.name for e in entries] == ["a"]
    assert entries[0].graph_path("xty", "fp32") == complete / "model.onnx"
    assert entries[0].graph_path("xty", "fp16") is None
    assert list_exports(tmp_path / "missing") == []


def test_verify_files_catches_missing_truncated_and_modified(tmp_path):
    (tmp_path / "a.onnx").write_bytes(b"0123456789")
    (tmp_path / "b.onnx").write_bytes(b"0123456789")
    files = {name: file_record(tmp_path / name) for name in ("a.onnx", "b.onnx")}
    files["gone.onnx"] = {"size": 1, "sha256": "0"}
    assert files["a.onnx"]["sha256"] == "84d89877f0d4041efb6bf91a16f0248f2fd573e6af05c19f96bedb9f882f7882"
    (tmp_path / "a.onnx").write_bytes(b"01234")         # truncated
    (tmp_path / "b.onnx").write_bytes(b"0123456780")    # same size, other bytes
    problems = verify_files(tmp_path, files)
    assert any("a.onnx" in p and "truncated" in p for p in problems)
    assert any("b.onnx" in p and "SHA-256" in p for p in problems)
    assert any("gone.onnx is missing" in p for p in problems)
    assert len(verify_files(tmp_path, files, check_hashes=False)) == 2  # sizes alone miss b.onnx


def test_unwritable_output_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ArtifactError, match="cannot write to output directory"):
        ensure_writable_dir(blocker / "export")
    assert ensure_writable_dir(tmp_path / "new" / "export").is_dir()
    assert list((tmp_path / "new" / "export").iterdir()) == []
