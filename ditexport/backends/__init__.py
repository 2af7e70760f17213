"""Runtimes behind one contract: `backend(x, t, y) -> out` and `backend.with_condition(x, c) -> out`.

Every backend takes and returns float32 tensors (t and y int64) on `backend.device`, whatever precision it
computes in, so the sampler never knows which runtime it drives. Heavy runtimes are imported lazily.
"""
from __future__ import annotations

from .base import Backend
from .torch_backend import TorchBackend

BACKEND_NAMES = ("torch", "onnxruntime", "tensorrt")

__all__ = ["Backend", "TorchBackend", "OnnxRuntimeBackend", "TensorRTBackend", "BACKEND_NAMES"]


def __getattr__(name: str):
    # onnxruntime is imported only when its backend is asked for, so the package imports without it.
    if name == "OnnxRuntimeBackend":
        from .onnxruntime_backend import OnnxRuntimeBackend

        return OnnxRuntimeBackend
    if name == "TensorRTBackend":  # tensorrt itself is imported only when a plan is loaded
        from .tensorrt_backend import TensorRTBackend

        return TensorRTBackend
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
