"""CPU threads for torch and ONNX Runtime: one decision, made the same way for every command.

With one thread per core (torch's own default), every parallel region waits for its slowest thread, so on
the 2-core development machine the default `sample` of the digits model took 4.4 s on 2 threads and 2.0 s on
1 beside one busy process, and 35.7 s against 3.5 s under a load of 5 (README, "CPU threads"). The default
therefore gives small models one thread and leaves bigger ones every core but one. ONNX Runtime sessions created without an explicit thread count follow torch's
count (`backends.onnxruntime_backend.session_options`).
"""
from __future__ import annotations

import functools
import os

# Width (hidden size) up to which one thread is the default: the digits model (128) gained 1.3x from a free
# second core and lost 2.2x (10x under heavy load) when it was busy; DiT-S/2 (384) and B/2 gained 1.9x (README).
SMALL_MODEL_WIDTH = 256


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=None)
def torch_initial_threads() -> int:
    """torch's own default (one per physical core), read before this module first changes it."""
    import torch

    return torch.get_num_threads()


def default_threads(hidden_size: int | None, cores: int | None = None) -> int:
    """1 for models of width <= 256; else every usable core but one (one busy core then stalls no parallel
    region), and never more than torch's own default, which counts physical cores only."""
    if hidden_size is not None and hidden_size <= SMALL_MODEL_WIDTH:
        return 1
    return max(1, min((cores or usable_cores()) - 1, torch_initial_threads()))


def _environment_threads() -> int | None:
    """OMP_NUM_THREADS when it holds a positive integer: the user's standing choice for this shell."""
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


def resolve_threads(requested: int | None, hidden_size: int | None) -> tuple[int, str]:
    """Sets torch's CPU threads (and so ONNX Runtime's) from --torch-threads, else OMP_NUM_THREADS, else the
    default for this model width; returns the count and where it came from, for the run's banner."""
    import torch

    torch_initial_threads()  # remembered before the first change
    if requested:
        threads, why = requested, "--torch-threads"
    elif (from_env := _environment_threads()) is not None:
        threads, why = from_env, "OMP_NUM_THREADS"
    else:
        threads = default_threads(hidden_size)
        small = hidden_size is not None and hidden_size <= SMALL_MODEL_WIDTH
        why = f"default for a model of width {hidden_size}" if small else "default: the usable cores less one"
    torch.set_num_threads(threads)
    return threads, why


def describe_threads(threads: int, why: str) -> str:
    return f"{threads} CPU thread{'s' if threads != 1 else ''} ({why})"
