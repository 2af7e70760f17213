"""Who may write an export directory: the build lock, the readers' shared lock, and temporaries that carry
their writer's identity so that the next build can tell a crashed writer's debris from a live one's.

A build holds an exclusive `fcntl.flock` on `<export>/build.lock` from start to finish; a reader holds a shared
one while it checks the files against the manifest and opens them. Temporary files and directories are named
`.tmp-<pid>@<host>~<purpose>~<random>`: one whose process is gone from this host is stale.
"""
from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path

from .errors import DitexportError
from .logs import get_logger

LOG = get_logger("locking")  # a wait on a lock is a warning: it explains a stall, so -q still shows it

LOCK_NAME = "build.lock"  # not a dot file: temporaries are the only dot files a build leaves, and only when it crashes
TEMP_PREFIX = ".tmp-"
_TEMP_NAME = re.compile(r"^\.tmp-(\d+)@([^~/]+)~")
# What writers before temporaries carried an identity left behind (removed only under the build lock).
_LEGACY_TEMPORARIES = (".fp32-*", ".model*.onnx.*", ".cond*.onnx.*", ".*.json.*.tmp", ".write-test.*")


class LockError(DitexportError):
    """Another process is writing the export directory, and the caller asked not to wait."""


# ------------------------------------------------------------------------------------ identities

def hostname() -> str:
    # '~' and '/' cannot occur in a host name; they would break the temporary-name pattern.
    return re.sub(r"[~/\s]", "_", socket.gethostname()) or "localhost"


def temp_prefix(purpose: str) -> str:
    """The start of a temporary's name: `.tmp-<pid>@<host>~<purpose>~` (mkstemp/mkdtemp add the rest)."""
    purpose = re.sub(r"[~/\s]", "_", purpose)
    return f"{TEMP_PREFIX}{os.getpid()}@{hostname()}~{purpose}~"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def is_stale(name: str) -> bool:
    """Whether a temporary's writer is gone: its pid is not alive on this host. Other hosts' are kept."""
    match = _TEMP_NAME.match(name)
    if not match:
        return False
    pid, host = int(match.group(1)), match.group(2)
    return host == hostname() and pid != os.getpid() and not _pid_alive(pid)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(directory: str | Path, legacy: bool = False) -> list[str]:
    """Deletes temporaries of writers that died on this host (and, with `legacy`, the unnamed ones of older
    versions, safe only under the build lock); returns their names."""
    directory = Path(directory)
    removed = []
    try:
        entries = list(directory.iterdir())
    except OSError:
        return removed
    legacy_names = {p.name for pattern in _LEGACY_TEMPORARIES for p in directory.glob(pattern)} if legacy else set()
    for path in entries:
        if is_stale(path.name) or path.name in legacy_names:
            _remove(path)
            removed.append(path.name)
    return removed


# ----------------------------------------------------------------------------------------- locks

def _open_lock_file(directory: Path, create: bool) -> int | None:
    """A descriptor of the lock file, or None where it neither exists nor can be made (a read-only export,
    which no build can be writing either)."""
    path = directory / LOCK_NAME
    for flags in ((os.O_RDWR | os.O_CREAT,) if create else ()) + (os.O_RDWR, os.O_RDONLY):
        try:
            return os.open(path, flags | os.O_CLOEXEC, 0o666)
        except OSError as e:
            if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOENT):
                raise
    return None


def _holder(directory: Path) -> str:
    """" (pid N)" of the process holding the lock, from /proc/locks (Linux), for messages; "" elsewhere."""
    try:
        st = os.stat(directory / LOCK_NAME)
        device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks") as table:
            for line in table:
                fields = line.split()
                if "->" not in fields and len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == device:
                    return f" (pid {fields[4]})"
    except (OSError, ValueError):
        pass
    return ""


@contextmanager
def build_lock(directory: str | Path, wait: bool = True, log=LOG.warning):
    """Holds the exclusive lock of an export directory for a build; waits for another build (saying so) or,
    with wait=False, refuses in one line. Yields whether the lock is held (False: the directory is read-only)."""
    directory = Path(directory)
    fd = _open_lock_file(directory, create=True)
    if fd is None:
        yield False
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _holder(directory)
            if not wait:
                raise LockError(f"{directory} is being written by another build{who}; wait for it to finish, "
                                "or leave out --no-wait to wait for it") from None
            log(f"{directory}: another build is writing it{who}; waiting for it to finish ...")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # closing releases the lock


def mark_writer(directory: str | Path) -> None:
    """Records this process in the lock file when a build starts rewriting the directory (kept after it ends:
    the last writer)."""
    try:
        (Path(directory) / LOCK_NAME).write_text(f"{os.getpid()}@{hostname()}\n")
    except OSError:
        pass  # only informative


@contextmanager
def read_lock(directory: str | Path, log=LOG.warning):
    """Holds the shared lock of an export directory while a reader checks and opens its files; a build in
    progress is waited for (saying so)."""
    directory = Path(directory)
    fd = _open_lock_file(directory, create=directory.is_dir() and os.access(directory, os.W_OK))
    if fd is None:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            log(f"{directory}: a build is writing it{_holder(directory)}; waiting for it to finish ...")
            fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)
