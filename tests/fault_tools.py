"""Shared by the fault-injection tests (tests/test_faults*.py): the real CLI in a subprocess, the shape every
refusal must have, real faults (flipped bytes, small tmpfs mounts), and the count of cases tried."""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

# Read by conftest's terminal summary: how many fault cases were tried.
CASES_TRIED: list[str] = []
TINY_BUILD = ["--model", "DiT-tiny/2", "--precision", "fp32", "--sample-steps", "0"]
SAMPLE = ["sample", "--steps", "3", "--num-images", "2", "--quiet"]
ORT = [*SAMPLE, "--backend", "onnxruntime"]


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
