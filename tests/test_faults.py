"""Fault injection: the real CLI, in subprocesses, over bad inputs, damaged exports, file-system faults, crashed
and concurrent builds. Every refusal must be exit code 2 with one line on stderr and no traceback, leave nothing
at the output path, and leave an export either complete and valid or refused.

Exports are copies of the one digits build shared by the test session; the builds this module runs itself
(kills, concurrency, full disks) use DiT-tiny/2, fp32 only, no sample check, to stay short. Full and read-only
file systems are real small tmpfs mounts (skipped, with the reason, where this process may not mount).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

# Read by conftest's terminal summary: how many fault cases this module tried.
CASES_TRIED: list[str] = []
TINY_BUILD = ["--model", "DiT-tiny/2", "--precision", "fp32", "--sample-steps", "0"]


# ----------------------------------------------------------------------------------------- helpers

@pytest.fixture(scope="module")
def system_tmp(tmp_path_factory) -> Path:
    """The TMPDIR of every command run here: nothing may be left in it (temporaries live in exports)."""
    return tmp_path_factory.mktemp("system-tmp")


@pytest.fixture(scope="module")
def cli(system_tmp):
    def run(*args, cwd=None, env=None, timeout=600, case: str | None = None) -> subprocess.CompletedProcess:
        if case:
            CASES_TRIED.append(case)
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(system_tmp), **(env or {})}
        return subprocess.run([sys.executable, "-m", "ditexport", *map(str, args)], capture_output=True, text=True,
                              cwd=cwd, env=full_env, timeout=timeout)
    return run


def assert_refused(proc: subprocess.CompletedProcess, *fragments: str, absent: Path | None = None) -> str:
    """Exit 2, exactly one line on stderr (starting "error: "), no traceback; the line has every fragment."""
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    if absent is not None:
        assert not absent.exists(), f"{absent} was written"
    return lines[0]


def flip_bytes(path: Path, count: int = 64, keep_times: bool = False) -> None:
    """Inverts `count` bytes in the middle of a file in place: same size (and, with keep_times, same mtime)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        chunk = f.read(count)
        f.seek(st.st_size // 2)
        f.write(bytes(b ^ 0xFF for b in chunk))
    if keep_times:
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
        assert path.stat().st_size == st.st_size and path.stat().st_mtime_ns == st.st_mtime_ns


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only_after=None):
    """A real tmpfs of `size` at `path` (root with CAP_SYS_ADMIN only); `read_only_after(path)` fills it before
    it is remounted read-only."""
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here to make a real full or read-only file system: "
                    f"{proc.stderr.strip() or proc.returncode}")
    try:
        if read_only_after is not None:
            read_only_after(path)
            subprocess.run(["mount", "-o", "remount,ro", str(path)], check=True)
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path: Path, leave_bytes: int) -> None:
    """Fills the file system of `path` until about `leave_bytes` are free."""
    free = shutil.disk_usage(path).free
    if free > leave_bytes:
        (path / "filler").write_bytes(b"\0" * (free - leave_bytes))


