"""Fault injection, builds: the real CLI, in subprocesses, building onto full disks, killed with SIGKILL at
several points, two builds into one directory with a reader between them, and a held lock. Refusals are exit
code 2 and one line; an export is afterwards complete and valid, or refused; nothing of ours is left in the
system's temporary directory. Builds here use DiT-tiny/2, fp32 only, no sample check, to stay short.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
from fault_tools import CASES_TRIED, ORT, TINY_BUILD, assert_refused, debris, read_until, start, tmpfs


@pytest.fixture(scope="module")
def tiny_export(cli, tmp_path_factory) -> Path:
    """One DiT-tiny/2 build for the build tests of this module (copy it before building into it)."""
    out = tmp_path_factory.mktemp("tiny-export") / "tiny"
    proc = cli("build", *TINY_BUILD, "--export-dir", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


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
