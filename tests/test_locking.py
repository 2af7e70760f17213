"""ditexport.locking: temporaries named by their writer, stale ones removed, the build lock."""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys

from ditexport import locking
from ditexport.artifacts import atomic_path, scratch_dir


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_temporaries_carry_their_writer_and_only_dead_writers_are_stale(tmp_path):
    with scratch_dir(tmp_path, "check") as scratch, atomic_path(tmp_path / "report.json") as tmp:
        for name in (scratch.name, tmp.name):
            assert name.startswith(f".tmp-{os.getpid()}@{locking.hostname()}~")
            assert not locking.is_stale(name)  # this process is alive
    host = locking.hostname()
    dead = f".tmp-{dead_pid()}@{host}~model.onnx~abc"
    other_host = f".tmp-{dead_pid()}@not-{host}~model.onnx~abc"
    (tmp_path / dead).mkdir()
    (tmp_path / other_host).write_text("")
    (tmp_path / ".fp32-legacy").mkdir()  # what builds before writer names left
    (tmp_path / "model.onnx").write_text("a published file")
    assert locking.is_stale(dead) and not locking.is_stale(other_host)
    assert locking.remove_stale_temporaries(tmp_path) == [dead]
    assert locking.remove_stale_temporaries(tmp_path, legacy=True) == [".fp32-legacy"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [other_host, "model.onnx", "report.json"]


def test_an_atomic_write_removes_a_crashed_writers_temporary_beside_it(tmp_path):
    stale = tmp_path / f".tmp-{dead_pid()}@{locking.hostname()}~samples.png~x.tmp"
    stale.write_bytes(b"half a png")
    with atomic_path(tmp_path / "samples.png") as tmp:
        tmp.write_bytes(b"png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.png"]


def test_the_build_lock_excludes_and_names_its_holder(tmp_path):
    lines = []
    with locking.build_lock(tmp_path, log=lines.append) as held:
        assert held and (tmp_path / locking.LOCK_NAME).is_file()
        # Another process asking without waiting is refused, naming this one.
        code = ("import sys; from ditexport import locking\n"
                "try:\n    with locking.build_lock(sys.argv[1], wait=False): pass\n"
                "except locking.LockError as e:\n    print(e); sys.exit(3)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert proc.returncode == 3 and f"(pid {os.getpid()})" in proc.stdout and "--no-wait" in proc.stdout
    fd = os.open(tmp_path / locking.LOCK_NAME, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the block ended
    finally:
        os.close(fd)
    assert lines == []


def test_readers_of_a_directory_that_cannot_hold_a_lock_file_go_unlocked(tmp_path):
    with locking.read_lock(tmp_path / "missing"):
        pass
    with locking.build_lock(tmp_path / "missing") as held:
        assert held is False  # nothing to lock: the build creates its directory before locking it
    assert not (tmp_path / "missing").exists()
