"""Progress of long stages: a line every few seconds while one runs, so that a big build is never silent.

A DiT-XL/2 build spends minutes in single calls (tracing, saving 2.7 GB graphs, ONNX Runtime sessions,
hashing); a stage that ends within `every_s` prints nothing extra, so small models keep their short output.
"""
from __future__ import annotations

import threading
import time
from contextlib import contextmanager

HEARTBEAT_S = 10.0  # the longest silence while a stage runs


@contextmanager
def heartbeat(log, stage: str, every_s: float | None = None, end_line: bool = False):
    """Runs the block; every `every_s` seconds (default HEARTBEAT_S) while it runs, logs `<stage> … <elapsed> s`
    from a helper thread. With `end_line`, for a stage whose caller prints nothing when it ends, a stage that
    logged also ends with `<stage>: done in <elapsed> s`, so the next stage's first line is one interval away."""
    every_s = every_s or HEARTBEAT_S
    done = threading.Event()
    start = time.perf_counter()
    beats = []

    def beat():
        while not done.wait(every_s):
            beats.append(1)
            log(f"{stage} … {time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=beat, name="ditexport-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
    if beats and end_line:  # reached only when the stage succeeded
        log(f"{stage}: done in {time.perf_counter() - start:.0f} s")
