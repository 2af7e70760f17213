"""Fault injection, inputs and exports: the real CLI, in subprocesses, over bad flags and output paths, broken
checkpoints and damaged exports. Every refusal must be exit code 2 with one line on stderr and no traceback,
leave nothing at the output path, and leave an export either complete and valid or refused (builds, crashes
and locks: test_faults_builds.py).

Exports are copies of the one digits build shared by the test session. Full and read-only file systems are
real small tmpfs mounts (skipped, with the reason, where this process may not mount).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from fault_tools import ORT, SAMPLE, assert_refused, fill, flip_bytes, tmpfs


@pytest.fixture(scope="module")
def exports(digits_export, tmp_path_factory) -> Path:
    """Copies of the shared digits build, made first so their files are older than the verification cache's
    racy window when the tests reach them."""
    root = tmp_path_factory.mktemp("fault-exports")
    for name in ("clean", "flipped", "utime", "truncated", "deleted", "extra", "nomanifest", "badmanifest",
                 "unvalidated", "report", "hint"):
        shutil.copytree(digits_export, root / name)
    return root


# ------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("args, fragments", [
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite", "nan"]),
    (["--cfg-scale", "inf"], ["--cfg-scale", "finite", "inf"]),
    (["--cfg-scale=-inf"], ["--cfg-scale", "finite"]),
    (["--sampler", "ddim", "--eta", "nan"], ["--eta", "finite"]),
    (["--sampler", "ddim", "--eta", "inf"], ["--eta", "finite"]),
    # DDIM above eta 1 turns NaN after the whole chain (exit 2 at the PNG): refused first, as `serve` refuses it.
    (["--sampler", "ddim", "--eta", "1.5"], ["eta must be between 0 and 1", "1.5"]),
    (["--sampler", "ddim", "--eta=-0.5"], ["eta must be between 0 and 1"]),
    (["--seed", str(2**70)], ["--seed", str(2**70)]),
    (["--classes", ","], ["--classes", "no class label"]),
    (["--classes", "12"], ["class labels must be in 0..9"]),
    (["--device", "tpu"], ["--device", "tpu"]),
    (["--steps", "1001"], ["steps must be between 1 and 1000"]),
], ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0].startswith("-") else None)
def test_bad_sampling_flags_are_refused_before_any_work(cli, tmp_path, args, fragments):
    out = tmp_path / "x.png"
    proc = cli(*SAMPLE, *args, "--out", out, case=f"sample {' '.join(args)}")
    assert_refused(proc, *fragments, absent=out)
    assert "model:" not in proc.stdout  # refused before the model is built and the banner printed


def test_bad_output_paths_are_refused_before_sampling(cli, tmp_path):
    (tmp_path / "file.png").write_bytes(b"not a directory")
    for out, fragments in [
        (tmp_path, ["is a directory"]),
        (tmp_path / "file.png" / "x.png", ["file.png is a file, not a directory"]),
        (Path("/nonexistent-ditexport-dir/sub/x.png"), ["does not exist", "create it first"]),
        (Path("/proc/x.png"), ["/proc/x.png"]),
    ]:
        proc = cli(*SAMPLE, "--out", out, cwd=tmp_path, case=f"sample --out {out}")
        assert_refused(proc, *fragments)
        assert "model:" not in proc.stdout
    assert not Path("/nonexistent-ditexport-dir").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.png"]
    # Inside the working directory, missing directories are made (the documented convenience).
    proc = cli(*SAMPLE, "--out", "new/dir/x.png", cwd=tmp_path, case="sample --out new/dir/x.png (made)")
    assert proc.returncode == 0 and (tmp_path / "new" / "dir" / "x.png").stat().st_size > 0


def test_output_on_read_only_and_full_file_systems(cli, tmp_path):
    with tmpfs(tmp_path / "ro", "1m", read_only_after=lambda p: None) as ro:
        proc = cli(*SAMPLE, "--out", ro / "x.png", case="sample --out on a read-only file system")
        assert_refused(proc, "x.png", "Read-only file system", absent=ro / "x.png")
        assert "model:" not in proc.stdout
    with tmpfs(tmp_path / "full", "1m") as full:
        fill(full, 8 * 1024)
        # 2000 digits make a PNG of about 4 MB: the disk fills while the grid is being written.
        proc = cli("sample", "--steps", "2", "--num-images", "2000", "--quiet", "--out", full / "x.png",
                   case="sample --out on a full file system")
        assert_refused(proc, "x.png", "No space left on device", absent=full / "x.png")
        assert sorted(p.name for p in full.iterdir()) == ["filler"]  # the temporary is gone too


def test_non_finite_samples_are_never_written(cli, tmp_path):
    from ditexport.zoo import load_builtin

    state = load_builtin("digits").state_dict()
    state["final_layer.linear.weight"][0, 0] = float("inf")  # a real model whose output is not finite
    checkpoint = tmp_path / "inf.pt"
    torch.save(state, checkpoint)
    out = tmp_path / "x.png"
    proc = cli(*SAMPLE, "--checkpoint", checkpoint, "--out", out, case="sample from a model that outputs inf")
    assert_refused(proc, "not finite", "x.png was not written", absent=out)


class RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this must never run",))


def test_checkpoints_that_cannot_be_loaded(cli, tmp_path):
    import collections as c

    evil = tmp_path / "evil.pt"
    torch.save({"model": c.OrderedDict(w=torch.zeros(1)), "payload": RunsCode()}, evil)
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    noise = tmp_path / "noise.pt"
    noise.write_bytes(torch.randint(0, 256, (1000,), generator=torch.Generator().manual_seed(0),
                                    dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "folder.pt").mkdir()
    for path, fragments in [(evil, ["evil.pt", "posix.system", "refuses"]), (empty, ["empty.pt", "empty (0 bytes)"]),
                            (noise, ["noise.pt", "not a PyTorch checkpoint"]),
                            (tmp_path / "folder.pt", ["folder.pt", "is a directory"]),
                            (tmp_path / "missing.pt", ["not found", "missing.pt"])]:
        proc = cli(*SAMPLE, "--checkpoint", path, "--out", tmp_path / "x.png", case=f"--checkpoint {path.name}")
        line = assert_refused(proc, *fragments, absent=tmp_path / "x.png")
        assert "weights_only" not in line and "file an issue" not in line
        assert "this must never run" not in proc.stdout


# -------------------------------------------------------------------------------- damaged exports

def sample_from(cli, export: Path, out: Path, case: str, *extra) -> subprocess.CompletedProcess:
    return cli(*ORT, "--export-dir", export, "--out", out, *extra, case=case)


def test_a_clean_export_samples(cli, exports, tmp_path):
    out = tmp_path / "clean.png"
    proc = sample_from(cli, exports / "clean", out, "clean export (control)")
    assert proc.returncode == 0 and out.stat().st_size > 0, proc.stderr


@pytest.mark.parametrize("damage, fragments", [
    ("flipped", ["model.onnx does not match its SHA-256"]),
    ("truncated", ["model.onnx has", "truncated"]),
    ("deleted", ["cond.onnx is missing"]),
    ("nomanifest", ["no ONNX export", "build it first with: python -m ditexport build"]),
    ("badmanifest", ["cannot read", "manifest.json"]),
    ("unvalidated", ["failed validation"]),
])
def test_damaged_exports_are_refused_with_the_users_own_rebuild_command(cli, exports, tmp_path, damage, fragments):
    export = exports / damage
    if damage == "flipped":
        flip_bytes(export / "model.onnx")
    elif damage == "truncated":
        graph = export / "model.onnx"
        graph.write_bytes(graph.read_bytes()[:-1000])
    elif damage == "deleted":
        (export / "cond.onnx").unlink()
    elif damage == "nomanifest":
        (export / "manifest.json").unlink()
    elif damage == "badmanifest":
        (export / "manifest.json").write_text('{"config": ')
    elif damage == "unvalidated":
        manifest = json.loads((export / "manifest.json").read_text())
        manifest["validation"]["passed"] = False
        (export / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "x.png"
    line = assert_refused(sample_from(cli, export, out, f"export: {damage}", "--model", "digits"), *fragments,
                          absent=out)
    # The hint repeats the user's model and directory flags (issue 10, item 7).
    assert "--model digits" in line and f"--export-dir {export}" in line
    if damage in ("flipped", "truncated"):
        proc = cli("validate", "--export-dir", export, case=f"validate an export: {damage}")
        assert_refused(proc, "model.onnx", f"--export-dir {export} --force")


def test_an_in_place_flip_that_keeps_size_and_mtime_is_caught_after_a_cached_load(cli, exports, tmp_path):
    """The verification cache remembers (inode, size, mtime, ctime); os.utime can restore mtime, not ctime."""
    from ditexport.verification import RACY_SECONDS

    export = exports / "utime"
    # Files changed within RACY_SECONDS of being hashed are not remembered: let the copy age past that first.
    age = time.time() - (export / "model.onnx").stat().st_ctime
    time.sleep(max(0.0, RACY_SECONDS + 0.1 - age))
    out = tmp_path / "x.png"
    assert sample_from(cli, export, out, "cache priming (control)").returncode == 0
    from ditexport.verification import remembered, manifest_digest

    assert "model.onnx" in remembered(export, manifest_digest(export))  # the load was remembered
    flip_bytes(export / "model.onnx", keep_times=True)
    out.unlink()
    assert_refused(sample_from(cli, export, out, "flip with size and mtime restored"),
                   "model.onnx does not match its SHA-256", absent=out)


def test_extra_files_do_not_change_what_an_export_computes(cli, exports, tmp_path):
    export = exports / "extra"
    (export / "model.onnx.data").write_bytes(b"\0" * 4096)   # a stray external-data file the graph does not use
    (export / "notes.txt").write_text("not part of the export")
    a, b = tmp_path / "extra.png", tmp_path / "clean.png"
    assert sample_from(cli, export, a, "export with extra files").returncode == 0
    assert sample_from(cli, exports / "clean", b, "clean export for comparison").returncode == 0
    assert a.read_bytes() == b.read_bytes()


def test_validate_says_when_the_stored_report_disagrees(cli, exports):
    export = exports / "report"
    report = json.loads((export / "report.json").read_text())
    report["checks"][0]["rel_err"] = 0.5
    report["checks"][0]["passed"] = False
    (export / "report.json").write_text(json.dumps(report))
    proc = cli("validate", "--export-dir", export, "--sample-steps", "0", case="validate a tampered report.json")
    assert proc.returncode == 0, proc.stderr
    note = [line for line in proc.stdout.splitlines() if line.startswith("note: ")]
    assert len(note) == 1 and "differed" in note[0] and "model.onnx batch 1: FAILED before, PASSED now" in note[0]
    assert json.loads((export / "report.json").read_text())["checks"][0]["passed"] is True


def test_validate_takes_the_model_flags_and_checks_them(cli, exports, tmp_path):
    export = exports / "hint"
    proc = cli("validate", "--model", "digits", "--export-dir", export, "--sample-steps", "0",
               case="validate --model digits (matching)")
    assert proc.returncode == 0 and "PASSED" in proc.stdout, proc.stderr
    proc = cli("validate", "--model", "DiT-S/2", "--export-dir", export, case="validate --model of another export")
    assert_refused(proc, "built from digits", "--model DiT-S/2")
    checkpoint = tmp_path / "other.pt"
    from ditexport.model import create_model

    torch.save(create_model("DiT-digits", seed=3).state_dict(), checkpoint)
    proc = cli("validate", "--checkpoint", checkpoint, "--export-dir", export, case="validate --checkpoint mismatch")
    assert_refused(proc, "not from --checkpoint", "other.pt")


def test_read_only_exports_are_used_and_refused_as_they_should_be(cli, digits_export, tmp_path):
    def copy_in(mount: Path) -> None:
        shutil.copytree(digits_export, mount / "digits")

    with tmpfs(tmp_path / "ro", "20m", read_only_after=copy_in) as ro:
        export = ro / "digits"
        proc = cli("validate", "--export-dir", export, case="validate a read-only export")
        assert_refused(proc, str(export), "Read-only file system")
        # Refused up front, not after the validation's work: no graph was checked, no stress run.
        assert "worst rel err" not in proc.stdout and "stress check" not in proc.stdout, proc.stdout
        proc = cli("build", "--precision", "fp32", "--export-dir", export, case="build a read-only, up-to-date export")
        assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr
        out = tmp_path / "ro.png"
        assert sample_from(cli, export, out, "sample a read-only export").returncode == 0


def test_bench_fails_the_row_of_a_damaged_export_with_the_reason(cli, exports, tmp_path):
    export = tmp_path / "bench-export"
    shutil.copytree(exports / "clean", export)
    flip_bytes(export / "model.onnx")
    proc = cli("bench", "--device", "cpu", "--backends", "onnxruntime-fp32", "--quick", "--batch-sizes", "2",
               "--no-unguided", "--export-dir", export, "--out", tmp_path / "bench", case="bench a damaged export")
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stdout.splitlines() if line.startswith("onnxruntime-fp32   FAILED: ")]
    assert len(failed) == 1 and "model.onnx does not match its SHA-256" in failed[0]