def debris(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


@pytest.fixture(scope="module")
def exports(digits_export, tmp_path_factory) -> Path:
    """Copies of the shared digits build, made first so their files are older than the verification cache's
    racy window when the tests reach them."""
    root = tmp_path_factory.mktemp("fault-exports")
    for name in ("clean", "flipped", "utime", "truncated", "deleted", "extra", "nomanifest", "badmanifest",
                 "unvalidated", "report", "hint"):
        shutil.copytree(digits_export, root / name)
    return root


@pytest.fixture(scope="module")
def tiny_export(cli, tmp_path_factory) -> Path:
    """One DiT-tiny/2 build for the build tests of this module (copy it before building into it)."""
    out = tmp_path_factory.mktemp("tiny-export") / "tiny"
    proc = cli("build", *TINY_BUILD, "--export-dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


SAMPLE = ["sample", "--steps", "3", "--num-images", "2", "--quiet"]
ORT = [*SAMPLE, "--backend", "onnxruntime"]


# ------------------------------------------------------------------------------------ bad inputs

@pytest.mark.parametrize("args, fragments", [
    (["--cfg-scale", "nan"], ["--cfg-scale", "finite", "nan"]),
    (["--cfg-scale", "inf"], ["--cfg-scale", "finite", "inf"]),
    (["--cfg-scale=-inf"], ["--cfg-scale", "finite"]),
    (["--sampler", "ddim", "--eta", "nan"], ["--eta", "finite"]),
    (["--sampler", "ddim", "--eta", "inf"], ["--eta", "finite"]),
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
        start = time.perf_counter()
        proc = cli("validate", "--export-dir", export, case="validate a read-only export")
        assert_refused(proc, str(export), "Read-only file system")
        assert time.perf_counter() - start < 60  # refused up front, not after the validation's work
        proc = cli("build", "--precision", "fp32", "--export-dir", export, case="build a read-only, up-to-date export")
        assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr
        out = tmp_path / "ro.png"
        assert sample_from(cli, export, out, "sample a read-only export").returncode == 0


def test_bench_skips_a_damaged_export_with_the_reason(cli, exports, tmp_path):
    export = tmp_path / "bench-export"
    shutil.copytree(exports / "clean", export)
    flip_bytes(export / "model.onnx")
    proc = cli("bench", "--device", "cpu", "--backends", "onnxruntime-fp32", "--quick", "--batch-sizes", "2",
               "--no-unguided", "--export-dir", export, "--out", tmp_path / "bench", case="bench a damaged export")
    assert "Traceback" not in proc.stderr
    assert "skipped onnxruntime-fp32" in proc.stdout and "model.onnx does not match its SHA-256" in proc.stdout


# --------------------------------------------------------------------------- builds: disks, kills, locks

def test_build_onto_a_full_disk(cli, tmp_path):
    # DiT-tiny/2 has 183,200 parameters: its two fp32 graphs need at least 1.47 MB (the build's estimate).
    with tmpfs(tmp_path / "small", "1m") as small:
        out = small / "tiny"
        proc = cli("build", *TINY_BUILD, "--export-dir", out, case="build onto a 1 MB disk")
        assert_refused(proc, "not enough space", str(out), absent=out)
    with tmpfs(tmp_path / "tight", "2m") as tight:
        # Enough for the estimate, not for the graphs plus the scratch files of tracing and validation.
        out = tight / "tiny"
        proc = cli("build", *TINY_BUILD, "--export-dir", out, case="build that fills the disk half-way")
        line = assert_refused(proc, str(out), "nothing was published", absent=out)
        assert "No space left on device" in line or "file system is full" in line
        assert list(tight.iterdir()) == []


KILL_POINTS = ["build:old-export-removed", "before-publish:model.onnx", "after-publish:model.onnx", "scratch:check",
               "before-publish:manifest.json"]


def test_kill_9_at_each_point_of_a_build_leaves_nothing_a_reader_uses_and_the_next_build_cleans_up(
        cli, tiny_export, tmp_path, system_tmp):
    from ditexport.artifacts import list_exports

    export = tmp_path / "tiny"
    shutil.copytree(tiny_export, export)
    previous_debris: list[str] = []
    for point in KILL_POINTS:
        proc = cli("build", *TINY_BUILD, "--export-dir", export, "--force", env={"DITEXPORT_KILL_AT": point},
                   case=f"kill -9 at {point}")
        assert proc.returncode == -signal.SIGKILL, (point, proc.stdout[-1000:], proc.stderr[-1000:])
        left = debris(export)
        # Only this crash's temporaries: the build it interrupted removed the previous crash's first.
        assert len({name.split("@")[0] for name in left}) <= 1, (point, previous_debris, left)
        assert all(name.startswith(".tmp-") for name in left)
        assert not (export / "manifest.json").exists() and list_exports(tmp_path) == []  # no reader takes it
        previous_debris = left
    assert previous_debris, "the last kill point should leave a temporary behind"
    out = tmp_path / "x.png"
    proc = cli(*ORT, "--model", "DiT-tiny/2", "--export-dir", export, "--out", out, case="sample after the kills")
    assert_refused(proc, "no ONNX export", absent=out)
    proc = cli("build", *TINY_BUILD, "--export-dir", export, case="build after the kills")
    assert proc.returncode == 0 and "removed 1 temporary file(s)" in proc.stdout, proc.stdout[-2000:]
    assert debris(export) == []
    # Killed after the manifest is in place: complete, and valid.
    proc = cli("build", *TINY_BUILD, "--export-dir", export, "--force",
               env={"DITEXPORT_KILL_AT": "after-publish:manifest.json"}, case="kill -9 after the manifest")
    assert proc.returncode == -signal.SIGKILL
    assert cli(*ORT, "--model", "DiT-tiny/2", "--export-dir", export, "--out", tmp_path / "y.png").returncode == 0
    assert cli("validate", "--export-dir", export, "--sample-steps", "0").returncode == 0
    # Nothing of ours went to the system's temporary directory (torch keeps its own caches there).
    assert [p for p in system_tmp.rglob("*") if "ditexport" in p.name or p.name.startswith(".tmp-")
            or p.suffix in (".onnx", ".data", ".json")] == []


def start(args, env: dict, system_tmp: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "ditexport", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(system_tmp),
                                 "PYTHONUNBUFFERED": "1", **env})


def read_until(proc: subprocess.Popen, text: str) -> str:
    """The process's stdout up to and including the first line containing `text`."""
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if text in line:
            return "".join(seen)
    raise AssertionError(f"{text!r} never came: {''.join(seen)[-2000:]} {proc.stderr.read()[-2000:]}")


def test_two_builds_into_one_directory_are_serialised_and_a_reader_sees_one_of_them(cli, tiny_export, tmp_path,
                                                                                      system_tmp):
    export = tmp_path / "tiny"
    shutil.copytree(tiny_export, export)
    resume = tmp_path / "resume"
    # The first build rebuilds (--max-batch 2 is another input) and holds still once its old export is gone.
    first = start(["build", *TINY_BUILD, "--max-batch", "2", "--export-dir", export],
                  {"DITEXPORT_PAUSE_AT": "build:old-export-removed", "DITEXPORT_RESUME_WHEN": str(resume)}, system_tmp)
    procs = [first]
    CASES_TRIED.append("two concurrent builds and a reader")
    try:
        read_until(first, "-> " + str(export))  # the build line, printed just before the pause point
        second = start(["build", *TINY_BUILD, "--max-batch", "4", "--export-dir", export], {}, system_tmp)
        reader = start([*ORT, "--model", "DiT-tiny/2", "--export-dir", export, "--out", tmp_path / "during.png"], {},
                       system_tmp)
        procs += [second, reader]
        second_said = read_until(second, "waiting for it to finish")
        reader_said = read_until(reader, "waiting for it to finish")
        assert f"another build is writing it (pid {first.pid})" in second_said
        assert f"a build is writing it (pid {first.pid})" in reader_said
        resume.write_text("")
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        resume.write_text("")
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outputs]
    assert all("Traceback" not in out + err for out, err in outputs)
    # The reader waited and then read a complete export, the first build's or the second's, never a mix.
    assert (tmp_path / "during.png").stat().st_size > 0
    manifest = json.loads((export / "manifest.json").read_text())
    assert manifest["io_spec"]["batch_profile"]["max"] == 8  # the last build's (--max-batch 4, guided) inputs
    assert cli("validate", "--export-dir", export, "--sample-steps", "0").returncode == 0
    assert debris(export) == []


def test_a_held_lock_refuses_with_no_wait_and_waits_otherwise(cli, tiny_export, tmp_path, system_tmp):
    export = tmp_path / "tiny"
    shutil.copytree(tiny_export, export)
    fd = os.open(export / "build.lock", os.O_RDWR)
    fcntl.flock(fd, fcntl.LOCK_EX)  # this test process plays a build in progress
    try:
        proc = cli("build", *TINY_BUILD, "--export-dir", export, "--no-wait", case="build --no-wait while locked")
        assert_refused(proc, str(export), f"pid {os.getpid()}", "--no-wait")
        proc = cli("validate", "--export-dir", export, "--no-wait", case="validate --no-wait while locked")
        assert_refused(proc, str(export), "--no-wait")
        waiting = start(["build", *TINY_BUILD, "--export-dir", export], {}, system_tmp)
        CASES_TRIED.append("build waiting for a held lock")
        said = read_until(waiting, "waiting for it to finish")
        assert waiting.poll() is None and f"another build is writing it (pid {os.getpid()})" in said
    finally:
        os.close(fd)  # the "build in progress" ends
    rest, err = waiting.communicate(timeout=600)
    assert waiting.returncode == 0 and "up to date" in rest, err[-2000:]
