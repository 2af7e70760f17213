"""CUDA graphs: one captured forward per input shape, replayed with the inputs copied into static buffers.

Shared by the torch CUDA path and the TensorRT backend. A replay launches the whole forward as one graph,
so a sampling step costs the GPU work plus a few copies, with no host synchronisation.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..errors import summary


class CaptureError(RuntimeError):
    """The forward ran, but capturing it in a CUDA graph failed; the message is the forward's own error (e.g.
    TensorRT's enqueue), not only the capture's. Callers may fall back to running without a graph."""


def fresh_float32(t: torch.Tensor) -> torch.Tensor:
    """A float32 copy that the next replay cannot overwrite (`.float()` alone aliases a float32 tensor)."""
    return t.float() if t.dtype != torch.float32 else t.clone()


def run_ordered(stream: torch.cuda.Stream, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
    """`fn(*inputs)` on a backend's own `stream`, after the caller's queued work and before the caller's next.

    One stream per backend keeps its replays and its shared buffers in one order whichever stream (or thread)
    calls, and keeps TensorRT off the legacy default stream. `fn` returns a fresh tensor; allocated on
    `stream`, it is marked as used by the caller's stream so that its memory is not reused too early.
    """
    caller = torch.cuda.current_stream(stream.device)
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        out = fn(*inputs)
    caller.wait_stream(stream)
    out.record_stream(caller)
    return out


class CapturedForward:
    """`fn(*static_inputs) -> output` captured once for fixed shapes; calling it copies inputs in and replays.

    Warm-up runs on a side stream, as CUDA graph capture requires (lazy initialisation such as cuBLAS
    handles, TensorRT's first-enqueue set-up and autotuning must happen before capture). The returned
    output is the graph's static buffer: callers copy it before the next call, and call from one stream.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], example_inputs: Sequence[torch.Tensor],
                 warmup: int = 2, *, inputs_are_static: bool = False):
        device = example_inputs[0].device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need CUDA tensors, got {device}")
        # With inputs_are_static the caller's buffers (already holding valid values) are the graph's
        # inputs, e.g. the buffers a TensorRT context is bound to; otherwise they are copied.
        self.static_inputs = list(example_inputs) if inputs_are_static else \
            [x.clone(memory_format=torch.contiguous_format) for x in example_inputs]
        with torch.cuda.device(device):  # capture, streams and graph memory on the tensors' GPU, not the current one
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(warmup):
                    fn(*self.static_inputs)
            self.graph = torch.cuda.CUDAGraph()
            failed: Exception | None = None  # what the forward raised under capture
            try:
                # An explicit capture stream: torch's default one is created once, on whichever GPU was current.
                # thread_local: another thread (a demo's other request) using CUDA meanwhile must not void it.
                with torch.cuda.graph(self.graph, stream=side, capture_error_mode="thread_local"):
                    try:
                        self.static_outputs = fn(*self.static_inputs)
                    except Exception as e:
                        failed = e
                        raise
            except Exception as e:
                # Ending a capture that the forward broke raises torch's own error, which would hide the cause.
                cause = failed or e
                raise CaptureError(f"CUDA graph capture failed: {summary(cause)}") from cause
            finally:
                torch.cuda.current_stream(device).wait_stream(side)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        for static, x in zip(self.static_inputs, inputs):
            static.copy_(x, non_blocking=True)
        self.graph.replay()
        return self.static_outputs


class GraphCache:
    """CapturedForwards keyed by (graph name, input shapes), captured on first use."""

    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self._captured: dict[tuple, CapturedForward] = {}

    def __call__(self, key: str, fn: Callable[..., torch.Tensor], *inputs: torch.Tensor) -> torch.Tensor:
        cache_key = (key, *(tuple(x.shape) for x in inputs))
        captured = self._captured.get(cache_key)
        if captured is None:
            captured = self._captured[cache_key] = CapturedForward(fn, inputs, self.warmup)
        return captured(*inputs)

    def __len__(self) -> int:
        return len(self._captured)

    def clear(self) -> None:
        self._captured.clear()
