"""The sockets of the local service's HTTP front: a free loopback port, and an open-file limit that holds its
connections."""
from __future__ import annotations

import logging
import socket

log = logging.getLogger("ditexport.serving")

FILE_HEADROOM = 1024  # open files of the process beside the front's connections (Ray's driver, logs, libraries)


def free_loopback_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def raise_file_limit(max_connections: int) -> int:
    """Raises this process's soft limit on open files so that `max_connections` clients fit, each with its
    forward to Ray's proxy, beside what the process itself holds (Ray's driver shares it): 2 x max_connections +
    FILE_HEADROOM. Many systems start processes at 1024, where the front would stop accepting near 1000 clients
    instead of answering 503 at its bound. Returns the limit in force; below the need (the hard limit), warns with
    the number of connections it holds."""
    try:
        import resource
    except ImportError:  # not a POSIX system
        return -1
    need = 2 * max_connections + FILE_HEADROOM
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            log.warning(f"could not raise the open-file limit from {soft} to {target}: {e}")
    if soft != resource.RLIM_INFINITY and soft < need:
        log.warning(f"the open-file limit ({soft}, `ulimit -n`) holds about {max(0, (soft - FILE_HEADROOM) // 2)} "
                    f"client connections, fewer than --max-connections {max_connections}; beyond it clients wait "
                    "to connect instead of getting 503")
    return soft
